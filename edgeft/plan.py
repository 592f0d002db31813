"""Device memory plan for on-device training, before anything is exported. Torch-free.

Peak RSS on the device is estimated as
  packed base (the scheme's bytes per parameter)
+ fp32 weights: a small base (under HOLD_BASE_MIB in fp32) is held from forward to backward;
  a larger one is rebuilt from its codes where each weight is used and dropped after, so what
  counts is the largest weight rebuilt, twice (forward, backward): the embedding is looked up on
  its packed rows and the head projected chunk by chunk (VOCAB_CHUNK_BYTES), so it is a layer's
  weight or a chunk, not a vocabulary-sized tensor
+ trainable parameters x 4 copies (value, gradient, AdamW m and v), fp32
+ activations kept for backward at the target's batch x sequence length
+ the runtime itself (ONNX Runtime, Python, numpy, tokenizers).
It is deliberately conservative; `edgeft device train` reports the measured peak beside it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import PlanError  # defined in errors.py (the one exit-code table)

RUNTIME_MIB = 160  # measured: python + onnxruntime + numpy + tokenizers, idle
# Below this fp32 size the base is rebuilt once per session and held (MiniLM, 87 MiB: rebuilding
# it in every step is time a small model notices); above it, rebuilt where each weight is used,
# in the step and again in its backward pass (SmolLM2, 513 MiB: otherwise the largest item of
# the step's peak). See edgeft.workstation.portable_memory.
HOLD_BASE_MIB = 256
MIB = 1 << 20
# A large base's steps project onto the vocabulary in chunks of at most this many fp32 bytes of the
# head (edgeft.workstation.vocab_chunks), as a power-of-two row count of at least VOCAB_MIN_ROWS.
# A large base's step allocates a buffer for every weight it rebuilds and every temporary, freed
# after use; the allocator keeps a high-water mark above the tensors alive at any moment. Bundles
# exported before each rebuild waited for its layer (edgeft.workstation.portable_memory.gate_rebuilds)
# rebuilt every weight at the step's start: 0.75 x the activations + 100 MiB, fitted to Qwen2.5-0.5B
# (4 x 128, 2 x 128) and SmolLM2-135M (1 x 64); their manifests keep that figure. With the gates,
# measured on SmolLM2-135M at 1 x 64 (whole `device train`: 395 MiB, BENCHMARKS.md section 5):
ARENA_PER_ACTIVATION = 0.25
ARENA_FIXED_MIB = 25
VOCAB_CHUNK_BYTES = 32 * MIB
VOCAB_MIN_ROWS = 1024
# `device eval` of a causal LM: at 4 x 256 SmolLM2's 192 MiB of logits and the activations behind them
# took the process to 1744 MiB; one row at a time, 533 (BENCHMARKS.md section 5), in about the same time
INFER_LOGITS_BYTES = 64 * MIB


def vocab_chunk_rows(vocab: int, hidden: int, chunk_bytes: int = VOCAB_CHUNK_BYTES, min_rows: int = VOCAB_MIN_ROWS) -> int:
    rows = max(min_rows, chunk_bytes // (4 * hidden))
    return min(vocab, 1 << (rows.bit_length() - 1))


class _Budgeted:
    """A plan's total against its budget (both plans share the verdict and the JSON)."""

    @property
    def fits(self) -> bool:
        return self.total_mib <= self.budget_mib

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


