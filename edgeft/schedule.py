"""One optimizer step, defined once for the workstation and the device. Torch-free.

Both trainers (edgeft.workstation.train and edgeft.device.trainer) call these functions, so a
device generation is scheduled and batched by the same rules the workstation trained with:

- **Micro-batches.** Each epoch the rows are shuffled by (seed, epoch) and cut into micro-batches
  of `batch` rows; the last one may be short (a device shard smaller than a batch still trains).
  With `world` processes, micro-batches are dealt round-robin, and a final round that cannot give
  every process one is left out. Global micro-batch `index` -> rows: `encode.micro_batch_ids`.
- **Steps.** One optimizer step consumes `grad_accum` consecutive micro-batches (crossing into the
  next epoch when an epoch's micro-batches do not divide evenly). `total_steps`: `--max-steps`, or
  enough steps to see `epochs` epochs of micro-batches, rounded up.
- **Loss.** The step's loss is the mean of its micro-batch losses, each the mean over that
  micro-batch (its rows for classification, its labelled tokens for causal LMs); the gradient is
  the gradient of that mean (with DDP, also averaged over processes). A short micro-batch counts
  as much as a full one.
- **Learning rate.** `lr_at`: a linear warmup over `warmup_steps` steps reaching the peak on its
  last step, then cosine or linear decay towards 0 over the remaining steps, or constant.
  The bundle's manifest records the schedule (`name`, `warmup_ratio`) of the run it was exported
  from; the device applies it to each generation's own step count.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")
DEFAULT = {"name": "cosine", "warmup_ratio": 0.06}


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """warmup_ratio x total, rounded to the nearest step (halves up), at most `total`;
    0 when the ratio is 0."""
    return min(total, math.floor(warmup_ratio * total + 0.5))


def lr_at(step: int, total: int, peak: float, name: str = DEFAULT["name"], warmup_ratio: float = DEFAULT["warmup_ratio"]) -> float:
    """Learning rate of step `step` (0-based) of `total`."""
    if name not in SCHEDULES:
        from .errors import UsageError

        raise UsageError(f"unknown learning-rate schedule {name!r}", f"use one of {', '.join(SCHEDULES)}")
    warmup = warmup_steps(total, warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    if name == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress)


def total_steps(batches_per_epoch: int, grad_accum: int, epochs: float, max_steps: int | None = None) -> int:
    """`max_steps`, or the steps that cover `epochs` epochs of micro-batches (rounded up, at least 1)."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(round(epochs * batches_per_epoch / grad_accum, 9)))
