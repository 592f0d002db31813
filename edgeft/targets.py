"""Target device profiles: one TOML per device under targets/.

A profile fixes what the device can hold (memory budget, threads, execution
providers), the base-weight quantization scheme its graph will use, and the
training shape (batch x sequence length). Validation names the failing field.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import TargetError, UsageError
from .schemes import QuantScheme, parse_scheme

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ARCHES = ("aarch64", "armv7l", "x86_64")
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "XnnpackExecutionProvider")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    arch: str
    ram_mb: int
    budget_mb: int
    threads: int
    execution_providers: tuple[str, ...]
    scheme: QuantScheme
    max_seq_len: int
    batch_size: int
    source: str = ""
    # [vision] (optional): what an image backbone uses instead (convolutions: int8 per channel by default)
    vision_scheme: QuantScheme | None = None
    vision_batch_size: int | None = None

    def for_task(self, task: str) -> "TargetProfile":
        """The profile an image-classify run trains and exports with: its [vision] scheme (int8 unless
        the profile says otherwise) and batch; text tasks get the profile as it is."""
        if task != "image-classify":
            return self
        from dataclasses import replace

        return replace(self, scheme=self.vision_scheme or parse_scheme("int8"), batch_size=self.vision_batch_size or self.batch_size)

    def to_dict(self, source: bool = True) -> dict:
        """The profile as plain values; `source=False` leaves out the TOML's path (a manifest
        carries the profile itself, never a workstation path)."""
        d = asdict(self)
        d["scheme"] = self.scheme.name
        d["vision_scheme"] = self.vision_scheme.name if self.vision_scheme else None
        d["execution_providers"] = list(self.execution_providers)
        if not source:
            d.pop("source")
        return d


def targets_dir() -> Path:
    """Profiles ship inside the wheel (edgeft/_targets) or sit at the repo root in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_targets", here.parent / "targets"):
        if candidate.is_dir():
            return candidate
    raise TargetError("no built-in target profiles found", "reinstall edgeft, or pass --target path/to/profile.toml")


def list_targets() -> list[TargetProfile]:
    return [load_target(p) for p in sorted(targets_dir().glob("*.toml"))]


def load_target(name_or_path: str | Path) -> TargetProfile:
    """A built-in name (raspberry-pi-5-8gb) or a path to a user's own TOML."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.exists():
        path = targets_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            known = ", ".join(p.stem for p in sorted(targets_dir().glob("*.toml")))
            raise TargetError(f"unknown target {str(name_or_path)!r}", f"pick one of: {known}; or pass a .toml path")
    if not path.is_file():
        raise TargetError(f"target profile not found: {path}", "check the path, or run `edgeft targets list`")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"{path}: not valid TOML ({e})", "fix the syntax; see targets/x86-64-cpu.toml for a template")
    return _validate(raw, path)


def _field(raw: dict, dotted: str, kind: type, path: Path, *, min_value: int | None = None):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise TargetError(f"{path}: missing field '{dotted}'", "see targets/x86-64-cpu.toml for every field")
        node = node[part]
    if kind is int and (isinstance(node, bool) or not isinstance(node, int)):
        raise TargetError(f"{path}: field '{dotted}' must be an integer, got {node!r}")
    if kind is not int and not isinstance(node, kind):
        raise TargetError(f"{path}: field '{dotted}' must be a {kind.__name__}, got {node!r}")
    if min_value is not None and node < min_value:
        raise TargetError(f"{path}: field '{dotted}' must be >= {min_value}, got {node}")
    return node


def _validate(raw: dict, path: Path) -> TargetProfile:
    name = _field(raw, "name", str, path)
    arch = _field(raw, "arch", str, path)
    if arch not in ARCHES:
        raise TargetError(f"{path}: field 'arch' must be one of {', '.join(ARCHES)}, got {arch!r}")
    ram = _field(raw, "memory.ram_mb", int, path, min_value=64)
    budget = _field(raw, "memory.budget_mb", int, path, min_value=32)
    if budget > ram:
        raise TargetError(f"{path}: field 'memory.budget_mb' ({budget}) exceeds 'memory.ram_mb' ({ram})")
    providers = _field(raw, "compute.execution_providers", list, path)
    bad = [p for p in providers if p not in PROVIDERS]
    if not providers or bad:
        raise TargetError(
            f"{path}: field 'compute.execution_providers' has {bad or 'no entries'}",
            f"use some of: {', '.join(PROVIDERS)}",
        )
    try:
        scheme = parse_scheme(_field(raw, "quantization.scheme", str, path))
    except UsageError as e:
        raise TargetError(f"{path}: field 'quantization.scheme': {e.message}", e.hint) from None
    return TargetProfile(
        name=name,
        description=raw.get("description", ""),
        arch=arch,
        ram_mb=ram,
        budget_mb=budget,
        threads=_field(raw, "compute.threads", int, path, min_value=1),
        execution_providers=tuple(providers),
        scheme=scheme,
        max_seq_len=_field(raw, "training.max_seq_len", int, path, min_value=8),
        batch_size=_field(raw, "training.batch_size", int, path, min_value=1),
        source=str(path),
        **_vision(raw, path),
    )


def _vision(raw: dict, path: Path) -> dict:
    if "vision" not in raw:
        return {}
    out = {}
    if "scheme" in raw["vision"]:
        try:
            out["vision_scheme"] = parse_scheme(_field(raw, "vision.scheme", str, path))
        except UsageError as e:
            raise TargetError(f"{path}: field 'vision.scheme': {e.message}", e.hint) from None
    if "batch_size" in raw["vision"]:
        out["vision_batch_size"] = _field(raw, "vision.batch_size", int, path, min_value=1)
    return out
