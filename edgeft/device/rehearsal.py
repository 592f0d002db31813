"""Learning without forgetting on the device: rehearsal and a pull toward the previous adapter. Torch-free.

**Rows.** Each generation trains on its new rows mixed with *replay* rows, and is checked on rows
it never trained on. Two sources, each split so that no row is both trained on and used to decide:

- the bundle's reference rows (`reference.jsonl`, a sample of the workstation's data): split
  deterministically by a hash of each row's content (`split_reference`): the `CHECK_SHARE` of
  them with the lowest hashes are *check* rows (the forgetting check, never trained on), the rest
  are *rehearsal* rows. The split depends only on the rows, not on their order, the seed or the
  generation, so the check rows are the same for every generation of a bundle;
- what earlier promoted generations saw, kept in the state folder within a size cap (state.py):
  a sample of their *training* rows (`replay.jsonl`, rehearsal) and of their *held-out* rows
  (`replay-check.jsonl`, the check: rows no generation ever trained on).

A row that appears on both sides (the same text twice) is dropped from rehearsal, so the two are
disjoint by construction.

**Batches.** With replay share ρ and batch B, micro-batch i holds k_i = ⌊(i+1)·B·ρ⌋ − ⌊i·B·ρ⌋
replay rows and B − k_i new rows, so any run of micro-batches has the configured share to within
one row. New rows are read in order from a stream of seeded per-epoch shuffles of the new data (the
workstation's `batch_order`), replay rows from a stream of seeded per-pass shuffles of the replay
pool; a generation lasts until the new rows have been seen `epochs` times. Every batch is a pure
function of (seed, index), so a killed job resumes bit for bit. With ρ = 0 or no replay rows the
device batches exactly as before (encode.micro_batch_ids).

**Penalty.** `l2_previous` (λ) adds λ·(w − w_prev) to the gradient before the AdamW step: the
gradient of λ/2·‖w − w_prev‖², a pull toward the parent generation's adapter (L2-SP).

**Blend.** The promoted candidate is not the trained adapter itself but the parent + β·(trained −
parent), tensor by tensor (weight-space ensembling, as WiSE-FT does for a fine-tuned model and its
start). Training moves the adapter a long way to fit the new rows; half that move keeps most of what
was learned and most of what was known (BENCHMARKS.md section 10: on the first review generation,
β = 0.5 kept 81% of the gain on reviews and lost nothing on tweets, where β = 1 lost 2.9 points).
LoRA's A and B are blended separately, so the product B·A is blended only to first order in the
move; the measurement is what justifies it.

**Frozen head.** `freeze_head` keeps the tensors that are not LoRA matrices (a classifier head
trained in full, PEFT's modules_to_save) at the parent's values: their gradient is zeroed and the
values are put back after each AdamW step. A device's data rarely has the workstation's label mix
(a new domain may lack a class entirely), and a trainable head's bias follows the label mix first:
the cheapest way to fit the new rows, and the way that costs the old ones most.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random

import numpy as np

CHECK_SHARE = 0.5  # of the bundle's reference rows: the forgetting check; the rest are rehearsed


def row_key(row: dict) -> str:
    """A row's identity: the sha256 of its canonical JSON (so equal rows are one row)."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def split_reference(rows: list[dict], share: float = CHECK_SHARE) -> tuple[list[dict], list[dict]]:
    """(rehearsal, check): the round(share·n) distinct rows with the lowest content hashes are the
    check rows (at least one when there are any rows); every copy of a check row stays out of rehearsal."""
    distinct = sorted({row_key(r) for r in rows})
    n_check = min(len(distinct), max(1, round(share * len(distinct)))) if distinct else 0
    check_keys = set(distinct[:n_check])
    check, rehearsal, seen = [], [], set()
    for r in rows:
        k = row_key(r)
        if k in check_keys:
            if k not in seen:
                check.append(r)
                seen.add(k)
        else:
            rehearsal.append(r)
    return rehearsal, check


def disjoint(rehearsal: list[dict], *checks: list[dict]) -> list[dict]:
    """The rehearsal rows that are in none of the check sets."""
    banned = {row_key(r) for rows in checks for r in rows}
    return [r for r in rehearsal if row_key(r) not in banned]


# -- batches -------------------------------------------------------------------

def replay_before(index: int, batch: int, ratio: float) -> int:
    """Replay rows in micro-batches 0 .. index-1."""
    return math.floor(index * batch * ratio + 1e-9)


@functools.lru_cache(maxsize=8)
def _order(n: int, seed: str) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return tuple(order)


def _stream(n: int, start: int, count: int, seed: str) -> list[int]:
    """Positions start .. start+count-1 of the endless stream of seeded shuffles of range(n)."""
    out = []
    for q in range(start, start + count):
        rnd, pos = divmod(q, n)
        out.append(_order(n, f"{seed}:{rnd}")[pos])
    return out


def mixed_batch_ids(n_new: int, n_replay: int, batch: int, ratio: float, seed: int, index: int) -> tuple[list[int], list[int]]:
    """(new row ids, replay row ids) of micro-batch `index`."""
    before, through = replay_before(index, batch, ratio), replay_before(index + 1, batch, ratio)
    k = through - before
    new_start = index * batch - before
    return _stream(n_new, new_start, batch - k, f"new:{seed}"), _stream(n_replay, before, k, f"replay:{seed}")


def mixed_micro_batches(n_new: int, batch: int, ratio: float, epochs: float) -> int:
    """Micro-batches until the new rows have been seen `epochs` times (at least one)."""
    want = max(1, math.ceil(round(epochs * n_new, 9)))
    m = max(1, math.floor(want / (batch * (1 - ratio))) - 1)
    while m * batch - replay_before(m, batch, ratio) < want:
        m += 1
    return m


# -- penalty -------------------------------------------------------------------

def pull_to_previous(grads: np.ndarray, params: np.ndarray, previous: np.ndarray, strength: float) -> np.ndarray:
    """grads + λ·(w − w_prev): the gradient of the data loss plus λ/2·‖w − w_prev‖²."""
    if not strength:
        return grads
    return grads + np.float32(strength) * (params - previous)


def head_slices(offsets: dict, trainable: dict) -> list[tuple[int, int]]:
    """(start, end) in the flat vector of every trainable tensor that is not a LoRA matrix."""
    return [offsets[name] for name, key in trainable.items() if "lora_A" not in key and "lora_B" not in key]


def blend(previous: dict, trained: dict, weight: float) -> dict:
    """previous + weight·(trained − previous) for every tensor (weight 1: the trained adapter as is)."""
    if weight == 1:
        return trained
    w = np.float32(weight)
    return {k: (previous[k] + w * (v - previous[k])).astype(np.float32) for k, v in trained.items()}
