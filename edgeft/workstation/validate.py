"""Prove a bundle against torch, as optimum's validate_model_outputs does, plus training:
inference logits, loss, one step's gradients, and the parameters after one AdamW step.

Tolerances: all graphs compute in fp32 from bit-identical weights, so only the
order of floating-point accumulation differs (matmul blocking, fused kernels).
That bounds relative differences near 1e-6; we fail at 1e-4, which no real
divergence (a wrong weight, a missing op, a different optimizer) stays under.

Memory: the torch side runs first (`torch_reference`, while export still holds the fp32
model) and leaves only its numbers; the bundle is then run with the device's own engines
(edgeft.device), one ONNX Runtime session at a time, each released before the next.
"""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import ExportError

TOLERANCE = 1e-4
# Kept off although the base is an input now (nothing left to fold into fp32 weights): folding
# would expand any packed weight a future graph embeds at session start (SmolLM2-135M: 7 GB and 36 s).
INFERENCE_DISABLED_OPTIMIZERS = ["ConstantFolding"]
LR = 1e-3
# The sample batch: two rows of 64 tokens, one half padding. Every comparison is relative, and a
# wrong weight, op or optimizer shows at any size, but too few positions make fp32 noise look like
# divergence: at 2 x 32 a freshly trained SmolLM2 adapter's gradients were 1.6e-4 apart (refused),
# at 2 x 64 8.2e-6. At 4 x 64 a 0.5B model spent half its export validating.
BATCH, SEQ = 2, 64


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def _grad_rel(grads: np.ndarray, expected: dict) -> float:
    """Relative distance to the reference gradients; where the reference gives two (an image bundle:
    torch in float64 and in fp32, see vision_export.vision_reference; a causal LM: the head's
    log-softmax in fp32 and in float64, see torch_reference), to the nearer one."""
    return min(_rel(grads, g) for g in [expected["grads"], *expected.get("grads_alt", [])])


def release_memory() -> None:
    """Collect, and hand freed heap pages back to the system (glibc keeps freed blocks under its
    mmap threshold, up to 32 MB each, in the heap: a freed model's layers would stay resident)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def torch_reference(model, task: str, tokenizer, labels, trainable: list[str], batch: int, seq: int) -> dict:
    """What the bundle must compute, from the workstation model on a sample batch: logits, loss,
    one step's gradients, and the trainable tensors it starts from (numpy; the model is not kept).
    A causal LM's gradients twice: as torch computes them in fp32, and with the head's log-softmax
    in float64 (`grads_alt`); the bundle's must be near one of them (_grad_rel)."""
    import torch

    from .device_model import LogitsGraph, LossGraph, sample_batch

    s = sample_batch(tokenizer, task, labels, batch, seq, seed=1)
    with torch.no_grad():
        logits = LogitsGraph(model)(s["input_ids"], s["attention_mask"]).numpy()
    graph = LossGraph(model, task).train()
    params = dict(graph.named_parameters())
    loss = graph(s["input_ids"], s["attention_mask"], s["labels"])
    loss.backward()
    result = {"feeds": {k: v.numpy() for k, v in s.items()}, "logits": logits, "loss": float(loss.item()),
              "grads": np.concatenate([params[n].grad.numpy().ravel() for n in trainable]),
              "start": {n: params[n].detach().numpy().copy() for n in trainable}}
    for n in trainable:
        params[n].grad = None
    if task != "classify":
        # A second reference, the head's log-softmax in float64: torch's fp32 one sums a large vocabulary's
        # exponentials in one pass, and ORT's unchunked graph shares its error, but the portable step's chunked
        # head does not. Gemma-3 (262k words), LoRA gradients from this reference: torch fp32 9.4e-5, ORT's
        # graph 9.5e-5, the chunked step 6.1e-6; from a wholly float64 model's: 9.1e-5, 9.3e-5, 3.2e-6 (and
        # this reference 4.5e-6).
        LossGraph(model, task, head_dtype=torch.float64).train()(s["input_ids"], s["attention_mask"], s["labels"]).backward()
        exact = np.concatenate([params[n].grad.numpy().ravel() for n in trainable])
        result["grads_alt"] = [exact]
        result["torch_head_fp32_vs_float64_grad"] = float(np.linalg.norm(result["grads"] - exact) / max(np.linalg.norm(exact), 1e-30))
        for n in trainable:
            params[n].grad = None
    model.eval()
    return result


def _adamw_torch(start: dict, grads: dict, trainable: list[str]) -> np.ndarray:
    """torch.optim.AdamW's first step from `start` with the given gradients, flat."""
    import torch

    params = [torch.nn.Parameter(torch.from_numpy(start[n].copy())) for n in trainable]
    for p, n in zip(params, trainable):
        p.grad = torch.from_numpy(np.ascontiguousarray(grads[n]))
    torch.optim.AdamW(params, lr=LR, eps=1e-8, weight_decay=0.0).step()
    return np.concatenate([p.detach().numpy().ravel() for p in params])


