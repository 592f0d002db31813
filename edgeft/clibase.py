"""Click plumbing shared by the workstation and device command groups. Torch-free."""

from __future__ import annotations

import json
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
        except ModuleNotFoundError as e:
            extra = EXTRAS.get((e.name or "").split(".")[0])
            if extra is None:
                raise
            from .errors import ResourceError

            raise CommandError(ResourceError(f"this command needs {e.name}, which is not installed here",
                                             f'pip install "edgeft[{extra}]" (see `edgeft doctor`)')) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            from .errors import INTERRUPTED

            sys.exit(INTERRUPTED)

    def group(self, *args, **kwargs):
        kwargs.setdefault("cls", EdgeftGroup)
        return super().group(*args, **kwargs)


def emit(data: dict, as_json: bool, human: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else human)
