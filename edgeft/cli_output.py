"""What a command prints: `emit` writes its result as JSON (--json, for scripts) or as the
human summary. Shared by the workstation and device command groups, so torch-free."""

from __future__ import annotations

import json

import click


def emit(data: dict, as_json: bool, human: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else human)
