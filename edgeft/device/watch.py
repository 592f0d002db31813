"""`edgeft device watch`: a device that learns by itself from files dropped in an inbox. Torch-free.

A producer writes `x.jsonl.tmp` (or `.x.jsonl`) and renames it to `x.jsonl`; only complete names
are taken (`*.jsonl`, not hidden, unchanged for `settle` seconds). Each file goes through an
ingest journal that a SIGKILL or power cut at any moment leaves consistent:

  1. rename INBOX/x.jsonl -> INBOX/.edgeft-ingesting/x.jsonl   (the producer can no longer touch it)
  2. rows -> the learner's pending store as one batch named by the file's sha256, written whole
  3. rename the file to INBOX/done/ (or INBOX/rejected/ with a .why.txt when its rows are bad)

After a kill, a file still in .edgeft-ingesting/ is processed again; if its sha256 already names a
batch (step 2 happened), it is only moved. The learner then trains each row in exactly one
generation (pending.py). Logs are JSON lines; the process lowers its CPU priority so the app's
inference on the same device keeps its share.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from ..errors import DataError, StateError, TrainingDiverged

STAGE = ".edgeft-ingesting"


class JsonLog:
    """One JSON object per line, flushed at once (a kill loses no finished line)."""

    def __init__(self, path: Path | None = None):
        self.stream = open(path, "a", encoding="utf-8") if path else sys.stderr

    def __call__(self, event: str, **fields) -> None:
        t = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        self.stream.write(json.dumps({"time": stamp, "event": event, **fields}, default=str) + "\n")
        self.stream.flush()


def complete_files(inbox: Path, settle: float) -> list[Path]:
    """Data files a producer has finished: `*.jsonl`, not hidden, not modified for `settle` s."""
    out = []
    for p in sorted(inbox.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(".jsonl"):
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if p.is_file() and time.time() - st.st_mtime >= settle:
            out.append(p)
    return out


def move_aside(src: Path, folder: Path, key: str) -> Path:
    """Rename `src` into `folder`, keeping an earlier file of the same name (suffix: the sha256)."""
    from ..fsutil import _fsync_dir, make_dirs

    make_dirs(folder)
    dst = folder / src.name
    if dst.exists():
        dst = folder / f"{src.stem}.{key[:12]}{src.suffix}"
    os.replace(src, dst)
    _fsync_dir(folder)
    _fsync_dir(src.parent)
    return dst


class Watcher:
    def __init__(self, learner, inbox: Path, min_rows: int, max_wait: float | None, settle: float, options: dict, log: JsonLog):
        self.learner, self.inbox, self.min_rows, self.max_wait, self.settle = learner, Path(inbox), min_rows, max_wait, settle
        self.options, self.log = options, log
        self.stage = self.inbox / STAGE
        self.totals = {"files": 0, "rows": 0, "skipped": 0, "rejected": 0, "new_generations": []}

    def process(self, staged: Path) -> None:
        """Steps 2 and 3 of the journal for one staged file; repeatable after a kill."""
        from ..datasets import load_task_rows
        from ..fsutil import atomic_write_text

        try:
            key = hashlib.sha256(staged.read_bytes()).hexdigest()
        except OSError as e:  # unreadable (permissions, a directory): set aside, not retried forever
            dst = move_aside(staged, self.inbox / "rejected", "unreadable")
            self.totals["rejected"] += 1
            self.log("rejected", file=staged.name, error=f"cannot read it: {e.strerror or e}", moved_to=str(dst))
            return
        if self.learner.store.has_key(key):
            dst = move_aside(staged, self.inbox / "done", key)
            self.totals["skipped"] += 1
            self.log("skipped", file=staged.name, sha256=key, moved_to=str(dst), reason="its rows were ingested before")
            return
        try:
            rows = load_task_rows(staged, self.learner.task, self.learner.labels)
        except DataError as e:
            rejected = self.inbox / "rejected"
            dst = move_aside(staged, rejected, key)
            atomic_write_text(dst.with_name(dst.name + ".why.txt"), str(e).replace(str(staged), dst.name) + "\n")
            self.totals["rejected"] += 1
            self.log("rejected", file=staged.name, error=e.message, moved_to=str(dst))
            return
        added = self.learner.add_examples(rows, key=key)
        dst = move_aside(staged, self.inbox / "done", key)
        self.totals["files"] += 1
        self.totals["rows"] += added["added"]
        self.log("ingested", file=staged.name, sha256=key, rows=added["added"], pending_rows=added["pending_rows"], moved_to=str(dst))

    def ingest(self) -> None:
        from ..fsutil import _fsync_dir, make_dirs

        make_dirs(self.stage)
        for leftover in sorted(self.stage.iterdir()):  # a kill between steps 1 and 3
            if leftover.is_file():
                self.process(leftover)
        for p in complete_files(self.inbox, self.settle):
            staged = self.stage / p.name
            try:
                os.replace(p, staged)
            except FileNotFoundError:  # the producer took it back
                continue
            _fsync_dir(self.stage)
            self.process(staged)

    def due(self) -> int | None:
        """min_rows for the next update, or None when no update is due."""
        c = self.learner.store.counts()
        if c["round"] is not None or c["pending_rows"] >= self.min_rows:
            return self.min_rows if c["round"] is None else 1
        if self.max_wait is not None and c["pending_rows"] and c["oldest_pending_s"] >= self.max_wait:
            return 1
        return None

    def train(self) -> None:
        min_rows = self.due()
        if min_rows is None:
            return
        self.log("training", **self.learner.store.counts())
        try:
            s = self.learner.update(min_rows=min_rows, **self.options)
        except (TrainingDiverged, StateError) as e:  # the state is unchanged or the rows recorded as failed; keep serving
            self.log("update_failed", error=e.message, hint=e.hint)
            return
        if s is not None:
            self.totals["new_generations"].append(s["generation"])
            self.log("generation", generation=s["generation"], promoted=s["promoted"], reason=s["reason"], current=s["current"],
                     rows=s["rows"], round=s["round"], recovered=s["recovered"], seconds=s.get("seconds"), metrics=s.get("metrics"))

    def step(self) -> None:
        self.ingest()
        self.train()

    def sync_leftovers(self) -> None:
        """At the start, before acting on what a killed run left visible: make it durable (the
        learner's state; the inbox's folders, whose names a kill between mkdir and the parent's
        fsync left unsynced, and the renames into them)."""
        from ..fsutil import make_durable

        self.learner.settle()
        make_durable(self.stage, self.inbox / "done", self.inbox / "rejected", self.inbox)

    def run(self, interval: float, once: bool) -> dict:
        self.sync_leftovers()
        self.log("started", inbox=str(self.inbox), bundle=str(self.learner.bundle), state=str(self.learner.state_dir), pid=os.getpid(),
                 nice=os.nice(0), min_rows=self.min_rows, **self.learner.store.counts())
        while True:
            self.step()
            if once:
                return {**self.totals, **self.learner.status()}
            time.sleep(interval)


def unit_text(exec_args: list[str], nice: int, user: bool, run_as: str | None, description: str) -> str:
    """A systemd unit: restarts after a crash (the journal makes that safe), runs at low priority."""
    def q(a: str) -> str:
        return f'"{a}"' if any(c in a for c in " \t'\"\\") else a

    lines = ["[Unit]", f"Description={description}", "After=local-fs.target", "", "[Service]", "Type=simple",
             "ExecStart=" + " ".join(q(a) for a in exec_args), "Restart=on-failure", "RestartSec=10", f"Nice={nice}",
             "IOSchedulingClass=idle", "Environment=PYTHONUNBUFFERED=1"]
    if run_as and not user:
        lines.append(f"User={run_as}")
    lines += ["", "[Install]", f"WantedBy={'default.target' if user else 'multi-user.target'}", ""]
    return "\n".join(lines)


def unit_path(name: str, user: bool) -> Path:
    if user:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return base / "systemd" / "user" / f"{name}.service"
    return Path("/etc/systemd/system") / f"{name}.service"