@dataclass
class MemoryPlan(_Budgeted):
    target: str
    budget_mib: int
    base_packed_mib: float
    base_rebuilt_mib: float
    trainable_mib: float
    activations_mib: float
    runtime_mib: float
    total_mib: float
    batch: int
    seq: int
    holds_base: bool = False
    # the model's dimensions, so the device can plan the rest of its process (plan_process)
    task: str = ""
    vocab: int = 0
    hidden: int = 0
    layers: int = 0
    vocab_chunk_rows: int = 0  # 0: the steps project onto the whole vocabulary at once
    # forward passes: the eval step at the training batch (the promotion check of a causal LM) and the
    # inference graph at its evaluation batch and the bundle's sequence length (`device eval`)
    eval_activations_mib: float = 0.0
    inference_activations_mib: float = 0.0
    inference_batch: int = 0
    inference_rebuilt_mib: float = 0.0  # the inference graph rebuilds the head whole
    arena_mib: float = 0.0  # the allocator's high-water mark above the live tensors (a large base)
    measured_step_mib: dict | None = None  # {"fast", "lean"}: the step measured at export (edgeft.device.step_probe)

    def with_measured(self, measured: dict | None) -> MemoryPlan:
        """This plan with the step export measured: its total takes the larger of the formula and the measurement."""
        fixed = self.total_mib - step_transient_mib(asdict(self), lean=False)
        plan = replace(self, measured_step_mib=measured)
        return replace(plan, total_mib=fixed + step_transient_mib(asdict(plan), lean=False))

    def render(self) -> str:
        rebuilt = "fp32 base held for backward" if self.holds_base else "fp32 weights rebuilt at the peak"
        rows = [("packed base", self.base_packed_mib), (rebuilt, self.base_rebuilt_mib),
                ("trainable params + grads + AdamW", self.trainable_mib), (f"activations ({self.batch} x {self.seq})", self.activations_mib),
                ("runtime", self.runtime_mib), ("total (estimated peak)", self.total_mib)]
        if self.arena_mib:
            rows.insert(-2, ("allocator high-water (measured)", self.arena_mib))
        d = asdict(self)
        above = step_transient_mib(d, lean=False) - step_transient_mib(d, lean=False, measured=False)
        if above > 0:
            rows.insert(-2, ("step measured at export: above these", above))
        lines = [f"memory plan for {self.target} (budget {self.budget_mib} MiB)"]
        lines += [f"  {name:<36}{mib:>9.0f} MiB" for name, mib in rows]
        if self.fits:
            lines.append("  fits")
        elif self.fits_lean:
            lines.append(f"  fits without ONNX Runtime's arena ({self.lean_total_mib:.0f} MiB): device train runs lean")
        else:
            lines.append(f"  does NOT fit: {self.total_mib - self.budget_mib:.0f} MiB over budget")
        return "\n".join(lines)

    @property
    def fits_lean(self) -> bool:
        """Whether it fits without the arena's high-water mark (device train then runs lean: plan_process)."""
        return self.lean_total_mib <= self.budget_mib

    @property
    def lean_total_mib(self) -> float:
        d = asdict(self)
        return self.total_mib - step_transient_mib(d, lean=False) + step_transient_mib(d, lean=True)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "fits_lean": self.fits_lean}


def step_transient_mib(step: dict, lean: bool, measured: bool = True) -> float:
    """What a training step holds above the loaded engine (a MemoryPlan's dict): the formula's rebuilt
    weights and activations, plus the arena's high-water mark unless lean, or what export measured
    where that is more (unless `measured` is False: the formula alone)."""
    formula = step["base_rebuilt_mib"] + step["activations_mib"] + (0.0 if lean else step.get("arena_mib", 0.0))
    return max(formula, (step.get("measured_step_mib") or {}).get("lean" if lean else "fast", 0.0) if measured else 0.0)


def safetensors_numel(path: Path) -> int:
    """Parameter count from the safetensors header alone (8-byte length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for key, entry in header.items():
        if key != "__metadata__":
            size = 1
            for d in entry["shape"]:
                size *= d
            total += size
    return total


def device_shape(target, trained_seq: int | None, batch: int | None = None, seq: int | None = None) -> tuple[int, int]:
    """Device batch x sequence: the target's, with the sequence capped at what training used."""
    return batch or target.batch_size, seq or min(target.max_seq_len, trained_seq or target.max_seq_len)


