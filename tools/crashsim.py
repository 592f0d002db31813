#!/usr/bin/env python3
"""Power-loss simulation: record a process's file-system calls, rebuild what a power cut could leave.

In the spirit of ALICE and CrashMonkey (record and replay). A SIGKILL keeps the kernel's page cache;
a power cut keeps only what fsync made durable. This module records the calls that change files
under a folder ROOT, then builds, for a cut before any journal entry, a tree a power cut there could
leave, so the real recovery code can run on it.

Record (the shim only observes: each wrapper calls the real function, then logs what it did):

    python tools/crashsim.py --journal J --root ROOT -m edgeft device watch ...

  wraps os.open, open/io.open (files opened for writing, whose close is seen), os.fsync, os.replace,
  os.rename, os.unlink, os.remove, os.mkdir, os.rmdir (shutil.rmtree, shutil.move, tempfile,
  pathlib all go through these) and appends one JSON line per call under ROOT to J/journal.jsonl;
  file contents at close and fsync go to J/blobs/SHA256. Another process (a producer) logs into the
  same journal through `Journal`; both hold a lock on the journal across call and log line, so the
  journal's order is the order the calls happened in.

The persistence model (`Model.crash_state`), POSIX's minimum plus one stated assumption:
  * Names. A change to a directory's entries (create, mkdir, unlink, rmdir, rename) is durable
    once that directory is fsynced. fsync of a file does not make its name durable, and a new
    directory's own name lives in its parent: it needs the parent's fsync.
  * Renames are atomic: a rename persists whole or not at all, and an fsync of either directory it
    touched persists it. (POSIX says nothing about crashes; ext4, xfs and btrfs journal a rename
    as one transaction. Without this no rename protocol, not even a producer's hand-over, works.)
  * Data. A file's content persists when the file is fsynced (its content at that moment); what
    was written since may come back as nothing (a file never fsynced is empty), a prefix, or zeros.
  * No other order: an un-fsynced change may persist or not, independently of every other one.
    ext4 (data=ordered, one journal for all metadata) gives more, so a state built here may be one
    ext4 never shows; every state ext4 can show after a cut is one of these, or keeps more.
  Variants: "minimal" keeps exactly what the fsyncs guarantee (every other change undone, every file
  at its last fsynced content, empty if none): the worst legal state. "random:SEED" keeps each
  un-fsynced change with probability 1/2 and picks each file's content among the legal ones.

The tree at the start of the recording (`snapshot`) is taken as durable. With --kill-rate (or
--kill-after OP:PATH) the recorded process SIGKILLs itself right after a journaled call (a restart goes on in the same
journal), so cuts also fall after a kill and its recovery: a SIGKILL, then a power cut.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
import threading
from pathlib import Path

_REAL = {n: getattr(os, n) for n in ("open", "fsync", "replace", "rename", "unlink", "remove", "mkdir", "rmdir")}
_REAL_OPEN = builtins.open


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _read_fd(fd: int) -> bytes:
    with _REAL_OPEN(f"/proc/self/fd/{fd}", "rb") as f:
        return f.read()


class Journal:
    """The append-only journal of calls under `root`, shared by every recorded process."""

    def __init__(self, folder: str | Path, root: str | Path, who: str | None = None, kill_rate: float = 0.0, seed: int = 0,
                 kill_after: str | None = None):
        import random

        self.folder, self.root, self.who = Path(folder), os.path.realpath(root), who
        self.kill_rate, self._rng, self._depth, self._kill_now = kill_rate, random.Random(seed), 0, False
        self.kill_after = tuple(kill_after.split(":", 1)) if kill_after else None  # (op, path prefix): SIGKILL after the first such call
        (self.folder / "blobs").mkdir(parents=True, exist_ok=True)
        self.fd = _REAL["open"](str(self.folder / "journal.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._thread_lock = threading.RLock()

    def rel(self, path, dir_fd: int | None = None) -> str | None:
        """`path` relative to the root ('' for the root itself), or None when outside it."""
        if isinstance(path, int):
            path = _fd_path(path)
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(_fd_path(dir_fd), path)
        path = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
        if path == self.root:
            return ""
        return path[len(self.root) + 1:] if path.startswith(self.root + os.sep) else None

    def locked(self):
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def hold():
            with self._thread_lock:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    if not self._depth and (self._kill_now or (self.kill_rate and self._rng.random() < self.kill_rate)):
                        self.kill()
        return hold()

    def kill(self) -> None:
        """SIGKILL this process just after a journaled call (and its journal line): the page cache
        keeps everything, the journal goes on with the next process."""
        import signal

        self.log("killed")
        os.kill(os.getpid(), signal.SIGKILL)

    def blob(self, data: bytes) -> str:
        import hashlib

        key = hashlib.sha256(data).hexdigest()
        path = self.folder / "blobs" / key
        if not path.exists():
            with _REAL_OPEN(path, "wb") as f:
                f.write(data)
        return key

    def log(self, op: str, **fields) -> None:
        entry = {"op": op, **fields, "pid": os.getpid(), "by": self.who or _caller()}
        if self.kill_after and op == self.kill_after[0] and (fields.get("dst") or fields.get("path", "")).startswith(self.kill_after[1]):
            self._kill_now = True
        os.write(self.fd, (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))

    def content(self, op: str, fd: int) -> None:
        """Log a file's content as the kernel holds it now (at close or fsync)."""
        rel = self.rel(fd)
        if rel is not None and not rel.endswith(" (deleted)"):
            self.log(op, path=rel, blob=self.blob(_read_fd(fd)))


