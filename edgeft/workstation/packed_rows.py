"""Rows of a packed weight, rebuilt without rebuilding the rest: for vocabulary-sized tensors.

A vocabulary tensor (Qwen2.5-0.5B: 151,936 x 896, 519 MiB in fp32; Gemma-3: 262,144 x 640) is the
largest thing a small language model's step would otherwise rebuild in fp32, and it never needs all
of it at once:
- the embedding lookup needs the rows of the tokens in the batch: `gather_rows` gathers their packed
  codes, scales and zero points and dequantizes only those;
- the vocabulary projection can run over chunks of rows (vocab_chunks.py): `row_range` rebuilds rows
  [a, b) from their codes, to be dropped after use.
Both compute each value as the full rebuild does (onnx_base.rebuild_subgraph), bit for bit: the
planar layout puts code j in lane j // m of byte j % m, so with the rows split evenly over the lanes
(out % lanes == 0) row r lives in lane r // (out / lanes), whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """What a graph needs to know of a packed weight to rebuild part of it (not its data)."""

    name: str
    out: int
    cols: int  # in_features
    width: int  # codes per row (int: groups x group, padded; nf4: cols)
    storage_bits: int
    kind: str  # "int" or "nf4"
    group: int  # int: group along a row; nf4: block over the flat tensor
    codes_bytes: int
    codebook: tuple = ()  # nf4's 16 values

    @classmethod
    def of(cls, p) -> "Layout":
        width = p.scale.shape[1] * p.group if p.kind == "int" else p.shape[1]
        book = tuple(float(v) for v in p.codebook) if p.codebook is not None else ()
        return cls(p.name, p.shape[0], p.shape[1], width, p.storage_bits, p.kind, p.group, int(p.codes.size), book)

    @property
    def lanes(self) -> int:
        return 8 // self.storage_bits

    @property
    def rows_per_lane(self) -> int:
        return self.out // self.lanes

    @property
    def row_addressable(self) -> bool:
        """Whether each row's codes lie whole in one lane, and (nf4) its blocks start at the row."""
        whole = self.out % self.lanes == 0 and self.codes_bytes == self.rows_per_lane * self.width
        return whole and (self.kind == "int" or self.cols % self.group == 0)

    def data(self, part: str) -> str:
        return f"{self.name}::q.{part}"


class _Builder:
    """Nodes and small constants under one unique prefix."""

    def __init__(self, prefix: str):
        from onnx import helper

        self.h, self.prefix, self.nodes, self.consts, self.n = helper, prefix, [], {}, 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}.{hint}{self.n}"

    def const(self, value, dtype) -> str:
        name = self.name("c")
        self.consts[name] = np.asarray(value, dtype=dtype)
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(self.h.make_node(op_type, inputs, [out], **attrs))
        return out


