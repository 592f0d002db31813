"""Quantize frozen base weights exactly as the device graph will hold them.

For the int schemes the device runs ONNX ``DequantizeLinear``: y = (q - zp) * scale
in fp32, per output channel or blocked along the input dimension. We compute the
same expression in the same order, so the workstation base equals the device base
value for value and the adapters learn to correct the very error the device sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schemes import QuantScheme


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # (out, in) int8 (symmetric) or uint8 (asymmetric)
    scale: torch.Tensor  # (out, n_groups) fp32
    zero: torch.Tensor | None  # (out, n_groups) uint8, asymmetric only
    group_size: int  # along the input dimension; the last group may be short


CHUNK = 1 << 23  # elements quantized at a time: rows are independent, so chunks bound the fp32 temporaries


def quantize(w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """w: (out, in). Groups run along `in`; a ragged last group is padded with zeros,
    which never moves the range because zero is always representable. Large tensors go a
    block of rows at a time (the same values: no group spans two rows)."""
    assert scheme.kind == "int", scheme
    rows = max(1, CHUNK // max(1, w.shape[1]))
    if w.shape[0] > rows:
        parts = [_quantize(w[i : i + rows], scheme) for i in range(0, w.shape[0], rows)]
        zero = torch.cat([p.zero for p in parts]) if parts[0].zero is not None else None
        return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), zero, parts[0].group_size)
    return _quantize(w, scheme)


def _quantize(w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    w = w.detach().float()
    out_f, in_f = w.shape
    g = scheme.group_size or in_f
    n_groups = -(-in_f // g)
    padded = torch.nn.functional.pad(w, (0, n_groups * g - in_f)).view(out_f, n_groups, g)
    if scheme.symmetric:
        qmax = 2 ** (scheme.bits - 1) - 1
        scale = padded.abs().amax(-1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(padded / scale[..., None]), -qmax - 1, qmax).to(torch.int8)
        zero = None
    else:
        qmax = 2**scheme.bits - 1
        lo = padded.amin(-1).clamp(max=0)
        hi = padded.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_f = torch.clamp(torch.round(-lo / scale), 0, qmax)
        codes = torch.clamp(torch.round(padded / scale[..., None]) + zero_f[..., None], 0, qmax).to(torch.uint8)
        zero = zero_f.to(torch.uint8)
    codes = codes.view(out_f, n_groups * g)[:, :in_f].contiguous()
    return QuantizedWeight(codes, scale.contiguous(), zero, g)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """fp32 (out, in), computed as DequantizeLinear does: (int32(q) - int32(zp)) -> float * scale."""
    out_f, in_f = q.codes.shape
    scale = q.scale.repeat_interleave(q.group_size, dim=1)[:, :in_f]
    centred = q.codes.to(torch.int32)
    if q.zero is not None:
        centred = centred - q.zero.to(torch.int32).repeat_interleave(q.group_size, dim=1)[:, :in_f]
    return centred.to(torch.float32) * scale


def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The base weight the device will hold, in fp32 and in w's shape."""
    if scheme.kind == "nf4":
        return nf4_roundtrip(w)
    return dequantize(quantize(w, scheme))


def nf4_quantize(w: torch.Tensor):
    """bitsandbytes NF4 with double quantization, as `Linear4bit` stores it: (packed, state)."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(w.detach().float().contiguous(), quant_type="nf4", compress_statistics=True)


def nf4_dequantize(packed_state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(*packed_state).float()


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    return nf4_dequantize(nf4_quantize(w))


def bnb_dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 weight a loaded `bnb.nn.Linear4bit` actually computes with."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