def _caller() -> str:
    """The edgeft functions on the stack, outermost first (e.g. watch.process>pending.add>fsutil.atomic_write_bytes)."""
    names, f = [], sys._getframe(2)
    while f is not None and len(names) < 4:
        file = f.f_code.co_filename
        if f"{os.sep}edgeft{os.sep}" in file:
            names.append(f"{Path(file).stem}.{f.f_code.co_name}")
        f = f.f_back
    return ">".join(reversed(names))


class _Watched:
    """A file object opened for writing under the root: logs its content when closed."""

    def __init__(self, f, journal: Journal):
        self.__dict__.update(_f=f, _journal=journal)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if not self._f.closed:
            with self._journal.locked():
                self._f.flush()
                self._journal.content("close", self._f.fileno())
        self._f.close()


def install(journal: Journal) -> None:
    """Wrap the calls; each wrapper runs the real call, then logs it when it touched the root."""
    j = journal

    def opened(path, flags, mode=0o777, *, dir_fd=None):
        rel = j.rel(path, dir_fd) if flags & (os.O_CREAT | os.O_TRUNC) else None
        if rel is None:
            return _REAL["open"](path, flags, mode, dir_fd=dir_fd)
        with j.locked():
            existed = os.path.lexists(os.path.join(j.root, rel))
            fd = _REAL["open"](path, flags, mode, dir_fd=dir_fd)
            if not existed:
                j.log("creat", path=rel)
            elif flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
                j.log("trunc", path=rel)
        return fd

    def open_file(file, mode="r", *args, **kwargs):
        if not any(c in mode for c in "wax+"):
            return _REAL_OPEN(file, mode, *args, **kwargs)
        rel = j.rel(file)
        if rel is None:
            return _REAL_OPEN(file, mode, *args, **kwargs)
        if isinstance(file, int):  # os.fdopen: the name was logged when os.open made it
            return _Watched(_REAL_OPEN(file, mode, *args, **kwargs), j)
        with j.locked():
            existed = os.path.lexists(os.path.join(j.root, rel))
            f = _REAL_OPEN(file, mode, *args, **kwargs)
            if not existed:
                j.log("creat", path=rel)
            elif "w" in mode:
                j.log("trunc", path=rel)
        return _Watched(f, j)

    def fsync(fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        if j.rel(fd) is None:
            return _REAL["fsync"](fd)
        with j.locked():
            _REAL["fsync"](fd)
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                j.log("fsync", path=j.rel(fd))
            else:
                j.content("fsync", fd)

    def renamer(name):
        def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            a, b = j.rel(src, src_dir_fd), j.rel(dst, dst_dir_fd)
            if a is None and b is None:
                return _REAL[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            with j.locked():
                _REAL[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
                if a is not None and b is not None:
                    j.log("rename", src=a, dst=b)
                elif b is not None:  # moved in from outside: a new name with its content
                    j.log("creat", path=b)
                    with _REAL_OPEN(os.path.join(j.root, b), "rb") as f:
                        j.log("close", path=b, blob=j.blob(f.read()))
                else:
                    j.log("unlink", path=a)
        return rename

    def namer(name, op):
        def call(path, *args, dir_fd=None, **kwargs):
            rel = j.rel(path, dir_fd)
            if rel is None:
                return _REAL[name](path, *args, dir_fd=dir_fd, **kwargs)
            with j.locked():
                _REAL[name](path, *args, dir_fd=dir_fd, **kwargs)
                j.log(op, path=rel)
        return call

    os.open, os.fsync = opened, fsync
    os.replace, os.rename = renamer("replace"), renamer("rename")
    os.unlink, os.remove = namer("unlink", "unlink"), namer("remove", "unlink")
    os.mkdir, os.rmdir = namer("mkdir", "mkdir"), namer("rmdir", "rmdir")
    builtins.open = io.open = open_file


# -- the recording's start and the producer ---------------------------------------------------------

def snapshot(folder: str | Path, root: str | Path) -> None:
    """The tree under `root` at the start (taken as durable): J/initial.json."""
    journal, root = Journal(folder, root), Path(root)
    items = []
    for dirpath, dirs, files in os.walk(root):
        for d in sorted(dirs):
            items.append({"path": os.path.relpath(os.path.join(dirpath, d), root), "kind": "dir"})
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            items.append({"path": os.path.relpath(p, root), "kind": "file", "blob": journal.blob(Path(p).read_bytes())})
    (Path(folder) / "initial.json").write_text(json.dumps(items, indent=1) + "\n")
    (Path(folder) / "journal.jsonl").write_text("")


def hand_over(journal: Journal, inbox: Path, name: str, data: bytes) -> None:
    """A producer's durable hand-over, journaled: temp file, fsync, rename, fsync the inbox; then
    a `handed` entry: a cut after it must keep the file's rows."""
    tmp, inbox = inbox / f"{name}.tmp", Path(inbox)
    with journal.locked():
        fd = _REAL["open"](tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        journal.log("creat", path=journal.rel(tmp))
        os.write(fd, data)
        _REAL["fsync"](fd)
        journal.content("fsync", fd)
        os.close(fd)
    with journal.locked():
        _REAL["replace"](tmp, inbox / name)
        journal.log("rename", src=journal.rel(tmp), dst=journal.rel(inbox / name))
    with journal.locked():
        fd = _REAL["open"](inbox, os.O_RDONLY)
        _REAL["fsync"](fd)
        os.close(fd)
        journal.log("fsync", path=journal.rel(inbox))
        journal.log("handed", name=name)


# -- replay -----------------------------------------------------------------------------------------

class Model:
    """The journal replayed over inodes: which name changes and contents a cut before entry k keeps."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.entries = []
        for line in (self.folder / "journal.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                self.entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the recorded process was killed mid-line: the journal ends there
        self.kind = {0: "dir"}
        self.initial = {0: {}}  # dir inode -> {name: inode}: durable at the start
        self.initial_blob = {}
        self.cur = {0: {}}
        self.groups = []  # (entry index, [("link"|"unlink", dir, name, inode)], dirs touched)
        self.persisted_at = []  # per group: the entry index of the fsync that made it durable, or None
        self.data = {}  # file inode -> [(entry index, blob or None (empty), fsynced?)]
        self.handed = {}  # file name -> entry index of its hand-over
        self.kills = []  # entry indices of the recorded process's SIGKILLs
        for item in json.loads((self.folder / "initial.json").read_text()):
            d, name = self._parent(item["path"])
            x = self._new(item["kind"])
            self.initial[d][name] = self.cur[d][name] = x
            if item["kind"] == "dir":
                self.initial[x] = {}
            else:
                self.initial_blob[x] = item["blob"]
        for i, e in enumerate(self.entries):
            self._replay(i, e)

    def _new(self, kind: str) -> int:
        x = len(self.kind)
        self.kind[x] = kind
        if kind == "dir":
            self.cur[x] = {}
        else:
            self.data[x] = []
        return x

    def _parent(self, rel: str) -> tuple[int, str]:
        parts = Path(rel).parts
        d = 0
        for p in parts[:-1]:
            d = self.cur[d][p]
        return d, parts[-1]

    def resolve(self, rel: str) -> int:
        if rel == "":
            return 0
        d, name = self._parent(rel)
        return self.cur[d][name]

    def _group(self, i: int, micro: list) -> None:
        self.groups.append((i, micro, {m[1] for m in micro}))
        self.persisted_at.append(None)

    def _replay(self, i: int, e: dict) -> None:
        op = e["op"]
        if op in ("creat", "mkdir"):
            d, name = self._parent(e["path"])
            x = self._new("dir" if op == "mkdir" else "file")
            if op == "creat":
                self.data[x].append((i, None, False))
            self.cur[d][name] = x
            self._group(i, [("link", d, name, x)])
        elif op in ("unlink", "rmdir"):
            d, name = self._parent(e["path"])
            self._group(i, [("unlink", d, name, self.cur[d].pop(name))])
        elif op == "rename":
            ds, ns = self._parent(e["src"])
            dd, nd = self._parent(e["dst"])
            x = self.cur[ds].pop(ns)
            self.cur[dd][nd] = x
            self._group(i, [("unlink", ds, ns, x), ("link", dd, nd, x)])
        elif op == "trunc":
            self.data[self.resolve(e["path"])].append((i, None, False))
        elif op == "close" or (op == "fsync" and "blob" in e):
            self.data[self.resolve(e["path"])].append((i, e["blob"], op == "fsync"))
        elif op == "fsync":  # a directory: every earlier change to its entries is durable now
            d = self.resolve(e["path"])
            for g, (_, _, dirs) in enumerate(self.groups):
                if self.persisted_at[g] is None and d in dirs:
                    self.persisted_at[g] = i
        elif op == "killed":  # a SIGKILL: the page cache survives it, so nothing changes here
            self.kills.append(i)
        elif op == "handed":
            self.handed[e["name"]] = i
        else:
            raise ValueError(f"journal entry {i}: unknown op {op!r}")

    def volatile(self, k: int) -> list[int]:
        """Entries before k whose name change a cut at k may undo (not yet covered by an fsync)."""
        return [i for g, (i, _, _) in enumerate(self.groups) if i < k and (self.persisted_at[g] is None or self.persisted_at[g] >= k)]

    def crash_state(self, k: int, variant: str = "minimal") -> dict:
        """{relative path: bytes, or None for a directory}: a tree a power cut before entry k can leave."""
        import random

        rng = random.Random(int(variant.split(":")[1])) if variant.startswith("random:") else None
        tree = {d: dict(entries) for d, entries in self.initial.items()}
        for g, (i, micro, _) in enumerate(self.groups):
            if i >= k:
                break
            durable = self.persisted_at[g] is not None and self.persisted_at[g] < k
            if durable or (rng is not None and rng.random() < 0.5):
                for what, d, name, x in micro:
                    entries = tree.setdefault(d, {})
                    if what == "link":
                        entries[name] = x
                    elif entries.get(name) == x:
                        del entries[name]
        out, seen = {}, set()

        def walk(d: int, prefix: str) -> None:
            for name, x in sorted(tree.get(d, {}).items()):
                if x in seen:
                    continue
                seen.add(x)
                path = f"{prefix}{name}"
                if self.kind[x] == "dir":
                    out[path] = None
                    walk(x, path + "/")
                else:
                    out[path] = self._content(x, k, rng)
        walk(0, "")
        return out

    def _content(self, x: int, k: int, rng) -> bytes:
        events = [e for e in self.data[x] if e[0] < k]
        fsynced = [b for _, b, s in events if s]
        synced = fsynced[-1] if fsynced else self.initial_blob.get(x)  # None: created during the recording, never fsynced
        latest = events[-1][1] if events else synced
        pick = synced
        if rng is not None and latest != synced:
            options = ["synced", "latest"] + (["prefix", "zeros"] if synced is None else [])
            pick = {"synced": synced, "latest": latest, "prefix": "prefix", "zeros": "zeros"}[rng.choice(options)]
        if pick is None:
            return b""
        if pick in ("prefix", "zeros"):
            data = self.blob(latest)
            return data[: rng.randrange(len(data))] if pick == "prefix" and data else b"\0" * len(data)
        return self.blob(pick)

    def blob(self, key: str | None) -> bytes:
        return b"" if key is None else (self.folder / "blobs" / key).read_bytes()


def materialize(state: dict, root: str | Path) -> None:
    """Replace everything under `root` by `state` (from `Model.crash_state`)."""
    import shutil

    root = Path(root)
    for p in root.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for rel, data in sorted(state.items()):
        if data is None:
            (root / rel).mkdir()
        else:
            (root / rel).write_bytes(data)


def main() -> None:
    import argparse
    import runpy

    ap = argparse.ArgumentParser(description="Run a module with its file-system calls under --root journaled (see the module doc).", allow_abbrev=False)
    ap.add_argument("--journal", required=True, type=Path)
    ap.add_argument("--root", required=True, type=Path)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("-m", dest="module", help="Run this module as __main__ (the arguments after it are its own).")
    what.add_argument("-c", dest="code", help="Run this code.")
    ap.add_argument("--kill-rate", type=float, default=0.0, help="SIGKILL itself after each journaled call with this probability.")
    ap.add_argument("--kill-after", metavar="OP:PATH", help="SIGKILL itself after the first such call, e.g. rename:state/state.json.")
    ap.add_argument("--seed", type=int, default=0)
    args, rest = ap.parse_known_args()
    install(Journal(args.journal, args.root, kill_rate=args.kill_rate, seed=args.seed, kill_after=args.kill_after))
    sys.argv = [args.module or "-c"] + [a for a in rest if a != "--"]
    if args.code is not None:
        exec(compile(args.code, "<crashsim -c>", "exec"), {"__name__": "__main__"})
    else:
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
