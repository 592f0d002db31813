"""The bundle manifest: what a device needs to trust and use a bundle. Torch-free.

Every file is listed with its sha256 and size; `verify_bundle` checks them all
before anything is loaded, and names the first file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .errors import BundleError  # defined in errors.py (the one exit-code table)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ORT_TRAINING = "1.19.2"  # the last onnxruntime-training release; the artifacts are made with it


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, fields: dict) -> dict:
    from .fsutil import atomic_write_json

    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "onnxruntime": {"training": ORT_TRAINING, "inference": ">=1.19"}, **fields, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not an edgeft bundle (no {MANIFEST})", "pass the folder written by `edgeft export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupt ({e})", "copy the bundle again from the workstation") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}",
                          "re-export the bundle with this edgeft version, or install the edgeft that made it")
    return manifest


def verify_bundle(folder: Path) -> dict:
    """Check every listed file's size and sha256; return the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle file missing: {name}", "copy the whole bundle folder again")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest (tampered or corrupt)",
                              "copy the bundle again from the workstation")
    return manifest
