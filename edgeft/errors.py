"""Domain errors. Each message says what went wrong and what to do next.

The core raises these; the CLI turns them into a one-line message and a
non-zero exit code, never a traceback.
"""


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
