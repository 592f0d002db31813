"""Domain errors. Each message says what went wrong and what to do next.

The core raises these; the CLI turns them into a one-line message and a
non-zero exit code, never a traceback.

This module is the one table of exit codes: every error class and its code is
defined here (README.md's "exit code" table says the same; a test keeps them
in step). Modules that once defined their own (bundle.BundleError,
plan.PlanError, device.state.StateError, ...) re-export these.

| code | class | meaning |
|---|---|---|
| 0 | | success |
| 1 | EdgeftError, InternalError | other error |
| 2 | UsageError | bad option or usage |
| 3 | DataError | bad data |
| 4 | ModelError | bad or unsupported model |
| 5 | TargetError | bad or unknown target |
| 6 | OutputError | output folder exists or is not writable |
| 7 | ResourceError | resource missing |
| 8 | BundleError | bundle missing, corrupt or tampered |
| 9 | PlanError | memory plan over the target's budget |
| 10 | ExportError | export cannot differentiate or build the graph |
| 11 | StateError | device state problem |
| 12 | RuntimeMismatch | wrong ONNX Runtime for the bundle |
| 13 | TrainingDiverged | training diverged (NaN/inf loss) |
"""

INTERRUPTED = 130  # Ctrl-C: the shell's convention (128 + SIGINT), not an error of edgeft's


class EdgeftError(Exception):
    """Base class. `hint` is the next step the user should take."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class UsageError(EdgeftError):
    """Bad option values or combinations."""

    exit_code = 2


class DataError(EdgeftError):
    """A dataset file is missing, empty, malformed or inconsistent."""

    exit_code = 3


class ModelError(EdgeftError):
    """A model folder is missing, not a HF model, or unsupported."""

    exit_code = 4


class TargetError(EdgeftError):
    """A target profile is unknown or invalid."""

    exit_code = 5


class OutputError(EdgeftError):
    """An output location exists or cannot be written."""

    exit_code = 6


class ResourceError(EdgeftError):
    """The machine lacks what the job needs (CUDA, memory)."""

    exit_code = 7


class BundleError(EdgeftError):
    """A bundle is missing, corrupt or tampered with (the file is named)."""

    exit_code = 8


class PlanError(EdgeftError):
    """The device memory plan exceeds the target's budget."""

    exit_code = 9


class ExportError(EdgeftError):
    """Export cannot differentiate or build the graph (or the bundle fails validation)."""

    exit_code = 10


class StateError(EdgeftError):
    """The device's training state: unknown generation, an interrupted job with other data, busy."""

    exit_code = 11


class RuntimeMismatch(EdgeftError):
    """The installed ONNX Runtime cannot run this bundle."""

    exit_code = 12


class TrainingDiverged(EdgeftError):
    """The loss became NaN/inf; the previous state stays in place."""

    exit_code = 13


class InternalError(EdgeftError):
    """An unexpected failure (a bug): one line, the details in a log file."""

    exit_code = 1


def exit_codes() -> dict[int, list[type[EdgeftError]]]:
    """code -> the classes that exit with it (the table above, as data)."""
    table: dict[int, list[type[EdgeftError]]] = {}
    for cls in [EdgeftError, *_subclasses(EdgeftError)]:
        if cls.__module__ == __name__:
            table.setdefault(cls.exit_code, []).append(cls)
    return dict(sorted(table.items()))


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)
