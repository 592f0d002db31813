"""The learner's pending store: rows waiting for the next generation. Crash-safe, torch-free.

Layout (under STATE/learner):
  pending/TIME-NAME.jsonl  one file per `add_examples` call, written whole (temp, fsync, rename):
                           a batch is either all there or absent. NAME is the caller's key
                           (watch: the source file's sha256) or a random id.
  round.json               the round being trained: which batches, the data file, the options.
                           Written last, so it is the commit point of "these rows go to this round".
  rounds/ID.jsonl          that round's rows, concatenated (the file the trainer reads)
  history.jsonl            one fsynced line per finished round: its generation, batches, keys and
                           a short digest of every row (the audit trail; keys are never re-added)
  lock                     one update at a time (across processes)

A row is trained once and never lost: it stays in pending/ until the generation trained on its
round is recorded in state.json; finishing a round (history line, then the batch files go, then
round.json) is idempotent, so a kill at any point between is finished on the next update.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from ..errors import StateError
from ..fsutil import _fsync_dir, atomic_write_json, atomic_write_text, make_dirs, make_durable, read_jsonl
from .state import writing

STALE_TEMP_S = 600  # a writer's temp older than this is a crash's leftover


def row_digest(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def rows_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def append_line_fsync(path: Path, obj: dict) -> None:
    """Append one JSON line durably; a line torn by an earlier crash is closed off first."""
    torn = path.is_file() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


class PendingStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.pending = self.folder / "pending"
        self.rounds = self.folder / "rounds"
        self.round_file = self.folder / "round.json"
        self.history_file = self.folder / "history.jsonl"

    # -- reading ---------------------------------------------------------------
    def batches(self) -> list[str]:
        if not self.pending.is_dir():
            return []
        return sorted(p.name for p in self.pending.iterdir() if p.suffix == ".jsonl" and not p.name.startswith("."))

    def batch_rows(self, name: str) -> list[dict]:
        return read_jsonl(self.pending / name)

    def history(self) -> list[dict]:
        return read_jsonl(self.history_file)

    def current_round(self) -> dict | None:
        if not self.round_file.is_file():
            return None
        try:
            return json.loads(self.round_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise StateError(f"{self.round_file} is corrupt ({e})", "this cannot come from a crash; restore the state folder from a backup") from None

    def has_key(self, key: str) -> bool:
        """True once rows under `key` were added: pending, in the round, or trained."""
        if any(n.endswith(f"-{key}.jsonl") for n in self.batches()):
            return True
        return any(key in h.get("keys", []) for h in self.history())

    def counts(self) -> dict:
        r = self.current_round()
        in_round = set(r["batches"]) if r else set()
        waiting = [n for n in self.batches() if n not in in_round]
        rows = sum(len(self.batch_rows(n)) for n in waiting)
        oldest = min((os.stat(self.pending / n).st_mtime for n in waiting), default=None)
        return {"pending_rows": rows, "pending_batches": len(waiting), "oldest_pending_s": round(time.time() - oldest, 1) if oldest else None,
                "round": {"id": r["id"], "rows": r["rows"], "batches": len(r["batches"])} if r else None}

    # -- writing ---------------------------------------------------------------
    def settle(self) -> None:
        """Make durable what an earlier, killed process left visible (fsutil.make_durable)."""
        make_durable(self.history_file, self.pending, self.rounds, self.folder, self.folder.parent)

    @contextlib.contextmanager
    def lock(self, name: str = "lock", wait: bool = False):
        import fcntl

        with writing(f"the learner folder {self.folder}"):
            make_dirs(self.folder)
            f = open(self.folder / name, "a")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StateError(f"another edgeft process is updating from {self.folder}", "wait for it to finish") from None
            yield
        finally:
            f.close()

    def add(self, rows: list[dict], key: str | None = None) -> str | None:
        """Write one batch whole; None when `key` was added before (a re-ingested file)."""
        name = f"{time.time_ns():020d}-{key or uuid.uuid4().hex}.jsonl"
        with self.lock("keys.lock", wait=True):  # two writers of one key: the second sees the first
            if key and self.has_key(key):
                return None
            with writing("the pending rows"):
                make_dirs(self.pending)
                atomic_write_text(self.pending / name, rows_text(rows))
        return name

    def open_round(self, min_rows: int, options: dict) -> dict | None:
        """The round to train: the interrupted one (with its own options), else a new one over every
        pending batch when they hold at least `min_rows` rows, else None."""
        r = self.current_round()
        if r is not None:
            return r
        self._clean()
        names = self.batches()
        rows = [row for n in names for row in self.batch_rows(n)]
        if not rows or len(rows) < min_rows:
            return None
        rid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        data = self.rounds / f"{rid}.jsonl"
        text = rows_text(rows)
        r = {"id": rid, "data": str(data), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "rows": len(rows),
             "batches": names, "options": options, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with writing("the round's data"):
            make_dirs(self.rounds)
            atomic_write_text(data, text)
            atomic_write_json(self.round_file, r)  # the commit point
        return r

    def finish(self, r: dict, generation: dict) -> None:
        """Consume the round's batches: history line (once), batch files, data file, round.json."""
        if not any(h.get("round") == r["id"] for h in self.history()):
            rows = [row for n in r["batches"] for row in self.batch_rows(n)]
            with writing("the learner history"):
                append_line_fsync(self.history_file, {
                    "round": r["id"], "generation": generation["id"], "status": generation["status"], "rows": r["rows"],
                    "batches": r["batches"], "keys": [n.split("-", 1)[1][: -len(".jsonl")] for n in r["batches"]],
                    "row_digests": [row_digest(x) for x in rows], "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        for n in r["batches"]:
            (self.pending / n).unlink(missing_ok=True)
        _fsync_dir(self.pending)
        Path(r["data"]).unlink(missing_ok=True)
        self.round_file.unlink(missing_ok=True)
        _fsync_dir(self.folder)

    def _clean(self) -> None:
        """Round data no round.json points at (killed before the commit point) and stale temps."""
        if self.rounds.is_dir():
            for p in self.rounds.iterdir():
                p.unlink(missing_ok=True)
        if self.pending.is_dir():
            for p in self.pending.iterdir():
                with contextlib.suppress(FileNotFoundError):  # another writer's temp, renamed meanwhile
                    if p.name.startswith(".") and p.name.endswith(".tmp") and time.time() - p.stat().st_mtime > STALE_TEMP_S:
                        p.unlink()
