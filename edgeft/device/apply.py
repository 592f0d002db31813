"""`edgeft device apply-update`: a workstation adapter becomes a new generation. Torch-free.

Checks, in order, before the state is touched: every file of the update against its sha256
(tampering names the file), then that the update is for this bundle: base fingerprint first (the
clearest reason), task, labels, scheme, LoRA configuration, the bundle it was checked against
(sha256 of manifest.json: the workstation proved the update on that bundle's inference graph),
and the tensors themselves (names, shapes, fp32, finite). Any of these refuses with exit 8 and
changes nothing.

Then, under the state lock, one new generation: weights renamed into place first, state.json
second (state.py), so a kill at any moment leaves the device on its previous generation, at worst
with an orphan weights file that the next apply overwrites. Its parent is the current generation,
so `edgeft device rollback PARENT` undoes it.

Promotion. An update is promoted without the regression check `device train` runs, by default:
the check guards against what the device learns unsupervised from its own data, while an update
is a decision taken on the workstation, evaluated there on the run's validation data and proven
there to compute the same logits as this bundle. Gating it on each device's own replay sample
would let a fleet split unpredictably between the old and the new adapter. `--check` runs the
device train comparison anyway (reference rows, replay rows, --eval-data, --tolerance) and keeps
a regressing update as `rejected`, for operators who want the device's guard as well.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import BundleError, StateError, UsageError
from ..update import update_bytes
from .state import DeviceState

REASON = "update from the workstation"


def check_update(state: DeviceState, folder: Path) -> tuple[object, str, dict]:
    """(update manifest, its sha256, weights by ONNX name) once the update is proven to be for this bundle."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from ..update import WEIGHTS, bundle_identity, bundle_shapes, mismatches, read_lora_signature, verify_update

    folder = Path(folder)
    upd, upd_sha = verify_update(folder)
    m = state.manifest
    want = bundle_shapes(state.bundle, m)
    reasons = mismatches(base=upd.base, task=upd.task, labels=upd.labels, scheme=upd.scheme, lora=upd.lora,
                         shapes={n: tuple(t.get("shape") or ()) for n, t in upd.trainable.items()}, manifest=m,
                         bundle_shapes=want, bundle_lora=read_lora_signature(state.bundle / "adapter"))
    names = {n: t.get("peft_key") for n, t in upd.trainable.items()}
    if not reasons and names != dict(m.trainable):
        reasons.append("its tensors map to other PEFT keys than the bundle's")
    if not reasons and upd.bundle.get("manifest_sha256") != bundle_identity(state.bundle):
        reasons.append(f"it was checked against another bundle ({upd.bundle.get('target')}, created {upd.bundle.get('created')}), "
                       f"not this one ({m.target_name}, created {m.created})")
    if reasons:
        raise BundleError(f"the update {folder} is not for the bundle {state.bundle}: " + "; ".join(reasons) + "; nothing was changed",
                          f"make the update on the workstation with `edgeft export --run RUN --update-for` this bundle "
                          f"(base {m.base.name}), or install the bundle it was made for")
    try:
        weights = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"update file {WEIGHTS} is unreadable ({e})", "copy the update again from the workstation") from None
    bad = sorted(set(weights) ^ set(want)) or sorted(n for n, w in weights.items() if w.dtype != np.float32 or tuple(w.shape) != want[n])
    if bad:
        raise BundleError(f"update file {WEIGHTS} does not hold the bundle's trainable tensors as fp32 (first: {bad[0]}); nothing was changed",
                          "make the update again")
    nonfinite = next((n for n, w in weights.items() if not np.isfinite(w).all()), None)
    if nonfinite:
        raise BundleError(f"update file {WEIGHTS}: {nonfinite} holds NaN or infinite values; nothing was changed", "make the update again")
    return upd, upd_sha, weights


