"""Rows of a packed weight (an embedding's gathered rows, a vocabulary chunk) equal the full rebuild's, bit for bit."""

import numpy as np
import pytest

from edgeft.workstation.onnx_base import pack_int, pack_nf4, packed_tensors
from edgeft.workstation.packed_rows import Layout, gather_rows, row_range


def run_rows(p, build, extra_inputs=None):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    data = packed_tensors(p)
    extra_inputs = extra_inputs or {}
    nodes, consts = build(Layout.of(p))
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in {**data, **extra_inputs}.items()]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {**data, **extra_inputs})[0]


def int_weight(bits, group, shape, symmetric, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    out_f, in_f = shape
    n_groups = -(-in_f // group)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if symmetric else (0, 2**bits)
    codes = torch.from_numpy(rng.integers(lo, hi, shape).astype(np.int16))
    scale = torch.from_numpy(rng.random((out_f, n_groups)).astype(np.float32) / 7)
    zero = None if symmetric else torch.from_numpy(rng.integers(0, 2**bits, (out_f, n_groups)).astype(np.uint8))
    return pack_int("w", codes, scale, zero, group, bits, symmetric)


def nf4_weight(shape=(12, 128)):
    rng = np.random.default_rng(1)
    codebook = np.sort(rng.standard_normal(16)).astype(np.float32)
    n = shape[0] * shape[1]
    return pack_nf4("w", shape, rng.integers(0, 16, n), rng.random(n // 64).astype(np.float32), codebook, 64)


WEIGHTS = [
    pytest.param(lambda: int_weight(4, 32, (12, 64), False), id="int4"),
    pytest.param(lambda: int_weight(3, 32, (12, 70), False), id="int3-ragged"),
    pytest.param(lambda: int_weight(2, 16, (16, 33), True), id="int2-ragged"),
    pytest.param(lambda: int_weight(8, 64, (6, 64), True), id="int8"),
    pytest.param(nf4_weight, id="nf4"),
]


@pytest.mark.parametrize("make", WEIGHTS)
def test_gathered_rows_equal_the_full_rebuild(make):
    p = make()
    lay = Layout.of(p)
    assert lay.row_addressable
    ids = np.array([[0, p.shape[0] - 1, 3], [5, 5, p.shape[0] // 2]], dtype=np.int64)  # every lane, repeats, both ends
    got = run_rows(p, lambda lay: gather_rows(lay, "ids", "out", "g"), {"ids": ids})
    assert got.shape == ids.shape + (p.shape[1],)
    assert np.array_equal(got, p.dequantize()[ids])


@pytest.mark.parametrize("make", WEIGHTS)
def test_row_ranges_equal_the_full_rebuild(make):
    p = make()
    full = p.dequantize()
    for a, b in [(0, p.shape[0]), (0, 1), (1, p.shape[0] // 2 + 1), (p.shape[0] // 2, p.shape[0])]:  # inside a lane and across lanes
        assert np.array_equal(run_rows(p, lambda lay: row_range(lay, a, b, "out", "r")), full[a:b]), (a, b)


def test_rows_split_unevenly_over_lanes_are_not_addressable():
    assert not Layout.of(int_weight(4, 32, (5, 64), False)).row_addressable  # 5 rows over 2 lanes
