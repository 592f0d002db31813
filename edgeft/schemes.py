"""Base-weight quantization schemes, as named in target profiles.

Torch-free: the device reads the same names from the bundle manifest.
Spelling: ``int8`` (per output channel), ``int4-g128`` (group-wise over the
input dimension), ``int3-g32-asym``, ``nf4`` (bitsandbytes NF4, double quant).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

_INT = re.compile(r"^int(?P<bits>[2-8])(?:-g(?P<group>\d+))?(?:-(?P<sym>sym|asym))?$")
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size


@dataclass(frozen=True)
class QuantScheme:
    kind: str  # "int" or "nf4"
    bits: int
    group_size: int  # 0 = one scale per output channel
    symmetric: bool

    @property
    def name(self) -> str:
        if self.kind == "nf4":
            return "nf4"
        group = f"-g{self.group_size}" if self.group_size else ""
        default_sym = self.bits >= 4
        sym = "" if self.symmetric == default_sym else ("-sym" if self.symmetric else "-asym")
        return f"int{self.bits}{group}{sym}"

    @property
    def bytes_per_param(self) -> float:
        """Storage on the device: codes packed in 2-, 4- or 8-bit lanes (3 bits take a 4-bit lane,
        so bytes unpack with shifts), plus one fp32 scale per group (nf4: per block) and, for
        the int schemes, one uint8 zero point per group (DequantizeLinear takes them per row)."""
        group = NF4_BLOCK if self.kind == "nf4" else self.group_size
        per_group = 4 if self.kind == "nf4" else 5
        lane = 2 if self.bits <= 2 else 4 if self.bits <= 4 else 8
        return lane / 8 + (per_group / group if group else 0.0)

    def __str__(self) -> str:
        return self.name


def default_scheme(task: str) -> QuantScheme:
    """The base quantization when neither a target nor --quant names one: int8 for an image backbone
    (per-channel int8 keeps a small convnet's accuracy), nf4 (QLoRA's) for text."""
    return parse_scheme("int8" if task == "image-classify" else "nf4")


def parse_scheme(text: str) -> QuantScheme:
    """Symmetric by default at 4 bits and up; asymmetric below, where a zero point buys a level."""
    text = text.strip().lower()
    if text == "nf4":
        return QuantScheme("nf4", 4, NF4_BLOCK, True)
    m = _INT.match(text)
    if not m:
        raise UsageError(
            f"unknown quantization scheme {text!r}",
            "use nf4, int8, or intN-gG with N in 2..8 and a group size G (e.g. int4-g128, int3-g32)",
        )
    bits = int(m["bits"])
    group = int(m["group"] or 0)
    if m["group"] is not None and (group < 8 or group & (group - 1)):
        raise UsageError(f"group size in {text!r} must be a power of two >= 8", "try -g32, -g64 or -g128")
    symmetric = (m["sym"] or ("sym" if bits >= 4 else "asym")) == "sym"
    return QuantScheme("int", bits, group, symmetric)