def apply_update(state: DeviceState, folder: Path, check: bool = False, eval_data: Path | None = None, tolerance: float = 0.01,
                 discard_interrupted: bool = False, dry_run: bool = False, log=print) -> dict:
    t0 = time.perf_counter()
    folder = Path(folder)
    if eval_data and not check:
        raise UsageError("--eval-data is for --check", "add --check to compare the update with the current generation on those rows")
    upd, upd_sha, weights = check_update(state, folder)
    checker = _Check(state, tolerance, eval_data, log) if check else None  # data read and checked before the state is touched
    with state.lock():
        current = state.current
        done = next((g for g in state.data["generations"] if (g.get("update") or {}).get("sha256") == upd_sha), None)
        summary = {"update": str(folder), "sha256": upd_sha, "tensors": len(weights), "bytes": update_bytes(folder),
                   "source": upd.source}
        if done is not None:
            return {**summary, "generation": done["id"], "already_applied": True, "promoted": done["status"] == "promoted",
                    "status": done["status"], "reason": done.get("reason", ""), "current": current, "metrics": done.get("metrics", {}),
                    "seconds": round(time.perf_counter() - t0, 3)}
        pending = state.job_dir / "job.json"
        if pending.is_file() and not discard_interrupted:
            import json

            job = json.loads(pending.read_text(encoding="utf-8"))
            raise StateError(f"generation {job['generation']} was interrupted while training on {job['data']['file']}; "
                             "applying an update now would take its place", "finish it (rerun that `edgeft device train`), "
                             "or pass --discard-interrupted to drop it")
        gen = state.next_id()
        metrics, promote, reason = {}, True, REASON + (" (not checked on the device)" if not check else "")
        if checker is not None:
            metrics, rows = checker.compare(state.params(current), weights)
            promote, why = checker.decide(metrics, rows)
            reason = f"{REASON}; {why}"
        if dry_run:
            return {**summary, "generation": gen, "already_applied": False, "dry_run": True, "promoted": promote, "status": None,
                    "reason": reason, "current": current, "metrics": metrics, "seconds": round(time.perf_counter() - t0, 3)}
        if pending.is_file():
            log("discarding the interrupted generation (--discard-interrupted)")
            state.clear_job()
        record = {"id": gen, "parent": current, "status": "promoted" if promote else "rejected", "reason": reason,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": "update", "data": None,
                  "update": {"sha256": upd_sha, "folder": folder.name, "created": upd.created, "source": upd.source,
                             "parity": upd.parity, "bundle": upd.bundle}, "metrics": metrics}
        state.add_generation(record, weights, promote)
    return {**summary, "generation": gen, "already_applied": False, "promoted": promote, "status": record["status"], "reason": reason,
            "current": state.current, "previous": current, "metrics": metrics, "seconds": round(time.perf_counter() - t0, 3)}


def _trainer():
    from .trainer import DeviceTrainer

    return DeviceTrainer


class _Check:
    """device train's own comparison and decision (DeviceTrainer.compare/decide) on the rows a device
    holds: --eval-data as held-out rows; the bundle's reference rows; what earlier generations saw
    (their held-out and their training rows alike: the update was trained on none of them)."""

    def __init__(self, state: DeviceState, tolerance: float, eval_data: Path | None, log):
        from types import SimpleNamespace

        from ..datasets import load_task_rows
        from .data import encode_rows, task_encoder

        m = state.manifest
        self.bundle, self.manifest, self.task, self.labels = state.bundle, m, m.task, m.labels
        self.tokenizer = task_encoder(state.bundle, m)
        from .guard import REFERENCE_LOSS

        self.cfg = SimpleNamespace(tolerance=tolerance, reference_loss_rise=REFERENCE_LOSS)
        enc = lambda rows, where: encode_rows(rows, m.task, self.tokenizer, m.labels, m.train_shape.seq, False, where, log)  # noqa: E731
        self.held_set = enc(load_task_rows(eval_data, m.task, m.labels), str(eval_data)) if eval_data else []
        reference = load_task_rows(state.bundle / "reference.jsonl", m.task, m.labels) if (state.bundle / "reference.jsonl").is_file() else []
        held_before = getattr(state, "replay_check_rows", list)()  # earlier generations' held-out rows, where the state keeps them
        earlier = held_before + state.replay_rows()
        self.check_sets = {name: enc(rows, f"{name} rows") for name, rows in (("reference", reference), ("earlier", earlier)) if rows}
        if not self.held_set and not self.check_sets:
            raise UsageError("--check has no rows to compare on: the bundle carries no reference rows and the device has no replay rows",
                             "pass --eval-data FILE with rows to check on, or apply without --check")
        self.reference_set = [e for rows in self.check_sets.values() for e in rows]

    def compare(self, old: dict, new: dict):
        return _trainer().compare(self, old, new)

    def decide(self, metrics: dict, rows: dict):
        return _trainer().decide(self, metrics, rows)
