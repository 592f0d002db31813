"""The bundle manifest: what a device needs to trust and use a bundle. Torch-free.

Every file is listed with its sha256 and size; `verify_bundle` checks them all
before anything is loaded, and names the first file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .basemodel import BaseId

from .errors import BundleError  # defined in errors.py (the one exit-code table)

SCHEMA_VERSION = 3  # 2: the base is named and fingerprinted (`base`), never a path; 3: the frozen base stored once (`frozen`)
MANIFEST = "manifest.json"
ORT_TRAINING = "1.19.2"  # the last onnxruntime-training release; the artifacts are made with it


@dataclass(frozen=True)
class TrainShape:
    batch: int
    seq: int


@dataclass
class Manifest:
    """manifest.json as an object. `extra` keeps fields this version does not know, so a
    manifest read and written again loses nothing."""

    task: str  # "classify" | "causal-lm"
    labels: list[str]
    target: dict  # the target profile (TargetProfile.to_dict without its file path)
    scheme: str
    model_type: str
    base: BaseId  # the base model by name and fingerprint
    trainable: dict[str, str]  # ONNX initializer name -> key in adapter/adapter_model.safetensors
    inputs: dict[str, list[str]]
    train_shape: TrainShape
    max_seq_len: int
    tokenizer: list[str]  # files under tokenizer/
    optimizer: dict
    files: dict[str, dict]  # relative path -> {"sha256", "bytes"}
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    edgeft_version: str | None = None
    onnxruntime: dict = field(default_factory=lambda: {"training": ORT_TRAINING, "inference": ">=1.19"})
    portable: dict | None = None  # the standard-op training step (see workstation/portable.py)
    frozen: str | None = None  # the frozen base (packed codes, scales; fp32 norms, biases): one file every graph reads as inputs
    schedule: dict = field(default_factory=dict)  # learning-rate schedule of the run: name, warmup_ratio
    inference: dict = field(default_factory=dict)  # {"file", "disabled_optimizers"}
    parity: dict = field(default_factory=dict)
    base_bytes_per_param: float | None = None
    memory_plan: dict | None = None
    reference: dict | None = None  # {"file", "rows"}: the forgetting-check rows
    extra: dict = field(default_factory=dict)

    @property
    def target_name(self) -> str:
        return self.target.get("name", "")

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> Manifest:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        try:
            known["base"] = BaseId.from_dict(d.get("base"))
            if known["base"] is None:
                raise KeyError("base")
            known["train_shape"] = TrainShape(**d["train_shape"])
            return cls(**known, extra={k: v for k, v in d.items() if k not in names})
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: a required field is missing or malformed ({e})",
                              "re-export the bundle with this edgeft version") from None

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        return read_manifest(folder)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "files")}
        d["base"], d["train_shape"] = self.base.to_dict(), asdict(self.train_shape)
        return {**d, **self.extra, "files": self.files}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, values: dict | Manifest, files: dict | None = None) -> Manifest:
    """List every file of `folder` with its sha256 and size (or take `files`, an earlier manifest's list
    of the same, unchanged files), and write manifest.json last."""
    from .fsutil import atomic_write_text

    folder = Path(folder)
    files = files if files is not None else {str(p.relative_to(folder)): {"sha256": sha256(p), "bytes": p.stat().st_size}
                                             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    values = values.to_dict() if isinstance(values, Manifest) else values
    manifest = Manifest.from_dict({"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   **values, "files": files})
    atomic_write_text(folder / MANIFEST, manifest.to_json())
    return manifest


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not an edgeft bundle (no {MANIFEST})", "pass the folder written by `edgeft export`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupt ({e})", "copy the bundle again from the workstation") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema version {version} is not {SCHEMA_VERSION}",
                          "re-export the bundle with this edgeft version, or install the edgeft that made it")
    return Manifest.from_dict(raw, str(path))


def verify_bundle(folder: Path) -> Manifest:
    """Check every listed file's size and sha256; return the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle file missing: {name}", "copy the whole bundle folder again")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest (tampered or corrupt)",
                              "copy the bundle again from the workstation")
    return manifest
