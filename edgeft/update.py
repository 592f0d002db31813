"""Adapter-only updates: a new adapter for a bundle a device already holds. Torch-free.

An update is a small folder, a few MB where the bundle is tens or hundreds:

  update.json          what it is for (below); written last, so a folder without it is incomplete
  weights.safetensors  the trainable tensors under the bundle's ONNX names: what the device stores
                       as a generation (device/state.py), fp32
  adapter/             the run's adapter_config.json and edgeft.json: the PEFT configuration and
                       the run's metadata, for the record (`edgeft device export-adapter` turns a
                       generation back into a complete PEFT folder)

The PEFT weights are not carried a second time: they are the same tensors under other names
(manifest.trainable maps one to the other), and a second copy would double the update.

update.json names the base (name + fingerprint), the bundle it was checked against (sha256 of its
manifest.json), task, labels, scheme, the LoRA configuration that the bundle's graphs bake in
(rank, alpha, targets...), every trainable tensor's ONNX name, PEFT key and shape, the parity
figures of the workstation's check, and every file's sha256 and size. Both halves check an update
against a bundle with `mismatches`: the workstation before it writes one, the device before it
applies one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .basemodel import BaseId
from .bundle import MANIFEST, Manifest, sha256
from .datasets import LABELLED_TASKS
from .errors import BundleError

UPDATE_SCHEMA = 1
UPDATE_MANIFEST = "update.json"
WEIGHTS = "weights.safetensors"
KIND = "edgeft-adapter-update"
# adapter_config.json fields that change what the bundle's graphs compute (the LoRA scaling alpha/r is
# a constant in them); the rest (dropout, revision, inference_mode, base path...) do not
LORA_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "modules_to_save", "bias",
               "fan_in_fan_out", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern")


def lora_signature(adapter_config: dict) -> dict:
    sig = {}
    for k in LORA_FIELDS:
        v = adapter_config.get(k)
        if isinstance(v, (list, tuple, set)):
            v = sorted(set(v))  # PEFT writes module sets in no fixed order, and repeats modules_to_save after a reload
        if v not in (None, {}, []):
            sig[k] = v
    return sig


def read_lora_signature(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return lora_signature(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {path} ({e})", "copy the folder again") from None


def bundle_identity(bundle: Path) -> str:
    """A bundle is its manifest: every file's sha256 is in it, so its own sha256 names the whole bundle."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not an edgeft bundle (no {MANIFEST})", "pass the folder written by `edgeft export`")
    return "sha256:" + sha256(path)


