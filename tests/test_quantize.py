"""The workstation base must equal what ONNX DequantizeLinear computes on the device."""

import numpy as np
import pytest
import torch

from edgeft.schemes import parse_scheme
from edgeft.workstation.quantize import dequantize, fake_quantize, quantize

SCHEMES = ["int8", "int4-g128", "int4-g32", "int3-g32", "int2-g32", "int4-g32-asym"]


@pytest.mark.parametrize("name", SCHEMES)
def test_codes_stay_in_range_and_error_is_bounded(name):
    s = parse_scheme(name)
    torch.manual_seed(0)
    w = torch.randn(48, 200)  # 200 is not a multiple of 32/128: ragged last group
    q = quantize(w, s)
    codes = q.codes.to(torch.int32)
    if s.symmetric:
        assert codes.min() >= -(2 ** (s.bits - 1)) and codes.max() <= 2 ** (s.bits - 1) - 1
    else:
        assert codes.min() >= 0 and codes.max() <= 2**s.bits - 1
    deq = dequantize(q)
    assert deq.shape == w.shape
    # error at most half a step per element
    step = q.scale.repeat_interleave(q.group_size, 1)[:, : w.shape[1]]
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)


@pytest.mark.parametrize("name", SCHEMES)
def test_equals_onnx_dequantize_linear_bit_for_bit(name):
    """Run the ONNX op itself in ORT: the values the device graph holds."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    s = parse_scheme(name)
    torch.manual_seed(1)
    w = torch.randn(16, 200) * 0.05  # ragged last block, as SmolLM2 (576 = 4.5 x 128)
    q = quantize(w, s)
    inits = [numpy_helper.from_array(q.codes.numpy(), "codes"), numpy_helper.from_array(q.scale.numpy(), "scale")]
    inputs = ["codes", "scale"]
    if q.zero is not None:
        inits.append(numpy_helper.from_array(q.zero.numpy(), "zero"))
        inputs.append("zero")
    attrs = {"axis": 1, "block_size": q.group_size} if s.group_size else {"axis": 0}
    if not s.group_size:
        inits[1] = numpy_helper.from_array(q.scale.reshape(-1).numpy(), "scale")
        if q.zero is not None:
            inits[2] = numpy_helper.from_array(q.zero.reshape(-1).numpy(), "zero")
    node = helper.make_node("DequantizeLinear", inputs, ["w"], **attrs)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(got, fake_quantize(w, s).numpy())


def test_nf4_matches_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(2)
    lin = torch.nn.Linear(128, 32, bias=False)
    layer = bnb.nn.Linear4bit(128, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)._quantize("cpu")
    from edgeft.workstation.quantize import bnb_dequantized_weight

    assert torch.equal(bnb_dequantized_weight(layer), fake_quantize(lin.weight.data, parse_scheme("nf4")))


def test_fused_lora_dropout_matches_dropout_then_linear():
    """Same gradients as PEFT's dropout -> lora_A when the masks agree."""
    from edgeft.workstation.lora import DropoutLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 4, bias=False)
    fused = DropoutLinear.wrap(lin, 0.25).train()
    x = torch.randn(3, 5, 32, requires_grad=True)
    torch.manual_seed(7)
    y = fused(x)
    (y.square().sum()).backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    torch.manual_seed(7)
    keep = torch.rand_like(x) >= 0.25
    x.grad = None
    lin.weight.grad = None
    ref = lin(x * keep / 0.75)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(lin.weight.grad, gw)
    assert 0.2 < 1 - keep.float().mean().item() < 0.3
    assert torch.equal(fused.eval()(x), lin(x))