def validate_bundle(bundle: Path, expected: dict, trainable: list[str], portable: dict, frozen: str) -> dict:
    """Run the bundle as a device does (edgeft.device's engines) and compare with `expected`
    (torch_reference). Raises ExportError over TOLERANCE."""
    from ..bundle import ORT_TRAINING
    from ..device.backends import AdamW, Layout, OrtTrainingBackend, PortableBackend
    from ..device.runtime import inference_session
    from ..stages import profile_mark

    bundle = Path(bundle)
    feeds, start = expected["feeds"], expected["start"]
    # what the engines read; there is no manifest yet
    manifest = SimpleNamespace(portable=portable, trainable=dict.fromkeys(trainable), target={}, frozen=frozen,
                               onnxruntime={"training": ORT_TRAINING}, inference={"file": "inference_model.onnx",
                                                                                   "disabled_optimizers": INFERENCE_DISABLED_OPTIMIZERS})
    loss_rel = lambda loss: abs(loss - expected["loss"]) / max(abs(expected["loss"]), 1e-30)  # noqa: E731

    profile_mark("  validate: inference graph")
    session = inference_session(bundle, manifest, start, want_cuda=False)
    logits = session.run(None, {k: v for k, v in feeds.items() if k != "labels"})[0]
    result = {"logits_max_abs": float(np.abs(logits - expected["logits"]).max()), "logits_rel": _rel(logits, expected["logits"])}
    del session, logits
    release_memory()

    # training artifacts: eval loss, one train step's gradients, and ORT's own AdamW step
    profile_mark("  validate: ORT training artifacts")
    from onnxruntime.training.api import Optimizer

    engine = OrtTrainingBackend(bundle, manifest)
    engine.set_params(start)
    result["loss_rel"] = loss_rel(engine.eval_loss(feeds))
    result["train_loss_rel"] = loss_rel(engine.forward_backward(feeds))
    grads_ort = {n: np.array(engine.state.parameters[n].grad) for n in trainable}
    flat_ort_grads = np.concatenate([grads_ort[n].ravel() for n in trainable])
    result["grad_rel"] = _grad_rel(flat_ort_grads, expected)
    optimizer = Optimizer(str(bundle / "optimizer_model.onnx"), engine.module)
    optimizer.set_learning_rate(LR)
    optimizer.step()
    after_ort = np.concatenate([np.array(engine.state.parameters[n].data).ravel() for n in trainable])
    del optimizer, engine
    release_memory()

    # the portable step (standard ops, stock ORT)
    profile_mark("  validate: portable step")
    step = PortableBackend(bundle, manifest)
    step.set_params(start)
    result["portable_loss_rel"] = loss_rel(step.forward_backward(feeds))
    result["portable_grad_rel"] = _grad_rel(step.take_grads(), expected)
    result["portable_eval_loss_rel"] = loss_rel(step.eval_loss(feeds))  # the promotion check's graph
    if "torch_head_fp32_vs_float64_grad" in expected:  # how far torch's own two references are apart (not a check)
        result["torch_head_fp32_vs_float64_grad"] = expected["torch_head_fp32_vs_float64_grad"]
    del step
    release_memory()

    # The optimizer is checked on ORT's own gradients: Adam divides by |g|, so comparing after
    # torch's gradients would amplify 1e-10 gradient noise on near-zero entries into the update.
    profile_mark("  validate: AdamW (ORT's, portable, torch)")
    adamw = AdamW(bundle, manifest, Layout({n: v.shape for n, v in start.items()}), start)
    adamw.update(flat_ort_grads, LR)
    after_torch = _adamw_torch(start, grads_ort, trainable)
    result["step_max_abs"] = float(np.abs(after_ort - after_torch).max())
    result["step_rel"] = float(np.abs(after_ort - after_torch).max() / LR)  # relative to the size of one update
    result["portable_step_rel"] = float(np.abs(adamw.params - after_torch).max() / LR)
    result["tolerance"] = TOLERANCE
    # An image bundle's gradients may also be as far from float64 as torch's own fp32 ones are
    # (vision_export.vision_reference: ReLU6's kinks; a 3-step EfficientNet-Lite0 adapter: ONNX
    # Runtime 1.8e-4 from float64, torch fp32 5.8e-4).
    grad_tolerance = max(TOLERANCE, expected.get("torch_fp32_grad_rel", 0.0))
    if grad_tolerance > TOLERANCE:
        result["grad_tolerance"] = grad_tolerance
    bad = {k: v for k, v in result.items()
           if k.endswith("_rel") and not v <= (grad_tolerance if k.endswith("grad_rel") else TOLERANCE)}
    if bad:
        raise ExportError(f"bundle does not match the workstation model: {', '.join(f'{k}={v:.2e}' for k, v in bad.items())} "
                          f"(tolerance {TOLERANCE:g}" + (f", gradients {grad_tolerance:.2e}" if grad_tolerance > TOLERANCE else "") + ")",
                          "please report this with the model and target; the bundle was not written")
    return result
