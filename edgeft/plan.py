"""Device memory plan for on-device training, before anything is exported. Torch-free.

Peak RSS on the device is estimated as
  packed base (the scheme's bytes per parameter)
+ fp32 weights: a small base (under HOLD_BASE_MIB in fp32) is held from forward to backward;
  a larger one is rebuilt from its codes where each weight is used and dropped after, so what
  counts is the largest weight (the tied embedding), held twice around the loss
+ trainable parameters x 4 copies (value, gradient, AdamW m and v), fp32
+ activations kept for backward at the target's batch x sequence length
+ the runtime itself (ONNX Runtime, Python, numpy, tokenizers).
It is deliberately conservative; `edgeft device train` reports the measured peak beside it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PlanError  # defined in errors.py (the one exit-code table)

RUNTIME_MIB = 160  # measured: python + onnxruntime + numpy + tokenizers, idle
# Below this fp32 size the base is rebuilt once per session and held (MiniLM, 87 MiB: rebuilding
# it in every step is time a small model notices); above it, rebuilt where each weight is used,
# in the step and again in its backward pass (SmolLM2, 513 MiB: otherwise the largest item of
# the step's peak). See edgeft.workstation.portable_memory.
HOLD_BASE_MIB = 256
MIB = 1 << 20


@dataclass
class MemoryPlan:
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

    @property
    def fits(self) -> bool:
        return self.total_mib <= self.budget_mib

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}

    def render(self) -> str:
        rebuilt = "fp32 base held for backward" if self.holds_base else "fp32 weights rebuilt at the peak"
        rows = [("packed base", self.base_packed_mib), (rebuilt, self.base_rebuilt_mib),
                ("trainable params + grads + AdamW", self.trainable_mib), (f"activations ({self.batch} x {self.seq})", self.activations_mib),
                ("runtime", self.runtime_mib), ("total (estimated peak)", self.total_mib)]
        lines = [f"memory plan for {self.target} (budget {self.budget_mib} MiB)"]
        lines += [f"  {name:<36}{mib:>9.0f} MiB" for name, mib in rows]
        lines.append("  fits" if self.fits else f"  does NOT fit: {self.total_mib - self.budget_mib:.0f} MiB over budget")
        return "\n".join(lines)


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


def plan_memory(model_dir: Path, adapter_dir: Path, target, task: str, batch: int, seq: int) -> MemoryPlan:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    base = sum(safetensors_numel(p) for p in Path(model_dir).glob("*.safetensors"))
    trainable = safetensors_numel(Path(adapter_dir) / "adapter_model.safetensors")
    hidden = cfg.get("hidden_size") or cfg.get("dim", 768)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layers", 12)
    inter = cfg.get("intermediate_size") or cfg.get("hidden_dim", 4 * hidden)
    heads = cfg.get("num_attention_heads") or cfg.get("n_heads", 12)
    vocab = cfg.get("vocab_size", 32000)
    tokens = batch * seq
    # kept per layer and token (SmolLM2, measured): ~8-10 hidden-sized and 2 intermediate-sized fp32
    # tensors (the backward pass recomputes the rest), plus the attention probabilities
    activations = layers * (tokens * (10 * hidden + 2 * inter) + batch * heads * seq * seq) * 4
    if task == "causal-lm":
        activations += tokens * vocab * 4 * 3  # log-probabilities, softmax, gradient; at most every position
    holds = base * 4 / MIB < HOLD_BASE_MIB
    parts = {
        "base_packed_mib": base * target.scheme.bytes_per_param / MIB,
        "base_rebuilt_mib": (base if holds else 2 * vocab * hidden) * 4 / MIB,
        "trainable_mib": trainable * 4 * 4 / MIB,
        "activations_mib": activations / MIB,
        "runtime_mib": float(RUNTIME_MIB),
    }
    return MemoryPlan(target=target.name, budget_mib=target.budget_mb, total_mib=sum(parts.values()), batch=batch, seq=seq, holds_base=holds,
                      **{k: round(v, 1) for k, v in parts.items()})


def check_plan(plan: MemoryPlan, force: bool, log=print) -> None:
    if plan.fits:
        return
    message = (f"training on {plan.target} needs about {plan.total_mib:.0f} MiB, over its {plan.budget_mib} MiB budget")
    hint = (f"lower the sequence length (--seq {max(8, plan.seq // 2)}) or batch (--batch {max(1, plan.batch // 2)}), "
            "pick a smaller scheme or model, or pass --force to export anyway")
    if not force:
        raise PlanError(message, hint)
    log(f"warning: {message} (--force given)")
