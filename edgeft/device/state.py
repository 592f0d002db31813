"""The device's training state: generations of adapters, the in-progress job, the replay sample.

Layout (under BUNDLE/state by default):
  state.json              generations and which one is current (atomic rewrite)
  generations/gNNNN.safetensors   each generation's trainable weights, by ONNX name
  replay.jsonl            a sample of earlier promoted generations' training rows (rehearsal)
  replay-check.jsonl      a sample of their held-out rows, never trained on (forgetting check)
                          both bounded by REPLAY_ROWS rows and REPLAY_BYTES bytes (rehearsal.py)
  job/                    the generation being trained: job.json, last.safetensors, best.safetensors
  lock                    one writer at a time

Every file is written to a temp file, fsynced and renamed, so a kill at any moment
leaves either the old or the new version, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from ..bundle import Manifest
from ..errors import OutputError, StateError  # defined in errors.py (the one exit-code table)
from ..fsutil import atomic_write_bytes, atomic_write_json, make_dirs, make_durable

REPLAY_ROWS = 256  # per file: replay.jsonl and replay-check.jsonl
REPLAY_BYTES = 256 * 1024  # per file, whichever cap is reached first


def save_arrays(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(path, save(arrays, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_arrays(path: Path) -> dict:
    return load_checkpoint(path, "roll back to another generation with `edgeft device rollback`")[0]


def load_checkpoint(path: Path, hint: str = "pass --restart to discard the interrupted generation") -> tuple[dict, dict]:
    """(arrays, metadata) of a safetensors file the device wrote."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise StateError(f"{path} is unreadable ({e})", hint) from None


def disk_full(e: BaseException) -> bool:
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def writing(what: str):
    """Turn a failed write into one clear message; the previous state is untouched by construction."""
    try:
        yield
    except OSError as e:
        if disk_full(e):
            raise OutputError(f"the disk is full while writing {what}; nothing was changed", "free some space and run the command again") from None
        raise OutputError(f"cannot write {what}: {e.strerror or e}", "check the state folder is writable") from None


