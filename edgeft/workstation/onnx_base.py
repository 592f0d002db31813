"""The frozen base inside ONNX graphs: packed integer codes, unpacked by standard ops.

Each quantized weight initializer W (fp32) is replaced by
  codes  uint8, 8/s codes per byte (s = 2 or 4 storage bits, or one per byte)
  scale  fp32 per group (int) or absmax per 64-block (nf4)
  zero   uint8 per group (int; symmetric codes are stored offset by 2^(bits-1))
and a subgraph (BitShift/Concat to unpack the planar bytes, then a per-axis DequantizeLinear
with one row per group, or a codebook Gather and Mul per nf4 block) that rebuilds a tensor
still named W. Every value is computed as the workstation computes it: (float(q) - float(zp)) * scale, or codebook[q] * absmax, so the
device base equals the training base bit for bit. Standard ops at opset 17: no blocked
DequantizeLinear (opset 21), no INT4 tensors; gradients never flow here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedWeight:
    name: str  # the initializer it replaces
    shape: tuple[int, int]  # (out, in)
    codes: np.ndarray  # uint8 packed, flat
    storage_bits: int  # 2, 4 or 8
    n_codes: int
    kind: str  # "int" or "nf4"
    scale: np.ndarray  # int: (out, n_groups) fp32; nf4: (n_blocks,) fp32
    group: int  # int: group size along `in`; nf4: block size over the flat tensor
    zero: np.ndarray | None = None  # int asymmetric: (out, n_groups) uint8
    zero_scalar: int = 0  # int symmetric: codes are stored offset by this
    codebook: np.ndarray | None = None  # nf4: (16,) fp32
    view: tuple | None = None  # the tensor's own shape when it is not (out, in): a convolution's (out, in/groups, kh, kw)

    @property
    def nbytes(self) -> int:
        zero = self.scale.size if self.kind == "int" else 0  # one uint8 zero point per group, stored even when symmetric
        return self.codes.nbytes + self.scale.nbytes + zero + (64 if self.codebook is not None else 0)

    def zero_points(self) -> np.ndarray:
        """uint8 per group, shaped like scale (symmetric codes are stored offset by zero_scalar)."""
        return self.zero.astype(np.uint8) if self.zero is not None else np.full(self.scale.shape, self.zero_scalar, dtype=np.uint8)

    def dequantize(self) -> np.ndarray:
        """numpy mirror of the ONNX subgraph (used to prove exactness before export)."""
        q = unpack(self.codes, self.storage_bits, self.n_codes)
        out_f, in_f = self.shape
        if self.kind == "nf4":
            return (self.codebook[q].reshape(-1, self.group) * self.scale[:, None]).reshape(out_f, in_f)
        n_groups = self.scale.shape[1]
        qf = q.reshape(out_f, n_groups, self.group).astype(np.float32)
        zero = self.zero.astype(np.float32)[..., None] if self.zero is not None else np.float32(self.zero_scalar)
        return ((qf - zero) * self.scale[..., None]).reshape(out_f, n_groups * self.group)[:, :in_f]

    def matches(self, weight: np.ndarray, chunk: int = 1 << 22) -> bool:
        """Whether the packed tensor decodes to `weight` bit for bit, as `dequantize` computes it but
        a few million values at a time (a whole vocabulary in fp32, three times over, is a memory peak)."""
        out_f, in_f = self.shape
        if self.kind == "nf4":
            flat, step = weight.reshape(-1), max(self.group, chunk // self.group * self.group)
            for a in range(0, flat.size, step):
                b = min(flat.size, a + step)
                q = unpack_range(self.codes, self.storage_bits, a, b)
                v = (self.codebook[q].reshape(-1, self.group) * self.scale[a // self.group : b // self.group, None]).reshape(-1)
                if not np.array_equal(v, flat[a:b]):
                    return False
            return True
        n_groups = self.scale.shape[1]
        width = n_groups * self.group
        rows = max(1, chunk // width)
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            q = unpack_range(self.codes, self.storage_bits, r0 * width, r1 * width).reshape(r1 - r0, n_groups, self.group).astype(np.float32)
            q -= self.zero[r0:r1, :, None].astype(np.float32) if self.zero is not None else np.float32(self.zero_scalar)
            q *= self.scale[r0:r1, :, None]
            if not np.array_equal(q.reshape(r1 - r0, width)[:, :in_f], weight[r0:r1]):
                return False
        return True


def storage_bits(bits: int) -> int:
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes < 2**bits -> bytes, planar: lane k of byte i holds code k*m + i (m = bytes).

    Planar rather than interleaved so the device unpacks with shifts on contiguous
    blocks and one Concat (a memcpy), not a per-element gather or Div/Mod.
    """
    per = 8 // bits
    flat = codes.reshape(-1).astype(np.uint8, copy=False)
    m = -(-flat.size // per)
    out = np.zeros(m, dtype=np.uint8)
    for k in range(per):  # in uint8, lane by lane: no wider copy of the tensor
        lane = flat[k * m : (k + 1) * m]
        out[: lane.size] |= lane << np.uint8(k * bits)
    return out


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[:, None]
    return ((packed[None, :] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]


def unpack_range(packed: np.ndarray, bits: int, start: int, stop: int) -> np.ndarray:
    """Codes start..stop-1 of a planar-packed tensor (code j: lane j // m of byte j % m)."""
    m, mask = packed.size, (1 << bits) - 1
    parts = []
    for k in range(start // m, (stop - 1) // m + 1):
        lo, hi = max(start, k * m) - k * m, min(stop, (k + 1) * m) - k * m
        parts.append((packed[lo:hi] >> np.uint8(k * bits)) & np.uint8(mask))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def pack_int(name: str, codes, scale, zero, group: int, bits: int, symmetric: bool) -> PackedWeight:
    """From workstation QuantizedWeight tensors (torch) to the device layout; the last group is padded."""
    codes = codes.numpy()
    out_f, in_f = codes.shape
    n_groups = scale.shape[1]
    offset = 2 ** (bits - 1) if symmetric else 0
    if codes.dtype == np.int8:  # the workstation's symmetric codes: offset in int8 (wrapping), read as uint8
        stored = (codes + np.int8(offset - 256 if offset > 127 else offset)).view(np.uint8)
    elif offset == 0:
        stored = codes.astype(np.uint8, copy=False)
    else:
        stored = (codes.astype(np.int16) + offset).astype(np.uint8)
    full = stored
    if n_groups * group != in_f:  # a ragged last group is padded with codes that decode to exactly 0
        full = np.full((out_f, n_groups * group), offset, dtype=np.uint8)
        if zero is not None:
            full[:] = np.repeat(zero.numpy().astype(np.uint8), group, axis=1)
        full[:, :in_f] = stored
    sb = storage_bits(bits)
    return PackedWeight(name, (out_f, in_f), pack(full.astype(np.uint8), sb), sb, full.size, "int", scale.numpy().astype(np.float32),
                        group, zero.numpy() if zero is not None else None, offset)


def pack_nf4(name: str, shape, indices: np.ndarray, absmax: np.ndarray, codebook: np.ndarray, block: int) -> PackedWeight:
    return PackedWeight(name, tuple(shape), pack(indices.astype(np.uint8), 4), 4, indices.size, "nf4", absmax.astype(np.float32), block,
                        codebook=codebook.astype(np.float32))


# the packed tensors a graph reads as inputs (the rest of a rebuilding subgraph is small constants)
DATA_SUFFIXES = (".codes", ".scale", ".zero")


def rebuild_subgraph(p: PackedWeight) -> tuple[list, dict, dict]:
    """As `_rebuild_2d`, then reshaped to the tensor's own shape where that is not (out, in)."""
    nodes, data, consts = _rebuild_2d(p)
    if p.view is None:
        return nodes, data, consts
    from onnx import helper

    flat = p.name + "::q.flat"
    for node in nodes:
        node.output[:] = [flat if o == p.name else o for o in node.output]
    consts[p.name + "::q.view"] = np.array(p.view, dtype=np.int64)
    nodes.append(helper.make_node("Reshape", [flat, p.name + "::q.view"], [p.name]))
    return nodes, data, consts


def _rebuild_2d(p: PackedWeight) -> tuple[list, dict, dict]:
    """(nodes, data, constants) rebuilding the fp32 tensor `p.name` from its packed tensors.

    data: the packed tensors (codes, scales, zero points), what a bundle stores once and every graph
    reads; constants: the small tensors of the subgraph itself (shift amounts, shapes, a codebook).
    Every graph (training, eval, inference, portable) rebuilds a weight with this same subgraph."""
    from onnx import TensorProto, helper

    pre = p.name + "::q"
    data = {f"{pre}.codes": p.codes}
    consts: dict = {}
    nodes = []
    # unpack: lane k = (byte << (8 - (k+1)s)) >> (8 - s) in uint8 (the left shift drops the higher
    # lanes), all lanes concatenated (planar layout); the per-element Div/Mod or Gather
    # alternatives cost a third to a half of a MiniLM training step (ORT profile)
    per, sb = 8 // p.storage_bits, p.storage_bits
    lanes = []
    for k in range(per):
        lane = f"{pre}.codes"
        for direction, amount in (("LEFT", 8 - (k + 1) * sb), ("RIGHT", 8 - sb)):
            if amount:
                consts[f"{pre}.s{amount}"] = np.array(amount, dtype=np.uint8)
                nodes.append(helper.make_node("BitShift", [lane, f"{pre}.s{amount}"], [f"{pre}.l{k}{direction[0]}"], direction=direction))
                lane = f"{pre}.l{k}{direction[0]}"
        lanes.append(lane)
    codes = f"{pre}.all"
    if per > 1:
        nodes.append(helper.make_node("Concat", lanes, [codes], axis=0))
    else:
        codes = lanes[0]
    if p.codes.size * per != p.n_codes:
        consts[f"{pre}.start"], consts[f"{pre}.n"] = np.array([0], dtype=np.int64), np.array([p.n_codes], dtype=np.int64)
        nodes.append(helper.make_node("Slice", [codes, f"{pre}.start", f"{pre}.n"], [f"{pre}.cut"]))
        codes = f"{pre}.cut"
    out_f, in_f = p.shape
    if p.kind == "nf4":
        consts[f"{pre}.codebook"] = p.codebook
        nodes.append(helper.make_node("Cast", [codes], [f"{pre}.idx"], to=TensorProto.INT32))
        nodes.append(helper.make_node("Gather", [f"{pre}.codebook", f"{pre}.idx"], [f"{pre}.flat"], axis=0))
        consts[f"{pre}.blocks"] = np.array([-1, p.group], dtype=np.int64)
        nodes.append(helper.make_node("Reshape", [f"{pre}.flat", f"{pre}.blocks"], [f"{pre}.vb"]))
        data[f"{pre}.scale"] = p.scale.reshape(-1, 1)
        nodes.append(helper.make_node("Mul", [f"{pre}.vb", f"{pre}.scale"], [f"{pre}.scaled"]))
        consts[f"{pre}.shape"] = np.array([out_f, in_f], dtype=np.int64)
        nodes.append(helper.make_node("Reshape", [f"{pre}.scaled", f"{pre}.shape"], [p.name]))
        return nodes, data, consts
    # one row per group
    n_groups = p.scale.shape[1]
    consts[f"{pre}.grouped"] = np.array([out_f * n_groups, p.group], dtype=np.int64)
    nodes.append(helper.make_node("Reshape", [codes, f"{pre}.grouped"], [f"{pre}.qg"]))
    # per-axis DequantizeLinear computes float(q - zp) * scale, the workstation's (float(q) - float(zp)) * scale
    # bit for bit, in one vectorized pass (a symmetric scheme stores its one zero point per group too: 1/g byte
    # per parameter, cheaper than the two extra passes over fp32 weights Cast/Sub/Mul would cost every step)
    data[f"{pre}.scale"], data[f"{pre}.zero"] = p.scale.reshape(-1), p.zero_points().reshape(-1)
    nodes.append(helper.make_node("DequantizeLinear", [f"{pre}.qg", f"{pre}.scale", f"{pre}.zero"], [f"{pre}.scaled"], axis=0))
    consts[f"{pre}.shape"] = np.array([out_f, n_groups * p.group], dtype=np.int64)
    target = p.name if n_groups * p.group == in_f else f"{pre}.padded"
    nodes.append(helper.make_node("Reshape", [f"{pre}.scaled", f"{pre}.shape"], [target]))
    if target != p.name:
        consts[f"{pre}.cols"] = np.array([in_f], dtype=np.int64)
        consts[f"{pre}.zero1"] = np.array([0], dtype=np.int64)
        consts[f"{pre}.axis1"] = np.array([1], dtype=np.int64)
        nodes.append(helper.make_node("Slice", [target, f"{pre}.zero1", f"{pre}.cols", f"{pre}.axis1"], [p.name]))
    return nodes, data, consts


def packed_tensors(p: PackedWeight) -> dict:
    """The packed tensors of `p` as a graph reads them (and the bundle stores them), by name."""
    return rebuild_subgraph(p)[1]


def replace_with_packed(model, packed: list[PackedWeight], as_inputs: bool = True) -> dict:
    """Swap each fp32 weight (a graph input or an initializer) for the subgraph rebuilding it from
    its packed tensors (in place); returns those packed tensors by name.

    as_inputs: the packed tensors become graph inputs, fed at run time from the bundle's one copy
    of the base (and ONNX Runtime cannot constant-fold them into fp32 weights); otherwise they are
    embedded as initializers."""
    from onnx import helper, numpy_helper

    by_name = {p.name: p for p in packed}
    keep = [init for init in model.graph.initializer if init.name not in by_name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in by_name]
    body, gathered = _gather_packed_rows(list(model.graph.node), by_name)
    readers = {i for n in body for i in n.input}
    nodes, data, consts = [], {}, {}
    for p in packed:
        n, d, c = rebuild_subgraph(p)
        data.update(d)
        if p.name in readers:  # a lookup alone (an embedding that is not also the head) is never rebuilt whole
            nodes += n
            consts.update(c)
    consts.update(gathered)
    if as_inputs:
        inputs += [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in data.items()]
    else:
        consts.update(data)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in consts.items())
    # the rebuilt weights must exist before any node reads them
    del model.graph.node[:]
    model.graph.node.extend(nodes + body)
    return data


def _gather_packed_rows(nodes: list, by_name: dict) -> tuple[list, dict]:
    """(nodes, constants) with each row lookup of a packed weight (Gather on axis 0: an embedding)
    done on its packed rows (packed_rows.gather_rows): the lookup needs the batch's rows, not the
    weight in fp32 (Qwen2.5-0.5B's embedding: 519 MiB)."""
    from onnx import helper

    from .packed_rows import Layout, gather_rows

    out, consts = [], {}
    for k, node in enumerate(nodes):
        p = by_name.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        lay = Layout.of(p) if p is not None and axis == 0 else None
        if lay is None or not lay.row_addressable:
            out.append(node)
            continue
        n, c = gather_rows(lay, node.input[1], node.output[0], f"{p.name}::rows{k}")
        out += n
        consts.update(c)
    return out, consts


def replace_initializers(model, packed: list[PackedWeight]) -> None:
    """Swap each fp32 initializer for its packed tensors (embedded) plus the rebuilding subgraph."""
    replace_with_packed(model, packed, as_inputs=False)


def base_initializer_names(model) -> list[str]:
    """The packed tensors (codes, scales, zero points...) that go to the shared base.bin."""
    return [init.name for init in model.graph.initializer if "::q." in init.name]