def tensor_shapes(path: Path, names: dict[str, str] | None = None) -> dict[str, tuple]:
    """Shapes from a safetensors header (no tensor is read); `names` renames key -> name."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path} is unreadable ({e})", "copy it again") from None
    if names is None:
        return shapes
    return {name: shapes[key] for name, key in names.items() if key in shapes}


def bundle_shapes(bundle: Path, manifest: Manifest) -> dict[str, tuple]:
    """The bundle's trainable tensors by ONNX name -> shape (from its PEFT adapter's header)."""
    return tensor_shapes(Path(bundle) / "adapter" / "adapter_model.safetensors", manifest.trainable)


@dataclass
class UpdateManifest:
    base: BaseId
    bundle: dict  # {"manifest_sha256", "target", "created"}: the bundle the update was checked against
    task: str
    labels: list[str]
    scheme: str
    trainable: dict[str, dict]  # ONNX name -> {"peft_key", "shape", "dtype"}
    lora: dict  # lora_signature of the adapter
    files: dict[str, dict]  # relative path -> {"sha256", "bytes"}
    source: dict = field(default_factory=dict)  # {"name", "step", "metrics"}: the run it came from
    parity: dict = field(default_factory=dict)  # torch vs the bundle's inference graph with these weights
    kind: str = KIND
    schema_version: int = UPDATE_SCHEMA
    created: str = ""
    edgeft_version: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        first = {"kind": self.kind, "schema_version": self.schema_version, "created": self.created, "edgeft_version": self.edgeft_version,
                 "base": self.base.to_dict()}
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in (*first, "extra", "files")}
        return {**first, **rest, **self.extra, "files": self.files}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> UpdateManifest:
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise BundleError(f"{where} is not an edgeft update", "pass the folder written by `edgeft export --update-for`")
        if d.get("schema_version") != UPDATE_SCHEMA:
            raise BundleError(f"{where}: update schema {d.get('schema_version')} is not {UPDATE_SCHEMA}",
                              "make the update with the edgeft version the device runs")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        try:
            known["base"] = BaseId.from_dict(d.get("base"))
            if known["base"] is None:
                raise KeyError("base")
            return cls(**known, extra={k: v for k, v in d.items() if k not in names})
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: a required field is missing or malformed ({e})", "make the update again") from None


def write_update_manifest(folder: Path, values: dict) -> UpdateManifest:
    """List every file of `folder` with its sha256 and size, and write update.json last."""
    from .fsutil import atomic_write_text

    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != UPDATE_MANIFEST}
    d = {"kind": KIND, "schema_version": UPDATE_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **values, "files": files}
    manifest = UpdateManifest.from_dict(json.loads(json.dumps(d)), str(folder / UPDATE_MANIFEST))  # JSON types (lists, not tuples)
    atomic_write_text(folder / UPDATE_MANIFEST, to_json(manifest.to_dict()))
    return manifest


def write_update(out: Path, bundle: Path, manifest: Manifest, weights: dict, adapter_config: Path, record: dict,
                 lora: dict, source: dict, parity: dict) -> tuple[UpdateManifest, int]:
    """An adapter-only update folder for `bundle` (what `edgeft export --update-for` and a fleet round
    write), made atomically: the weights, the PEFT config and `record` as adapter/edgeft.json, update.json.
    Returns (its manifest, its bytes)."""
    import shutil

    from safetensors.numpy import save_file

    from . import __version__
    from .basemodel import set_peft_base_name
    from .fsutil import atomic_dir

    with atomic_dir(out) as tmp:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "edgeft-update", "base": manifest.base.fingerprint})
        (tmp / "adapter").mkdir()
        shutil.copy2(adapter_config, tmp / "adapter" / "adapter_config.json")
        set_peft_base_name(tmp / "adapter", manifest.base.name)
        (tmp / "adapter" / "edgeft.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written = write_update_manifest(tmp, {
            "edgeft_version": __version__, "base": manifest.base.to_dict(),
            "bundle": {"manifest_sha256": bundle_identity(bundle), "target": manifest.target_name, "created": manifest.created},
            "task": manifest.task, "labels": manifest.labels if manifest.task in LABELLED_TASKS else [], "scheme": manifest.scheme,
            "trainable": {n: {"peft_key": k, "shape": list(weights[n].shape), "dtype": "float32"} for n, k in manifest.trainable.items()},
            "lora": lora, "source": source, "parity": parity,
        })
        size = update_bytes(tmp)
    return written, size


def to_json(d: dict) -> str:
    """One line per top-level field, and per tensor and file: readable, and a few hundred tensors stay a few dozen KB."""
    def value(v):
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            inner = ",\n".join(f"    {json.dumps(k, ensure_ascii=False)}: {json.dumps(x, ensure_ascii=False)}" for k, x in v.items())
            return "{\n" + inner + "\n  }"
        return json.dumps(v, ensure_ascii=False)

    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {value(v)}" for k, v in d.items()) + "\n}\n"


def read_update(folder: Path) -> UpdateManifest:
    folder = Path(folder)
    path = folder / UPDATE_MANIFEST
    if not folder.is_dir():
        raise BundleError(f"update folder not found: {folder}", "pass the folder written by `edgeft export --update-for`")
    if not path.is_file():
        raise BundleError(f"{folder} is not a complete edgeft update (no {UPDATE_MANIFEST})", "copy the whole update folder again")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupt ({e})", "copy the update again from the workstation") from None
    return UpdateManifest.from_dict(raw, str(path))


def verify_update(folder: Path) -> tuple[UpdateManifest, str]:
    """(manifest, sha256 of update.json) once every listed file matches its size and sha256, and
    nothing the update needs is unlisted."""
    folder = Path(folder)
    upd = read_update(folder)
    if WEIGHTS not in upd.files:
        raise BundleError(f"{folder / UPDATE_MANIFEST} does not list {WEIGHTS}", "make the update again")
    for name, entry in upd.files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BundleError(f"{folder / UPDATE_MANIFEST} lists a file outside the update: {name}", "make the update again")
        if not path.is_file():
            raise BundleError(f"update file missing: {name}", "copy the whole update folder again")
        if path.stat().st_size != entry.get("bytes") or sha256(path) != entry.get("sha256"):
            raise BundleError(f"update file {name} does not match its sha256 in {UPDATE_MANIFEST} (tampered or corrupt)",
                              "copy the update again from the workstation")
    return upd, "sha256:" + sha256(folder / UPDATE_MANIFEST)


def mismatches(*, base: BaseId | None, task: str, labels: list[str], scheme: str | None, lora: dict | None,
               shapes: dict[str, tuple] | None, manifest: Manifest, bundle_shapes: dict[str, tuple], bundle_lora: dict) -> list[str]:
    """Why an adapter cannot replace the bundle's: one sentence per difference, base first. Empty: it fits.
    `None` for what is unknown (an adapter from another tool records no scheme). Another task (an image
    adapter for a text bundle) is said alone, after the base: every other difference follows from it."""
    out = []
    if base is not None and base.fingerprint != manifest.base.fingerprint:
        out.append(f"it was made for base {base.short()}, the bundle holds base {manifest.base.short()}")
    if task != manifest.task:
        return [*out, f"its task is {task}, the bundle's is {manifest.task}"]
    if task in LABELLED_TASKS and list(labels) != list(manifest.labels):
        out.append(f"its labels are {','.join(labels) or '(none)'}, the bundle's are {','.join(manifest.labels)} (same names, same order)")
    if scheme is not None and scheme != manifest.scheme:
        out.append(f"it was trained against base quantization {scheme}, the bundle's base is {manifest.scheme}")
    if lora is not None:
        diff = sorted(k for k in set(lora) | set(bundle_lora) if lora.get(k) != bundle_lora.get(k))
        if diff:
            out.append("its LoRA configuration differs: " + ", ".join(f"{k} {lora.get(k)} (bundle {bundle_lora.get(k)})" for k in diff))
    if shapes is not None:
        missing = sorted(set(bundle_shapes) - set(shapes))
        extra = sorted(set(shapes) - set(bundle_shapes))
        wrong = sorted(n for n in set(shapes) & set(bundle_shapes) if tuple(shapes[n]) != tuple(bundle_shapes[n]))
        if missing:
            out.append(f"it lacks {len(missing)} of the bundle's trainable tensors (first: {missing[0]})")
        if extra:
            out.append(f"it has {len(extra)} tensors the bundle does not train (first: {extra[0]})")
        if wrong:
            n = wrong[0]
            out.append(f"{len(wrong)} tensors have other shapes (first: {n} {tuple(shapes[n])}, bundle {tuple(bundle_shapes[n])})")
    return out


def update_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