class DeviceState:
    def __init__(self, folder: Path, bundle: Path, manifest: Manifest):
        self.folder, self.bundle, self.manifest = Path(folder), Path(bundle), manifest
        self.job_dir = self.folder / "job"
        self._data = None

    # -- reading ---------------------------------------------------------------
    @property
    def data(self) -> dict:
        if self._data is None:
            path = self.folder / "state.json"
            if path.is_file():
                try:
                    self._data = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise StateError(f"{path} is corrupt ({e})", "this cannot come from a crash; restore the state folder from a backup") from None
            else:
                self._data = {"current": 0, "generations": [{"id": 0, "parent": None, "status": "initial", "created": _now(),
                                                              "source": "bundle", "data": None, "metrics": {}}]}
        return self._data

    @property
    def current(self) -> int:
        return self.data["current"]

    def generation(self, gen: int) -> dict:
        for g in self.data["generations"]:
            if g["id"] == gen:
                return g
        known = ", ".join(str(g["id"]) for g in self.data["generations"])
        raise StateError(f"no generation {gen}", f"generations: {known} (see `edgeft device status`)")

    def origin(self, gen: int) -> int:
        """The generation the workstation last set on `gen`'s line: 0 (the bundle) or the nearest
        ancestor applied as an update from the workstation or received from the fleet's server.
        Device generations are checked against it."""
        while gen != 0 and self.generation(gen).get("source") not in ("update", "fleet"):
            gen = self.generation(gen)["parent"]
        return gen

    def params(self, gen: int | None = None) -> dict:
        """A generation's trainable weights by ONNX name; generation 0 is the bundle's adapter."""
        gen = self.current if gen is None else gen
        self.generation(gen)
        if gen == 0:
            return self.bundle_params()
        return load_arrays(self.folder / "generations" / f"g{gen:04d}.safetensors")

    def bundle_params(self) -> dict:
        from safetensors.numpy import load_file

        peft = load_file(str(self.bundle / "adapter" / "adapter_model.safetensors"))
        return {onnx: peft[key] for onnx, key in self.manifest.trainable.items()}

    def replay_rows(self) -> list[dict]:
        """Earlier promoted generations' training rows, for rehearsal."""
        from ..fsutil import read_jsonl

        return read_jsonl(self.folder / "replay.jsonl")

    def replay_check_rows(self) -> list[dict]:
        """Earlier promoted generations' held-out rows, for the forgetting check."""
        from ..fsutil import read_jsonl

        return read_jsonl(self.folder / "replay-check.jsonl")

    # -- writing ---------------------------------------------------------------
    def settle(self) -> None:
        """Make durable what an earlier, killed process left visible (fsutil.make_durable)."""
        make_durable(self.folder / "generations", self.job_dir, self.folder, self.folder.parent)

    @contextlib.contextmanager
    def lock(self):
        import fcntl

        with writing(f"the state folder {self.folder}"):
            make_dirs(self.folder)
            f = open(self.folder / "lock", "a")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(f"another edgeft process is using {self.folder}", "wait for it to finish") from None
            yield
        finally:
            f.close()

    def _save(self) -> None:
        with writing(self.folder / "state.json"):
            atomic_write_json(self.folder / "state.json", self.data)

    def add_generation(self, record: dict, params: dict | None, promote: bool) -> None:
        """Weights first, then the record that points at them: a kill in between leaves an orphan file, not a dangling record."""
        if params is not None:
            with writing(f"generation {record['id']}"):
                make_dirs(self.folder / "generations")
                save_arrays(self.folder / "generations" / f"g{record['id']:04d}.safetensors", params, {"generation": record["id"]})
        self.data["generations"] = [g for g in self.data["generations"] if g["id"] != record["id"]] + [record]
        if promote:
            self.data["current"] = record["id"]
        self._save()

    def rollback(self, gen: int) -> dict:
        record = self.generation(gen)
        if gen != 0 and not (self.folder / "generations" / f"g{gen:04d}.safetensors").is_file():
            raise StateError(f"generation {gen}'s weights are missing", "pick another generation")
        self.data.setdefault("history", []).append({"at": _now(), "from": self.current, "to": gen})
        self.data["current"] = gen
        self._save()
        return record

    def retain(self, rows: list[dict], held: list[dict], seed: int) -> None:
        """Keep a bounded, seeded sample of what promoted generations saw: their training rows
        (rehearsal) and their held-out rows (forgetting check), each within the caps."""
        for name, new in (("replay.jsonl", rows), ("replay-check.jsonl", held)):
            self._retain(name, new, seed)

    def _retain(self, name: str, rows: list[dict], seed: int) -> None:
        """Bottom-k by a seeded hash of each row: the kept rows are a uniform sample of every row
        ever offered (not biased toward the latest generation), and offering the same rows twice
        (a resumed job) changes nothing."""
        import hashlib

        from ..fsutil import atomic_write_text, read_jsonl

        path = self.folder / name
        if not rows and not path.is_file():
            return
        lines = {}
        for r in read_jsonl(path) + rows:
            line = json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
            lines.setdefault(hashlib.sha256(f"{seed}:{line}".encode("utf-8")).hexdigest(), line)
        kept, size = [], 0
        for key in sorted(lines):
            n = len(lines[key].encode("utf-8"))
            if len(kept) >= REPLAY_ROWS or size + n > REPLAY_BYTES:
                break
            kept.append(lines[key])
            size += n
        with writing(path):
            atomic_write_text(path, "".join(kept))

    def next_id(self) -> int:
        return max(g["id"] for g in self.data["generations"]) + 1

    def clear_job(self) -> None:
        shutil.rmtree(self.job_dir, ignore_errors=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def default_state_dir(bundle: Path) -> Path:
    return Path(os.environ.get("EDGEFT_STATE") or Path(bundle) / "state")
