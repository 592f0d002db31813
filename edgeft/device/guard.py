"""The promotion guard's rules: when a candidate adapter has regressed against its parent and the workstation's
adapter (DeviceTrainer.decide and its blend backoff, apply-update --check)."""

from __future__ import annotations

import math

EARLIER_LOSS = 0.10  # classify: the loss on earlier generations' held-out rows may rise by this share at most (section 10)
# classify: the loss on the bundle's reference rows may rise by this share at most, against the origin (tweets kept within 1
# point, section 10); a deployment moving to a visibly new domain, judged on accuracy, may allow more (section 12)
REFERENCE_LOSS = 0.05


def regressions(task: str, tol: float, metrics: dict, rows: dict, reference_loss: float = REFERENCE_LOSS) -> list[tuple[str, str, str]]:
    """(check set, "accuracy" or "loss", what got worse). Regressed = worse by more than the tolerance and, for accuracy, beyond
    chance: a one-sided sign test over the rows the two adapters disagree on (p < 0.05). A few hundred rows
    move by several points between equally good adapters; the test keeps that noise from blocking updates.
    The candidate must pass against its parent on every set and, on the bundle's reference rows,
    against the workstation's last adapter too (metrics["origin"]: generation 0 or the last update
    applied), so losses too small to see one generation at a time cannot add up. A classifier's loss may
    not rise by more than `reference_loss` on the reference rows (against the origin) nor by more than
    EARLIER_LOSS on earlier generations' held-out rows (the device's own domain, never trained on):
    forgetting, and a feed with wrong labels, show in the loss long before 128 rows' accuracy can."""
    key = "eval_loss" if task == "causal-lm" else "accuracy"
    worse = []
    against = [("baseline", name, "") for name in metrics["candidate"]]
    against += [("origin", name, " (against the workstation's adapter)") for name in metrics.get("origin", {})]
    for side, name, note in against:
        old, new = metrics[side][name][key], metrics["candidate"][name][key]
        if key == "accuracy":
            p = sign_test(rows[(side, name)], rows[("candidate", name)])
            if new < old - tol and p < 0.05:
                worse.append((name, key, f"{name} {key} {old:.4f} -> {new:.4f} (p={p:.3f}){note}"))
        elif new > old * (1 + tol):
            worse.append((name, "loss", f"{name} {key} {old:.4f} -> {new:.4f}{note}"))
    if key == "accuracy":
        ref_side = "origin" if "reference" in metrics.get("origin", {}) else "baseline"
        for name, side, limit in (("reference", ref_side, reference_loss), ("earlier", "baseline", EARLIER_LOSS)):
            old, new = metrics[side].get(name), metrics["candidate"].get(name)
            if old and new and new["eval_loss"] > old["eval_loss"] * (1 + limit):
                note = " (against the workstation's adapter)" if side == "origin" else ""
                worse.append((name, "loss", f"{name} eval_loss {old['eval_loss']:.4f} -> {new['eval_loss']:.4f} (more than {limit:.0%}){note}"))
    return worse


def sign_test(before: list[bool], after: list[bool]) -> float:
    """P(at least this many rows lost, of those that changed, if changes were coin flips)."""
    lost = sum(b and not a for b, a in zip(before, after))
    changed = lost + sum(a and not b for b, a in zip(before, after))
    return sum(math.comb(changed, k) for k in range(lost, changed + 1)) / 2**changed if changed else 1.0
