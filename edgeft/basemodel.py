"""Which base model an adapter or bundle belongs to, without a path. Torch-free.

A base is recorded by its name (the folder's, or the hub id of a Hugging Face cache
snapshot) and a fingerprint: sha256 over config.json and every weight file, in name
order. Paths never leave the workstation; a folder found later (--model, a run's
config, an adapter's path hint) is checked against the fingerprint before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

CHUNK = 8 << 20
_cache: dict[tuple, str] = {}  # (folder, (file, size, mtime_ns)...) -> fingerprint


@dataclass(frozen=True)
class BaseId:
    name: str
    fingerprint: str

    def to_dict(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict | None) -> BaseId | None:
        if not isinstance(d, dict) or not d.get("fingerprint"):
            return None
        return cls(str(d.get("name") or ""), str(d["fingerprint"]))

    def short(self) -> str:
        return f"{self.name} ({self.fingerprint.removeprefix('sha256:')[:12]})"


def weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    return files or sorted(p for p in folder.glob("*.bin") if p.is_file())


def fingerprint(folder: str | Path) -> str:
    """sha256 over (name, bytes) of config.json and each weight file, sorted by name.
    Cached per process while no file's size or mtime changes (a 2.5 GB base takes seconds)."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)", "pass the base model folder with --model")
    files = [config, *weight_files(folder)]
    key = (str(folder.resolve()), tuple((p.name, (s := p.stat()).st_size, s.st_mtime_ns) for p in files))
    if key not in _cache:
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        for p in files:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
        _cache[key] = "sha256:" + h.hexdigest()
    return _cache[key]


def base_name(folder: str | Path) -> str:
    """A hub cache snapshot (models--org--name/snapshots/<sha>): the hub id; a config naming its
    hub id (`_name_or_path` "org/name", older transformers): that; else the folder's name."""
    folder = Path(folder).resolve()
    if re.fullmatch(r"[0-9a-f]{40}", folder.name) and folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    try:
        given = str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path") or "")
    except (OSError, ValueError, AttributeError):
        given = ""
    return given if meaningful(given) and "/" in given else folder.name


def meaningful(name: str) -> bool:
    """A hub id (org/name) or a bare name, not a local path."""
    return bool(name) and not os.path.isabs(name) and not name.startswith((".", "~")) and name.count("/") <= 1


def identify(folder: str | Path) -> BaseId:
    return BaseId(base_name(folder), fingerprint(folder))


def path_hint(base: str | Path, start: str | Path) -> str | None:
    """The base folder relative to `start` (an adapter folder), or None where no relative path exists."""
    try:
        return os.path.relpath(Path(base).resolve(), Path(start).resolve())
    except ValueError:
        return None


def check_base(folder: str | Path, expected: BaseId | None, what: str) -> BaseId:
    """The folder's identity; a ModelError (exit 4) when it is not the base `what` was made for."""
    found = identify(folder)
    if expected is not None and found.fingerprint != expected.fingerprint:
        raise ModelError(f"{folder} is base {found.short()}, but {what} was made for base {expected.short()}",
                         f"pass --model with the folder of {expected.name or 'that base'} (config and weights unchanged)")
    return found


def set_peft_base_name(adapter_dir: str | Path, name: str) -> None:
    """PEFT's adapter_config.json names the base by name, not by a workstation path."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("base_model_name_or_path") != name:
        cfg["base_model_name_or_path"] = name
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