def plan_memory(model_dir: Path, adapter_dir: Path, target, task: str, batch: int, seq: int, vocab_chunked: bool = True) -> MemoryPlan:
    """vocab_chunked: a large base's steps look the embedding up on packed rows and project onto the
    vocabulary in chunks (what export makes of every architecture it recognizes; it plans again with
    False when it could not)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    base = sum(safetensors_numel(p) for p in Path(model_dir).glob("*.safetensors"))
    trainable = safetensors_numel(Path(adapter_dir) / "adapter_model.safetensors")
    hidden = cfg.get("hidden_size") or cfg.get("dim", 768)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layers", 12)
    inter = cfg.get("intermediate_size") or cfg.get("hidden_dim", 4 * hidden)
    heads = cfg.get("num_attention_heads") or cfg.get("n_heads", 12)
    vocab = cfg.get("vocab_size", 32000)
    tokens = batch * seq
    holds = base * 4 / MIB < HOLD_BASE_MIB
    chunk = vocab_chunk_rows(vocab, hidden) if vocab_chunked and not holds and task == "causal-lm" else 0
    # kept per layer and token (SmolLM2, measured): ~8-10 hidden-sized and 2 intermediate-sized fp32
    # tensors (the backward pass recomputes the rest), plus the attention probabilities
    activations = layers * (tokens * (10 * hidden + 2 * inter) + batch * heads * seq * seq) * 4
    if task == "causal-lm":  # at most every position: log-probabilities, softmax, gradient (chunked: a chunk's logits, exp, two temporaries)
        activations += tokens * (chunk * 4 if chunk else vocab * 3) * 4
    infer_batch = inference_batch(task, batch, seq, vocab)
    forward = forward_activations(task, batch, seq, hidden, inter, heads, chunk or vocab, labelled_only=True)
    inference = forward_activations(task, infer_batch, seq, hidden, inter, heads, vocab, labelled_only=False)
    # the largest weight rebuilt whole: the head unless chunked (an embedding is looked up on its packed rows)
    largest = max(inter, chunk) * hidden if chunk or task != "causal-lm" else max(vocab, inter) * hidden
    parts = {
        "base_packed_mib": base * target.scheme.bytes_per_param / MIB,
        "base_rebuilt_mib": (base if holds else 2 * largest) * 4 / MIB,
        "trainable_mib": trainable * 4 * 4 / MIB,
        "activations_mib": activations / MIB,
        "runtime_mib": float(RUNTIME_MIB),
        "arena_mib": 0.0 if holds else ARENA_PER_ACTIVATION * activations / MIB + ARENA_FIXED_MIB,
    }
    return MemoryPlan(target=target.name, budget_mib=target.budget_mb, total_mib=sum(parts.values()), batch=batch, seq=seq, holds_base=holds,
                      task=task, vocab=vocab, hidden=hidden, layers=layers, vocab_chunk_rows=chunk, eval_activations_mib=round(forward / MIB, 1),
                      inference_activations_mib=round(inference / MIB, 1), inference_batch=infer_batch,
                      inference_rebuilt_mib=round((base if holds else 2 * largest) * 4 / MIB, 1),
                      **{k: round(v, 1) for k, v in parts.items()})


def image_activations(config: dict, batch: int, size: int) -> tuple[float, float]:
    """(bytes kept for backward, bytes of the largest forward layer) of an EfficientNet-Lite step on
    batch x 3 x size x size images, from the block list in the model's config.json. Per block the
    backward pass keeps, in fp32: the block input, the expansion's conv, BN and ReLU6 outputs at the
    input resolution, the depthwise conv, BN and ReLU6 outputs and the projection's two outputs at
    the output resolution; the stem and the head conv likewise."""
    hw = (size // 2) ** 2  # after the stride-2 stem
    stem = config.get("stem", 32)
    kept = 3 * size * size + 3 * stem * hw
    largest = 3 * stem * hw
    for k, stride, expand, cin, cout in config["blocks"]:
        mid = cin * expand
        out_hw = hw // (stride * stride)
        block = cin * hw + (3 * mid * hw if expand != 1 else 0) + 3 * mid * out_hw + 2 * cout * out_hw
        kept += block
        largest = max(largest, block)
        hw = out_hw
    kept += 3 * config.get("head", 1280) * hw
    return kept * batch * 4.0, largest * batch * 4.0


def plan_image_memory(model_dir: Path, adapter_dir: Path, target, batch: int, size: int, n_labels: int) -> MemoryPlan:
    """plan_memory for an image backbone: the same parts, activations from the image size. The
    gradients of the kept activations live at most a block at a time (counted twice, for the
    backward pass's own temporaries)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    base = sum(safetensors_numel(p) for p in Path(model_dir).glob("*.safetensors"))
    trainable = safetensors_numel(Path(adapter_dir) / "adapter_model.safetensors")
    kept, largest = image_activations(cfg, batch, size)
    infer_batch = inference_batch("classify", batch)
    parts = {
        "base_packed_mib": base * target.scheme.bytes_per_param / MIB,
        "base_rebuilt_mib": base * 4 / MIB,  # a 4.65M-parameter base is rebuilt once per session and held
        "trainable_mib": trainable * 4 * 4 / MIB,
        "activations_mib": (kept + 2 * largest) / MIB,
        "runtime_mib": float(RUNTIME_MIB),
    }
    return MemoryPlan(target=target.name, budget_mib=target.budget_mb, total_mib=sum(parts.values()), batch=batch, seq=size, holds_base=True,
                      task="image-classify", vocab=n_labels, hidden=cfg.get("head", 1280), layers=len(cfg["blocks"]),
                      eval_activations_mib=round(2 * largest / MIB, 1),
                      inference_activations_mib=round(2 * image_activations(cfg, infer_batch, size)[1] / MIB, 1), inference_batch=infer_batch,
                      **{k: round(v, 1) for k, v in parts.items()})


def inference_batch(task: str, train_batch: int, seq: int = 0, vocab: int = 0) -> int:
    """The batch `edgeft device eval` runs the inference graph at (edgeft.device.infer.Predictor): a
    causal LM's graph returns (batch, seq, vocab) fp32 logits, so as many rows as keep them under
    INFER_LOGITS_BYTES (one row for SmolLM2 or Qwen2.5 at 256 tokens), never more than the training batch."""
    if task != "causal-lm":
        return 16
    return max(1, min(train_batch, INFER_LOGITS_BYTES // max(1, seq * vocab * 4))) if seq and vocab else train_batch


def forward_activations(task: str, batch: int, seq: int, hidden: int, inter: int, heads: int, vocab: int, labelled_only: bool) -> float:
    """Bytes a forward pass holds at once: a layer's temporaries (nothing is kept for a backward
    pass), and for a causal LM the logits: at labelled positions only in the eval step, at every
    position in the inference graph, where numpy's log-probabilities copy them twice more."""
    tokens = batch * seq
    layer = (tokens * (6 * hidden + 3 * inter) + 2 * batch * heads * seq * seq) * 4
    if task == "causal-lm":
        layer += tokens * vocab * 4 * (3 if labelled_only else 4)
    return layer


def check_plan(plan: MemoryPlan, force: bool, log=print) -> None:
    if plan.fits:
        return
    if plan.fits_lean:
        log(f"note: on {plan.target} the step fits its {plan.budget_mib} MiB budget only without ONNX Runtime's arena "
            f"({plan.lean_total_mib:.0f} MiB planned): device train will run lean there")
        return
    message = (f"training on {plan.target} needs about {plan.total_mib:.0f} MiB, over its {plan.budget_mib} MiB budget")
    hint = (f"lower the sequence length (--seq {max(8, plan.seq // 2)}) or batch (--batch {max(1, plan.batch // 2)}), "
            "pick a smaller scheme or model, or pass --force to export anyway")
    if not force:
        raise PlanError(message, hint)
    log(f"warning: {message} (--force given)")


# -- the whole device process ----------------------------------------------------
# Measured (RSS after loading, tokenizers 0.2x): a parsed tokenizer holds 15-30x its tokenizer.json
# (MiniLM 0.47 MB -> 14 MiB, SmolLM2 3.5 MB -> 52 MiB, Gemma-3 14.4 MB -> 382 MiB); rows read and
# encoded hold 19-52x their file (GSM8K chat 0.66 MB -> 12 MiB, short sentiment rows 0.38 MB -> 20 MiB).
TOKENIZER_PER_BYTE = 30
DATA_PER_BYTE = 64


@dataclass
class ProcessPlan(_Budgeted):
    """Peak RSS of a whole `edgeft device train` / `device eval` process: the bundle's step plan
    (made at export, MemoryPlan) and what the device adds: the tokenizer, the rows, and the forward
    passes of the promotion check or the evaluation, which reuse the memory the step freed."""

    command: str
    target: str
    budget_mib: int
    parts: dict
    total_mib: float
    step_mib: float | None = None
    memory: str = "fast"  # the allocator it plans for: ONNX Runtime's arena, or lean (edgeft.device.runtime.lean_memory)

    def render(self) -> str:
        lean = ", lean allocator: no arena" if self.memory == "lean" else ""
        lines = [f"memory plan of `edgeft {self.command}` on {self.target} (budget {self.budget_mib} MiB{lean})"]
        lines += [f"  {name:<44}{mib:>9.0f} MiB" for name, mib in self.parts.items()]
        lines.append(f"  {'total (estimated peak)':<44}{self.total_mib:>9.0f} MiB")
        lines.append("  fits" if self.fits else f"  does NOT fit: {self.total_mib - self.budget_mib:.0f} MiB over budget")
        return "\n".join(lines)


def file_bytes(*paths) -> int:
    """Bytes of the files that exist among `paths`; a gzip file counts as its uncompressed size."""
    total = 0
    for p in paths:
        if p is None or not Path(p).is_file():
            continue
        p = Path(p)
        if p.suffix == ".gz":
            with open(p, "rb") as f:
                f.seek(-4, 2)
                total += struct.unpack("<I", f.read(4))[0]  # gzip's ISIZE: the uncompressed size mod 2^32
        else:
            total += p.stat().st_size
    return total


def plan_process(manifest, bundle: Path, command: str, data_bytes: int, memory: str | None = None) -> ProcessPlan | None:
    """The plan of a `device train` (training step, then the promotion check) or `device eval`
    process from the bundle's step plan, or None for a bundle exported without one.

    train: runtime + packed base + trainable x 4 (values, gradients, AdamW moments) + the larger of
      the step's transient memory (fp32 weights rebuilt or held, activations kept for backward) and
      the check's (a causal LM: the training engine's eval step at the training batch; a classifier:
      one inference session at its batch, built once the engine is freed), + rows. The tokenizer is
      not counted: it is dropped once every row is encoded, before the engine is built.
    eval: runtime + packed base + one copy of the trainable weights + the inference graph's rebuilt
      weights and forward pass + tokenizer + rows.
    A bundle exported before the forward passes were planned counts the step's activations for them.
    memory: "fast" (ONNX Runtime's arena: the step plan's allocator high-water is counted), "lean" (no
    arena: not counted), or None: fast unless that plan is over the budget (device train only).
    A step export measured (step_probe) counts for what it measured where that is more than the formula."""
    step = getattr(manifest, "memory_plan", None) or {}
    if not step:
        return None
    bundle = Path(bundle)
    task = manifest.task
    tokenizer = file_bytes(bundle / "tokenizer" / "tokenizer.json", bundle / "tokenizer" / "tokenizer.json.gz") * TOKENIZER_PER_BYTE / MIB
    rows = max(8.0, data_bytes * DATA_PER_BYTE / MIB)
    rebuilt = step["base_rebuilt_mib"]
    eval_act = step.get("eval_activations_mib") or step["activations_mib"]
    infer_act = step.get("inference_activations_mib") or step["activations_mib"]
    parts = {"runtime": step["runtime_mib"], "packed base": step["base_packed_mib"]}
    if memory is None and command == "device train":  # lean when the arena would not fit
        fast = plan_process(manifest, bundle, command, data_bytes, "fast")
        return fast if fast.fits else plan_process(manifest, bundle, command, data_bytes, "lean")
    if command == "device train":
        parts["trainable params + grads + AdamW"] = step["trainable_mib"]
        step_peak = step_transient_mib(step, lean=memory == "lean")
        check = rebuilt + (eval_act if task == "causal-lm" else infer_act)
        parts[f"training step ({step['batch']} x {step['seq']}): weights + activations"] = step_peak
        if check > step_peak:
            parts["promotion check: above the step's peak"] = check - step_peak
    else:
        parts["trainable params"] = step["trainable_mib"] / 4
        batch = step.get("inference_batch") or step["batch"]
        parts[f"inference ({batch} x {manifest.max_seq_len}): weights + activations"] = step.get("inference_rebuilt_mib", rebuilt) + infer_act
    if command != "device train":  # device train drops the tokenizer once the rows are encoded, before the engine is built
        parts["tokenizer"] = tokenizer
    parts["rows"] = rows
    parts = {k: round(v, 1) for k, v in parts.items()}
    return ProcessPlan(command=command, target=step.get("target", ""), budget_mib=int(step["budget_mib"]), parts=parts,
                       total_mib=round(sum(parts.values()), 1), step_mib=round(step["total_mib"], 1), memory=memory or "fast")


def refuse_over_budget(plan: ProcessPlan | None, force: bool, log=print) -> None:
    """Before a device process starts its work: refused (exit 9) when its plan is over the budget, unless --force."""
    if plan is None or plan.fits:
        return
    message = (f"`edgeft {plan.command}` on this bundle needs about {plan.total_mib:.0f} MiB, over the {plan.budget_mib} MiB "
               f"budget of {plan.target}\n{plan.render()}")
    if not force:
        raise PlanError(message, "re-export the bundle with a smaller --batch/--seq, or pass --force to run anyway")
    log(f"warning: {message}\n(--force given)")
