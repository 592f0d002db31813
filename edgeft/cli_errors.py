"""How a command fails: the Click group both CLIs use maps every exception to one line and an exit code.

An EdgeftError becomes its message, hint and exit code (edgeft/errors.py); a missing optional
library names the extra that installs it (EXTRAS); anything unexpected becomes one line that
points at a log file with the traceback (edgeft.stages), never a traceback on the terminal.
Shared by the workstation and device command groups, so torch-free.
"""

from __future__ import annotations

import sys

import click

from .errors import EdgeftError


# optional libraries -> the extra that installs them
EXTRAS = {**dict.fromkeys(("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optimum", "matplotlib", "pyarrow"), "train"),
          "onnx": "export", **dict.fromkeys(("onnxruntime", "tokenizers", "jinja2", "safetensors"), "device")}


class CommandError(click.ClickException):
    """An EdgeftError as Click shows it: one message, a hint, the error's exit code."""

    def __init__(self, error: EdgeftError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


class EdgeftGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeftError as e:
            raise CommandError(e) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            from .errors import INTERRUPTED

            sys.exit(INTERRUPTED)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as e:  # never a traceback: one line, the details in a log (EDGEFT_DEBUG=1 re-raises)
            raise CommandError(unexpected(e)) from None

    def group(self, *args, **kwargs):
        kwargs.setdefault("cls", EdgeftGroup)
        return super().group(*args, **kwargs)


def unexpected(e: Exception) -> EdgeftError:
    """What the user sees of an exception no code path expected: a missing optional library is
    a ResourceError naming the extra; anything else a one-line InternalError pointing at a log
    file with the traceback (edgeft.stages). Under EDGEFT_DEBUG=1 the exception propagates."""
    from .errors import InternalError, ResourceError

    extra = EXTRAS.get((e.name or "").split(".")[0]) if isinstance(e, ModuleNotFoundError) else None
    if extra is not None:
        return ResourceError(f"this command needs {e.name}, which is not installed here", f'pip install "edgeft[{extra}]" (see `edgeft doctor`)')
    from .stages import debug, one_line, write_log

    if not getattr(e, "edgeft_log", None):  # a nested group re-raising under EDGEFT_DEBUG: logged once
        e.edgeft_log = write_log("internal", e, {})
    if debug():
        raise e
    return InternalError(f"internal error: {one_line(e)}", f"this is a bug in edgeft; please report it with the log {e.edgeft_log}")
