"""No traceback for anything a user can trigger. Torch-free.

An unexpected exception inside a long job (export's ONNX export, gradient-graph generation,
portable rewrite, validation) becomes ONE error that names the model, the stage and what to
try, exit 10 (ExportError; a full disk is an OutputError, exit 6, running out of memory a
ResourceError, exit 7), with the technical detail (the traceback, and the tail of native
stderr where it was captured) in a log file whose path the message gives. EdgeftErrors pass
through unchanged: they already are a message for the user.

The CLI's last resort (cli_errors.EdgeftGroup) does the same for any other command: one line
"internal error ...", exit 1, and a log file (`write_log` with no folder: the user's cache).

EDGEFT_PROFILE=1 logs, on stderr, each stage's wall time and the process's resident memory:
its peak while the stage ran (sampled every 20 ms; `*`: the process's peak so far was set in this
stage, and is the figure shown, from the kernel) and what it holds at the stage's end
(`profile_mark` marks finer steps inside a stage; export's validation uses it).

EDGEFT_DEBUG=1 turns both off (the original exception propagates, after the log is written):
for developers, and for the test suite, whose CLI helper fails on any exception, so a test
can never pass on an internal error that was turned into a tidy exit code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import traceback
from pathlib import Path

from .errors import EdgeftError, ExportError, OutputError, ResourceError

LOG_FOLDER = ".edgeft-logs"  # beside the output (its parent is known to be writable)


def debug() -> bool:
    return os.environ.get("EDGEFT_DEBUG", "") not in ("", "0")


def cache_log_dir() -> Path:
    """EDGEFT_LOG_DIR, else $XDG_CACHE_HOME/edgeft/logs, else ~/.cache/edgeft/logs."""
    if os.environ.get("EDGEFT_LOG_DIR"):
        return Path(os.environ["EDGEFT_LOG_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeft" / "logs"


def native_stderr(error: BaseException) -> str | None:
    """The native (C++) stderr captured while `error` was raised, if any (see
    workstation.export.quiet_native_stderr), searched along the exception chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "native_stderr", None):
            return error.native_stderr
        error = error.__cause__ or error.__context__
    return None


def write_log(kind: str, error: BaseException, context: dict, folder: Path | None = None) -> Path:
    """The full story of `error` in `<folder>/<kind>-<timestamp>.log` (folder: the cache log
    folder when None or not writable; the system temp folder as a last resort)."""
    import platform
    import sys
    import tempfile

    from . import __version__

    lines = [f"edgeft {__version__}, Python {platform.python_version()}, {platform.platform()}",
             f"command: {' '.join(sys.argv)}", *(f"{k}: {v}" for k, v in context.items()), "",
             "".join(traceback.format_exception(type(error), error, error.__traceback__))]
    tail = native_stderr(error)
    if tail:
        lines += ["native stderr (tail):", tail]
    text = "\n".join(lines) + "\n"
    name = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for where in (folder, cache_log_dir(), Path(tempfile.gettempdir()) / "edgeft-logs"):
        if where is None:
            continue
        try:
            where.mkdir(parents=True, exist_ok=True)
            path = where / name
            path.write_text(text, encoding="utf-8")
            return path.resolve()
        except OSError:
            continue
    raise error  # nowhere to write: better the traceback than nothing


def one_line(error: BaseException) -> str:
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _is_missing_extra(error: BaseException) -> bool:
    from .cli_errors import EXTRAS

    return isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXTRAS


class _Profiler:
    """RSS sampled in a thread; `mark(name)` closes the previous step's line and opens the next."""

    def __init__(self):
        import threading

        self.name, self.t0, self.peak, self.high, self.lock = None, time.perf_counter(), 0, 0, threading.Lock()
        self.page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while True:
            rss = self.rss()
            with self.lock:
                self.peak = max(self.peak, rss)
            time.sleep(0.02)

    def mark(self, name: str | None) -> None:
        import resource
        import sys

        now, rss = time.perf_counter(), self.rss()
        # the sampler needs the GIL, which a long native call may hold: the kernel's high-water mark
        # says exactly when a step set a new process peak
        high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with self.lock:
            peak, self.peak = max(self.peak, rss), rss
        new = high > self.high
        peak, self.high = (max(peak, high) if new else peak), max(self.high, high)
        if self.name is not None:
            print(f"profile: {now - self.t0:7.1f} s  peak {peak / 2**30:6.2f} GiB{'*' if new else ' '} end {rss / 2**30:6.2f} GiB  {self.name}",
                  file=sys.stderr, flush=True)
        self.name, self.t0 = name, now


_PROFILER: _Profiler | None = None


def profile_mark(name: str | None) -> None:
    """Under EDGEFT_PROFILE=1: end the current profiled step and start `name` (None: just end it)."""
    global _PROFILER
    if os.environ.get("EDGEFT_PROFILE", "") in ("", "0") or not os.path.exists("/proc/self/statm"):
        return
    if _PROFILER is None:
        _PROFILER = _Profiler()
    _PROFILER.mark(name)


class Stages:
    """Which stage a job is in: `stages("exporting the ONNX graphs", "hint")` marks the next one."""

    def __init__(self, job: str, model: str, log_folder: Path | None):
        self.job, self.model, self.log_folder = job, model, log_folder
        self.name, self.hint = "preparing", "see the log for the details"

    def __call__(self, name: str, hint: str) -> None:
        self.name, self.hint = name, hint
        profile_mark(name)


@contextlib.contextmanager
def stages(job: str, model, log_folder: Path | None = None):
    """Run a job whose stages are marked on the yielded `Stages`; an unexpected exception becomes
    an ExportError (a MemoryError, a ResourceError) naming the model, the stage and the log."""
    tracker = Stages(job, str(model), log_folder)
    try:
        yield tracker
        profile_mark(None)
    except (EdgeftError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception as e:
        if _is_missing_extra(e):
            raise  # the CLI says which extra to install
        log = write_log(job, e, {"model": tracker.model, "stage": tracker.name}, tracker.log_folder)
        if debug():
            raise
        disk = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
        cls = ResourceError if isinstance(e, MemoryError) else OutputError if disk else ExportError
        what = "ran out of memory" if isinstance(e, MemoryError) else one_line(e)
        raise cls(f"{job} of {tracker.model} failed while {tracker.name}: {what}",
                  f"{tracker.hint}; the full details are in {log}") from None


@contextlib.contextmanager
def stage(name: str, model, hint: str = "see the log for the details", job: str = "export", log_folder: Path | None = None):
    """One stage on its own: `with stage("validating the bundle", model): ...`."""
    with stages(job, model, log_folder) as s:
        s(name, hint)
        yield s
