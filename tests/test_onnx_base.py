"""The packed base rebuilt by ONNX Runtime equals the numpy (and so the workstation) weight bit for bit."""

import numpy as np
import pytest

from edgeft.workstation.onnx_base import pack_int, pack_nf4, replace_initializers, replace_with_packed


def rebuild_with_ort(p, as_inputs=False):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info("w_out", TensorProto.FLOAT, list(p.shape))
    graph = helper.make_graph([helper.make_node("Identity", [p.name], ["w_out"])], "g", [], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if not as_inputs:
        replace_initializers(model, [p])
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    data = replace_with_packed(model, [p])  # the bundle's way: packed tensors are inputs, fed from one file
    assert {i.name for i in model.graph.input} == set(data) and not any(i.name in data for i in model.graph.initializer)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)[0]


@pytest.mark.parametrize("bits, group, symmetric, shape", [
    (4, 32, False, (6, 64)), (3, 32, False, (5, 70)), (2, 16, False, (3, 33)), (8, 64, True, (4, 64)), (4, 16, True, (7, 30)),
])
def test_int_codes_rebuild_exactly(bits, group, symmetric, shape):
    import torch

    rng = np.random.default_rng(bits)
    out_f, in_f = shape
    n_groups = -(-in_f // group)
    codes = torch.from_numpy(rng.integers(-(2 ** (bits - 1)) if symmetric else 0, 2 ** (bits - 1) if symmetric else 2**bits, shape).astype(np.int16))
    scale = torch.from_numpy(rng.random((out_f, n_groups)).astype(np.float32) / 7)
    zero = None if symmetric else torch.from_numpy(rng.integers(0, 2**bits, (out_f, n_groups)).astype(np.uint8))
    p = pack_int("w", codes, scale, zero, group, bits, symmetric)
    assert np.array_equal(rebuild_with_ort(p), p.dequantize())
    assert np.array_equal(rebuild_with_ort(p, as_inputs=True), p.dequantize())


def test_nf4_codes_rebuild_exactly():
    rng = np.random.default_rng(0)
    codebook = np.sort(rng.standard_normal(16)).astype(np.float32)
    p = pack_nf4("w", (8, 64), rng.integers(0, 16, 8 * 64), rng.random(8).astype(np.float32), codebook, 64)
    assert np.array_equal(rebuild_with_ort(p), p.dequantize())
    assert np.array_equal(rebuild_with_ort(p, as_inputs=True), p.dequantize())