def gather_rows(lay: Layout, ids: str, out: str, prefix: str) -> tuple[list, dict]:
    """(nodes, constants) computing `out` = W[ids] (ids int64 of any shape; out: ids.shape + [cols])
    from W's packed tensors, touching only the gathered rows."""
    from onnx import TensorProto

    b = _Builder(prefix)
    i64, sb = np.int64, lay.storage_bits
    codes = b.op("Reshape", [lay.data("codes"), b.const([lay.rows_per_lane, lay.width], i64)])
    if lay.lanes > 1:
        r = b.const(lay.rows_per_lane, i64)
        row, lane = b.op("Mod", [ids, r]), b.op("Div", [ids, r])
        raw = b.op("Gather", [codes, row], axis=0)  # ids.shape + [width] bytes
        # lane k: (byte << (8 - (k+1)s)) >> (8 - s), the full rebuild's shifts with k per row
        left = b.op("Sub", [b.const(8 - sb, i64), b.op("Mul", [lane, b.const(sb, i64)])])
        left = b.op("Unsqueeze", [b.op("Cast", [left], to=TensorProto.UINT8), b.const([-1], i64)])
        q = b.op("BitShift", [b.op("BitShift", [raw, left], direction="LEFT"), b.const(8 - sb, np.uint8)], direction="RIGHT")
    else:
        q = b.op("Gather", [codes, ids], axis=0)
    lead = b.op("Shape", [ids])
    if lay.kind == "nf4":
        blocks = lay.cols // lay.group
        values = b.op("Gather", [b.const(lay.codebook, np.float32), b.op("Cast", [q], to=TensorProto.INT32)], axis=0)
        values = b.op("Reshape", [values, b.op("Concat", [lead, b.const([blocks, lay.group], i64)], axis=0)])
        absmax = b.op("Gather", [b.op("Reshape", [lay.data("scale"), b.const([lay.out, blocks], i64)]), ids], axis=0)
        scaled = b.op("Mul", [values, b.op("Unsqueeze", [absmax, b.const([-1], i64)])])
        b.op("Reshape", [scaled, b.op("Concat", [lead, b.const([lay.cols], i64)], axis=0)], out)
        return b.nodes, b.consts
    groups = lay.width // lay.group
    q = b.op("Reshape", [q, b.op("Concat", [lead, b.const([groups, lay.group], i64)], axis=0)])
    per_group = b.const([lay.out, groups], i64)
    scale = b.op("Gather", [b.op("Reshape", [lay.data("scale"), per_group]), ids], axis=0)
    zero = b.op("Gather", [b.op("Reshape", [lay.data("zero"), per_group]), ids], axis=0)
    last = b.const([-1], i64)
    # (float(q) - float(zp)) * scale: DequantizeLinear's value, bit for bit, with the scale per row
    centred = b.op("Sub", [b.op("Cast", [q], to=TensorProto.FLOAT), b.op("Unsqueeze", [b.op("Cast", [zero], to=TensorProto.FLOAT), last])])
    scaled = b.op("Mul", [centred, b.op("Unsqueeze", [scale, last])])
    padded = lay.width != lay.cols
    flat = b.op("Reshape", [scaled, b.op("Concat", [lead, b.const([lay.width], i64)], axis=0)], None if padded else out)
    if padded:
        b.op("Slice", [flat, b.const([0], i64), b.const([lay.cols], i64), last], out)
    return b.nodes, b.consts


def row_range(lay: Layout, start: int, stop: int, out: str, prefix: str) -> tuple[list, dict]:
    """(nodes, constants) computing `out` = W[start:stop] from W's packed tensors alone."""
    from onnx import TensorProto

    b = _Builder(prefix)
    i64, sb = np.int64, lay.storage_bits
    m = lay.codes_bytes
    a, z = start * lay.width, stop * lay.width  # flat code range
    parts = []
    for k in range(a // m, (z - 1) // m + 1):
        lo, hi = max(a, k * m) - k * m, min(z, (k + 1) * m) - k * m
        part = b.op("Slice", [lay.data("codes"), b.const([lo], i64), b.const([hi], i64)])
        for direction, amount in (("LEFT", 8 - (k + 1) * sb), ("RIGHT", 8 - sb)):
            if amount:
                part = b.op("BitShift", [part, b.const(amount, np.uint8)], direction=direction)
        parts.append(part)
    q = parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=0)
    rows = stop - start
    if lay.kind == "nf4":
        blocks = lay.cols // lay.group
        values = b.op("Gather", [b.const(lay.codebook, np.float32), b.op("Cast", [q], to=TensorProto.INT32)], axis=0)
        values = b.op("Reshape", [values, b.const([rows * blocks, lay.group], i64)])
        absmax = b.op("Slice", [lay.data("scale"), b.const([start * blocks], i64), b.const([stop * blocks], i64)])
        b.op("Reshape", [b.op("Mul", [values, absmax]), b.const([rows, lay.cols], i64)], out)
        return b.nodes, b.consts
    groups = lay.width // lay.group
    q = b.op("Reshape", [q, b.const([rows * groups, lay.group], i64)])
    lo, hi = b.const([start * groups], i64), b.const([stop * groups], i64)
    scale, zero = b.op("Slice", [lay.data("scale"), lo, hi]), b.op("Slice", [lay.data("zero"), lo, hi])
    padded = lay.width != lay.cols
    flat = b.op("Reshape", [b.op("DequantizeLinear", [q, scale, zero], axis=0), b.const([rows, lay.width], i64)], None if padded else out)
    if padded:
        b.op("Slice", [flat, b.const([0], i64), b.const([lay.cols], i64), b.const([1], i64)], out)
    return b.nodes, b.consts
