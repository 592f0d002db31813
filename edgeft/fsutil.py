"""Crash-safe file writes: temp file or folder, fsync, rename into place. Torch-free.

Names beside a published folder NAME (all hidden, so recovery can tell them apart):
  .NAME.XXXXXXXX.tmp   a temp being written (mkdtemp/mkstemp); never complete for sure: deleted
  .NAME.old            the previous NAME, moved aside for the two-rename swap: restored when NAME
                       is missing (the new one never landed), deleted when NAME is there
  .NAME.new            a run being trained to replace NAME (workstation/rundir.py); left alone here
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_output(path: Path, overwrite: bool) -> None:
    """Fail before any slow work if `path` exists (without --overwrite) or its folder is not writable."""
    from .errors import OutputError

    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists", "pick another --out, or pass --overwrite")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: {parent} is missing or not writable", "choose an --out in a writable folder")


def _umask_mode(base: int) -> int:
    """mkstemp/mkdtemp create 0600/0700; published files get the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | Path) -> Path:
    """`mkdir -p` that a power cut cannot undo: a folder's name lives in its parent, so each folder
    made here is followed by an fsync of its parent (files fsynced inside a folder whose own name
    was never made durable vanish with it)."""
    path = Path(path)
    missing, up = [], path
    while not up.is_dir() and up != up.parent:
        missing.append(up)
        up = up.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:  # another writer made it at the same moment (it fsyncs too)
            if not folder.is_dir():
                raise
        _fsync_dir(folder.parent)
    return path


def make_durable(*paths: str | Path) -> None:
    """fsync each file and folder of `paths` that exists. For a restart: a process killed between a
    write or rename and its fsync leaves it visible (the page cache survived) but not durable, and
    the next process must not act on it (move the source file away, finish a round) before it is."""
    for path in map(Path, paths):
        if path.is_dir():
            _fsync_dir(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _remove(path: Path) -> None:
    """A folder, a file or a link, whichever it is; what cannot be removed stays (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temp_leftovers(path: Path) -> list[Path]:
    """Temps that mkdtemp/mkstemp made for `path` (8 random characters): a crash left them half-written."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return []
    return [p for p in parent.iterdir() if pattern.fullmatch(p.name)]


def _settle_old(path: Path) -> str | None:
    """A `.NAME.old` outliving its swap: put it back when NAME never landed, else drop it."""
    old = old_name(path)
    if not (old.exists() or old.is_symlink()):
        return None
    if path.exists():
        _remove(old)
        return f"removed {old.name}, left by a replacement of {path} that had finished"
    os.replace(old, path)
    _fsync_dir(path.parent)
    return f"restored {path} from {old.name}: its replacement was cut short"


def recover_swap(path: str | Path) -> str | None:
    """Settle what a crash left around the folder `path`, before anything reads or writes it.

    The swap (`swap_in`) is two renames, NAME -> .NAME.old then temp -> NAME; a kill between them
    leaves no NAME. The old folder was complete, the temp may not be, so the old one comes back;
    temps are deleted. Returns a sentence for the log when it changed something, else None.
    Not safe against another process writing `path` at the same moment (nothing here is).
    """
    path = Path(path)
    did = _settle_old(path)
    for leftover in _temp_leftovers(path):
        _remove(leftover)
    return did


def swap_in(src: str | Path, path: str | Path) -> None:
    """Replace folder `path` by the complete folder `src` (same parent).

    A directory cannot be renamed over a non-empty one, so this takes two renames; `recover_swap`
    knows the state between them. A stale .NAME.old from an earlier crash is settled first, so it
    is never mistaken for this swap's.
    """
    src, path = Path(src), Path(path)
    _settle_old(path)
    old = None
    if path.exists():
        old = old_name(path)
        os.replace(path, old)
    os.replace(src, path)
    _fsync_dir(path.parent)
    if old is not None:
        _remove(old)


def fsync_tree(path: Path) -> None:
    for f in Path(path).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp folder beside `path`; on success it replaces `path` whole, on failure it vanishes."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        fsync_tree(tmp)
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(path: str | Path, obj) -> None:
    """One line per record; a crash can cut at most the last line, which readers skip."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line torn by a crash
    return rows
