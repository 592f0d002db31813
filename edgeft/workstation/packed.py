"""The frozen base held packed while it trains: codes + scales, rebuilt when a layer runs.

QLoRA for every scheme: each quantized linear and embedding keeps only
  codes  uint8, 2 codes per byte at 3-4 bits, 4 at 2 bits, 1 at 5-8 bits (the lanes of a byte
         hold rows m apart, see `_unpack`)
  scale  fp32 per group (int) or per 64-block absmax (nf4, double quant undone)
  zero   uint8 per group (asymmetric int only)
and rebuilds its fp32 weight each time it runs: once in forward, and once more in backward
for grad_input = grad_out @ W (`_PackedLinearFn`; W is never kept for backward). An embedding
rebuilds only the rows it gathers; a tied lm_head shares the embedding's PackedWeight.

The rebuilt values are exactly `quantize.dequantize` (and, for nf4 tables, bitsandbytes'
`dequantize_4bit`) bit for bit: the centred code (q - zero) is a small integer, exact in
fp32, multiplied once by its fp32 scale, the same single rounding DequantizeLinear does on
the device. The layers stay `nn.Linear` / `nn.Embedding` subclasses, so PEFT attaches LoRA
to them unchanged; `.weight` still reads (rebuilt on access, frozen), but PEFT's merge writes
into `.weight.data` and so needs `unpack_model` first (device_model does that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..schemes import QuantScheme


def storage_bits(bits: int) -> int:
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


class PackedWeight(torch.nn.Module):
    """One frozen (out, in) weight, packed. A module (not bare tensors) so a tied embedding and
    lm_head share one copy that `.to(device)` moves once; its buffers never change dtype."""

    def __init__(self, kind: str, shape: tuple[int, int], codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group: int, bits: int, offset: int = 0, lut: torch.Tensor | None = None):
        super().__init__()
        self.kind, self.shape, self.group, self.bits, self.offset = kind, tuple(shape), group, bits, offset
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("lut", lut)  # nf4: byte -> its two codebook values, as one int64
        # The vocabulary projection runs only at labelled positions, so on a CPU rebuilding its V x H
        # weight a second time for backward cost as much as the projection itself (Qwen2.5-0.5B: 0.7 s
        # of a 7 s step); there it keeps the forward's rebuild for the step (V x H x 4 bytes of RAM).
        # A GPU rebuilds it in a millisecond, and its memory is the scarce thing: it rebuilds.
        self.keep_for_backward = False

    # -- building ----------------------------------------------------------------
    @classmethod
    def from_int(cls, q, scheme: QuantScheme) -> "PackedWeight":
        """From `quantize.QuantizedWeight`: codes (out, in) int8/uint8, scale/zero (out, n_groups)."""
        out_f, in_f = q.codes.shape
        sb = storage_bits(scheme.bits)
        if sb == 8:  # one code per byte: symmetric codes stay int8 (already centred), asymmetric stay uint8
            return cls("int", (out_f, in_f), q.codes.contiguous(), q.scale.float().contiguous(), q.zero, q.group_size, scheme.bits)
        offset = 2 ** (scheme.bits - 1) if scheme.symmetric else 0
        return cls("int", (out_f, in_f), _pack_lanes(q.codes, sb, offset), q.scale.float().contiguous(), q.zero, q.group_size,
                   scheme.bits, offset)

    @classmethod
    def from_nf4(cls, packed_state, shape: tuple[int, int]) -> "PackedWeight | None":
        """From `quantize.nf4_quantize`: bitsandbytes bytes (element 2i in the high nibble) and its
        double-quantized absmax, undone once here. None where a 64-block would straddle two rows."""
        import bitsandbytes.functional as bnbf

        data, state = packed_state
        out_f, in_f = shape
        block = state.blocksize
        if in_f % block or in_f % 2:
            return None
        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        absmax = absmax.float().reshape(out_f, in_f // block).contiguous()
        code = state.code.float()
        b = torch.arange(256, device=code.device)
        pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()  # (256, 2) fp32: high nibble first
        return cls("nf4", (out_f, in_f), data.reshape(out_f, in_f // 2).contiguous(), absmax, None, block, 4,
                   lut=pairs.view(torch.int64).reshape(256))

    # -- rebuilding --------------------------------------------------------------
    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 (out, in), or only `rows` of it (an index tensor): the exact device values.

        Every step is a contiguous elementwise op (vectorized on CPU): unpack the lanes, centre the
        codes in uint8 (q - zero wraps; read as int8 it is exact), convert to fp32 (exact), and
        multiply by the group's scale in place: one rounding, as DequantizeLinear."""
        scale, zero = self.scale, self.zero
        if rows is not None:
            scale = scale.index_select(0, rows)
            zero = zero.index_select(0, rows) if zero is not None else None
        if self.kind == "nf4":
            codes = self.codes if rows is None else self.codes.index_select(0, rows)
            n, in_f = codes.shape[0], self.shape[1]
            # a byte's two codebook values, looked up as a 2-wide embedding (int32 indices: no int64 copy of the codes)
            w = F.embedding(codes.int(), self.lut.view(torch.float32).view(256, 2)).view(n, in_f // self.group, self.group)
            return w.mul_(scale.unsqueeze(-1)).view(n, in_f)
        sb = storage_bits(self.bits)
        if sb == 8:
            codes = self.codes if rows is None else self.codes.index_select(0, rows)
            if zero is None:
                return _grouped_(torch.Tensor.mul_, codes.to(torch.float32), scale, self.group)
            w = _grouped_(torch.Tensor.sub_, codes.to(torch.float32), zero.to(torch.float32), self.group)
            return _grouped_(torch.Tensor.mul_, w, scale, self.group)
        centred = self._unpack(rows)
        if zero is None:
            centred.sub_(self.offset)
        else:
            _grouped_(torch.Tensor.sub_, centred, zero, self.group)
        return _grouped_(torch.Tensor.mul_, centred.view(torch.int8).to(torch.float32), scale, self.group)

    def _unpack(self, rows: torch.Tensor | None) -> torch.Tensor:
        """uint8 (n, in) stored codes. Lane k of the packed bytes holds rows [k*m, (k+1)*m) (m rows
        of bytes), so each lane unpacks into a contiguous block and a row is one byte row + a shift."""
        sb = storage_bits(self.bits)
        per, mask = 8 // sb, (1 << sb) - 1
        m, in_f = self.codes.shape
        if rows is not None:
            shift = (rows // m).to(torch.uint8).mul_(sb).unsqueeze(1)
            return torch.bitwise_right_shift(self.codes.index_select(0, rows % m), shift).bitwise_and_(mask)
        out = torch.empty((per, m, in_f), dtype=torch.uint8, device=self.codes.device)
        for k in range(per):
            if k == 0:
                torch.bitwise_and(self.codes, mask, out=out[0])
            elif k == per - 1:
                torch.bitwise_right_shift(self.codes, k * sb, out=out[k])
            else:
                torch.bitwise_right_shift(self.codes, k * sb, out=out[k]).bitwise_and_(mask)
        return out.view(per * m, in_f)[: self.shape[0]]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers() if b is not None)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the buffers; a dtype cast (model.half(), .to(bf16)) must not round the scales."""
        def keep_dtype(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return f"{self.kind}{self.bits}, shape={self.shape}, group={self.group}, {self.nbytes()} bytes"


def _grouped_(op, a: torch.Tensor, per_group: torch.Tensor, group: int) -> torch.Tensor:
    """In place: a = op(a, per_group broadcast over its group along the last dim); returns a.
    A short last group is done on its own, so nothing is padded."""
    n, in_f = a.shape
    full = in_f // group
    if full * group == in_f:
        op(a.view(n, full, group), per_group.unsqueeze(-1))
        return a
    if full:
        op(a[:, : full * group].view(n, full, group), per_group[:, :full, None])
    op(a[:, full * group :], per_group[:, full : full + 1])
    return a


def _pack_lanes(codes: torch.Tensor, sb: int, offset: int, chunk: int = 1 << 22) -> torch.Tensor:
    """(rows, in) codes (int8, or uint8 when asymmetric) -> (ceil(rows*sb/8), in) bytes holding
    code + offset (< 2**sb): lane k of byte row j holds row k*m + j (m byte rows), so unpacking
    writes whole contiguous blocks. Rows past the end decode to exactly 0. A block of byte rows
    at a time, all in uint8: no temporaries larger than the packed tensor."""
    per = 8 // sb
    rows, in_f = codes.shape
    m = -(-rows // per)
    packed = torch.empty((m, in_f), dtype=torch.uint8, device=codes.device)
    step = max(1, chunk // max(1, in_f))
    for j0 in range(0, m, step):
        j1 = min(m, j0 + step)
        for k in range(per):
            lane = torch.full((j1 - j0, in_f), offset, dtype=torch.uint8, device=codes.device)
            lo, hi = k * m + j0, min(k * m + j1, rows)
            if hi > lo:
                torch.add(codes[lo:hi].view(torch.uint8), offset, out=lane[: hi - lo])  # uint8 wraps: q + offset exactly
            if k == 0:
                packed[j0:j1] = lane
            else:
                packed[j0:j1] |= lane.bitwise_left_shift_(k * sb)
    return packed


# -- the layers -------------------------------------------------------------------
class _PackedLinearFn(torch.autograd.Function):
    """y = x W^T + b with W rebuilt from codes in forward and again in backward; only the
    PackedWeight (already held) is kept between the two, never W."""

    @staticmethod
    def forward(ctx, x, bias, packed):
        ctx.packed = packed
        w = packed.dequantize()
        ctx.kept = w if packed.keep_for_backward and w.device.type == "cpu" else None
        return F.linear(x, w, bias)  # under autocast F.linear casts as nn.Linear would

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = ctx.kept if ctx.kept is not None else ctx.packed.dequantize()
            grad_x = grad.matmul(w.to(grad.dtype))
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_b, None


class PackedLinear(torch.nn.Linear):
    """nn.Linear whose frozen weight lives in `self.packed` (PEFT's LoRA wraps it as any Linear)."""

    packed: PackedWeight

    def forward(self, x):
        bias = self.bias
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _PackedLinearFn.apply(x, bias, self.packed)
        return F.linear(x, self.packed.dequantize(), bias)

    @property
    def weight(self) -> torch.Tensor:
        return _weight(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


class PackedEmbedding(torch.nn.Embedding):
    """nn.Embedding that gathers packed rows and rebuilds only those (frozen: no gradient)."""

    packed: PackedWeight

    def forward(self, input):
        return self.packed.dequantize(input.reshape(-1)).view(*input.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        return _weight(self)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, packed"


def _weight(module) -> torch.Tensor:
    """`.weight` of a packed layer: the rebuilt fp32 values (frozen). Inside the layer's own forward
    (a subclass such as Gemma's scaled embedding reads `self.weight.dtype` there) a zero-stride
    placeholder of the right shape, dtype and device, so the forward never rebuilds the whole table."""
    if module.__dict__.get("_in_forward"):
        return torch.zeros((), dtype=torch.float32, device=module.packed.scale.device).expand(module.packed.shape)
    return module.packed.dequantize()


_CLASSES: dict[type, type] = {}


def _packed_class(cls: type) -> type:
    """The packed twin of a Linear/Embedding class. A subclass keeps its own forward, whose
    super().forward() lands in the packed layer's (Gemma's embedding: gather, then scale)."""
    base = PackedEmbedding if issubclass(cls, torch.nn.Embedding) else PackedLinear
    if cls in (torch.nn.Linear, torch.nn.Embedding):
        return base
    if cls not in _CLASSES:
        def forward(self, *args, **kwargs):
            self._in_forward = True
            try:
                return cls.forward(self, *args, **kwargs)
            finally:
                self._in_forward = False

        _CLASSES[cls] = type(f"Packed{cls.__name__}", (cls, base), {"forward": forward})
    return _CLASSES[cls]


def pack_module(module: torch.nn.Module, packed: PackedWeight) -> None:
    """In place: drop the fp32 weight, hold `packed` (shared by a tied partner) instead."""
    plain = type(module)
    module._parameters.pop("weight", None)
    module.__dict__.pop("weight", None)
    module.__class__ = _packed_class(plain)
    module._plain_class = plain
    module.packed = packed


def is_packed(module) -> bool:
    return isinstance(module, (PackedLinear, PackedEmbedding))


def unpack_model(model: torch.nn.Module) -> None:
    """Every packed layer back to its plain class with an fp32 weight holding the same values
    (what ONNX export, merge and the fp32 device graphs need). Tied layers share one Parameter."""
    weights: dict[int, torch.nn.Parameter] = {}
    for module in list(model.modules()):
        if not is_packed(module):
            continue
        packed = module.packed
        if id(packed) not in weights:
            weights[id(packed)] = torch.nn.Parameter(packed.dequantize(), requires_grad=False)
        del module._modules["packed"]
        module.__dict__.pop("_in_forward", None)
        module.__class__ = module.__dict__.pop("_plain_class")
        module.weight = weights[id(packed)]


def packed_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(base parameters held packed, bytes they take), each shared table counted once."""
    seen = {id(m): m for m in model.modules() if isinstance(m, PackedWeight)}
    return sum(m.numel() for m in seen.values()), sum(m.nbytes() for m in seen.values())
