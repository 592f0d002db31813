"""Prove a bundle against torch, as optimum's validate_model_outputs does, plus training:
inference logits, loss, one step's gradients, and the parameters after one AdamW step.

Tolerances: all graphs compute in fp32 from bit-identical weights, so only the
order of floating-point accumulation differs (matmul blocking, fused kernels).
That bounds relative differences near 1e-6; we fail at 1e-4, which no real
divergence (a wrong weight, a missing op, a different optimizer) stays under.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from .device_model import LogitsGraph, LossGraph, sample_batch

TOLERANCE = 1e-4
# Constant folding would expand every packed weight to fp32 at session start (SmolLM2-135M:
# 7 GB and 36 s); unfolded, each weight is rebuilt when used and freed after.
INFERENCE_DISABLED_OPTIMIZERS = ["ConstantFolding"]
LR = 1e-3


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def validate_bundle(bundle: Path, model, task: str, tokenizer, labels, trainable: list[str], batch: int, seq: int, portable: dict) -> dict:
    import onnxruntime as ort
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    from ..stages import profile_mark

    ort.set_default_logger_severity(3)  # the training session warns about each unused exporter constant
    s = sample_batch(tokenizer, task, labels, batch, seq, seed=1)
    feeds = {k: v.numpy() for k, v in s.items()}
    # inference graph on stock-ORT API
    profile_mark("  validate: inference session + logits")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the exporter leaves unused shape constants; ORT warns about each
    session = ort.InferenceSession(str(bundle / "inference_model.onnx"), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=INFERENCE_DISABLED_OPTIMIZERS)
    logits_ort = session.run(None, {k: feeds[k] for k in ("input_ids", "attention_mask")})[0]
    profile_mark("  validate: torch logits")
    with torch.no_grad():
        logits_torch = LogitsGraph(model)(s["input_ids"], s["attention_mask"]).numpy()
    result = {"logits_max_abs": float(np.abs(logits_ort - logits_torch).max()), "logits_rel": _rel(logits_ort, logits_torch)}

    # training artifacts: eval loss, one train step's gradients, AdamW update
    profile_mark("  validate: ORT training Module, eval + train step")
    state = CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
    module = Module(str(bundle / "training_model.onnx"), state, str(bundle / "eval_model.onnx"), device="cpu")
    optimizer = Optimizer(str(bundle / "optimizer_model.onnx"), module)
    module.eval()
    loss_eval = float(module(feeds["input_ids"], feeds["attention_mask"], feeds["labels"]))
    module.train()
    loss_train = float(module(feeds["input_ids"], feeds["attention_mask"], feeds["labels"]))
    grads_ort = {n: np.array(state.parameters[n].grad) for n in trainable}

    profile_mark("  validate: torch forward + backward")
    graph = LossGraph(model, task).train()
    params = dict(graph.named_parameters())
    loss_torch = graph(s["input_ids"], s["attention_mask"], s["labels"])
    loss_torch.backward()
    loss_rel = lambda loss: abs(loss - loss_torch.item()) / max(abs(loss_torch.item()), 1e-30)  # noqa: E731
    flat_ort_grads = np.concatenate([grads_ort[n].ravel() for n in trainable])
    torch_grads = np.concatenate([params[n].grad.numpy().ravel() for n in trainable])
    result["loss_rel"], result["train_loss_rel"] = loss_rel(loss_eval), loss_rel(loss_train)
    result["grad_rel"] = _rel(flat_ort_grads, torch_grads)

    # the portable step (standard ops, stock ORT) against the same torch step
    from ..device.backends import AdamW, Layout, PortableBackend

    from types import SimpleNamespace

    profile_mark("  validate: portable step")
    manifest = SimpleNamespace(portable=portable, trainable=dict.fromkeys(trainable), target={})  # what the engines read; no manifest yet
    step = PortableBackend(bundle, manifest)
    start = {n: np.array(state.parameters[n].data) for n in trainable}
    step.set_params(start)
    result["portable_loss_rel"] = loss_rel(step.forward_backward(feeds))
    result["portable_grad_rel"] = _rel(step.take_grads(), torch_grads)
    adamw = AdamW(bundle, manifest, Layout({n: v.shape for n, v in start.items()}), start)
    adamw.update(flat_ort_grads, LR)
    del step

    profile_mark("  validate: AdamW (ORT, torch)")
    # The optimizer is checked on ORT's own gradients: Adam divides by |g|, so comparing after
    # torch's gradients would amplify 1e-10 gradient noise on near-zero entries into the update.
    optimizer.set_learning_rate(LR)
    optimizer.step()
    with torch.no_grad():
        for n in trainable:
            params[n].grad.copy_(torch.from_numpy(grads_ort[n]))
    torch.optim.AdamW([params[n] for n in trainable], lr=LR, eps=1e-8, weight_decay=0.0).step()
    after_ort = np.concatenate([np.array(state.parameters[n].data).ravel() for n in trainable])
    after_torch = np.concatenate([params[n].detach().numpy().ravel() for n in trainable])
    result["step_max_abs"] = float(np.abs(after_ort - after_torch).max())
    result["step_rel"] = float(np.abs(after_ort - after_torch).max() / LR)  # relative to the size of one update
    result["portable_step_rel"] = float(np.abs(adamw.params - after_torch).max() / LR)
    result["tolerance"] = TOLERANCE
    bad = {k: v for k, v in result.items() if k.endswith("_rel") and not v <= TOLERANCE}
    if bad:
        raise ExportError(f"bundle does not match the workstation model: {', '.join(f'{k}={v:.2e}' for k, v in bad.items())} "
                          f"(tolerance {TOLERANCE:g})", "please report this with the model and target; the bundle was not written")
    return result
