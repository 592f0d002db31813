"""The portable step's ConvGrad rewrite (edgeft/workstation/conv_grad.py) against torch autograd:
every convolution shape EfficientNet-Lite has (1x1, 3x3 and 5x5, stride 1 and 2, depthwise), and
dilation and odd sizes besides."""

from __future__ import annotations

import numpy as np
import pytest

CASES = [  # (cin, cout, k, stride, pad, dilation, group, size)
    (4, 6, 1, 1, 0, 1, 1, 7),
    (3, 5, 3, 2, 1, 1, 1, 9),
    (3, 5, 3, 2, 1, 1, 1, 8),
    (6, 6, 3, 1, 1, 1, 6, 7),
    (6, 6, 5, 2, 2, 1, 6, 9),
    (6, 6, 5, 2, 2, 1, 6, 10),
    (4, 4, 3, 1, 2, 2, 1, 9),
    (6, 6, 5, 1, 2, 1, 6, 7),  # depthwise stride 1, the flipped-kernel Conv
    (6, 6, 3, 1, 2, 2, 6, 9),  # the same, dilated
    (6, 6, 3, 1, 0, 1, 6, 9),  # the same, unpadded
    (3, 5, 3, 1, 1, 1, 1, 8),  # ungrouped stride 1: the flipped kernel with its channel axes swapped
    (3, 5, 3, 1, 0, 1, 1, 8),  # the same, unpadded
]


@pytest.mark.parametrize("weight_input", [False, True], ids=["constant-weight", "weight-input"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "cin{}-cout{}-k{}-s{}-p{}-d{}-g{}-hw{}".format(*c))
def test_conv_grad_matches_torch(case, weight_input):
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.workstation.portable_ops import OPSET, Rewriter

    cin, cout, k, s, p, d, g, hw = case
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((2, cin, hw, hw)), dtype=torch.float32, requires_grad=True)
    w = torch.tensor(rng.standard_normal((cout, cin // g, k, k)), dtype=torch.float32, requires_grad=True)
    b = torch.zeros(cout, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g)
    dy = torch.tensor(rng.standard_normal(tuple(y.shape)), dtype=torch.float32)
    y.backward(dy)

    node = helper.make_node("ConvGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], domain="com.microsoft", kernel_shape=[k, k],
                            strides=[s, s], pads=[p] * 4, dilations=[d, d], group=g)
    f = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape))  # noqa: E731
    inputs, inits = [f("dY", dy.shape), f("X", x.shape)], [numpy_helper.from_array(w.detach().numpy(), "W")]
    if weight_input:  # a LoRA conv's trainable weight, or a packed base's rebuilt one
        inputs, inits = inputs + [f("W", w.shape)], []
    graph = helper.make_graph([node], "g", inputs, [f("dX", x.shape), f("dW", w.shape), f("dB", b.shape)], inits)
    rw = Rewriter(graph)
    rw.run({})
    transposed = any(n.op_type == "ConvTranspose" for n in rw.nodes)
    assert transposed is (s != 1 or not (g == 1 or g == cin == cout)), "a stride-1 dX is a Conv with the kernel flipped, a strided one a ConvTranspose"
    model = helper.make_model(helper.make_graph(rw.nodes, "g", list(graph.input), list(graph.output), list(graph.initializer) + rw.inits),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    dx, dw, db = sess.run(None, {"dY": dy.numpy(), "X": x.detach().numpy(), **({"W": w.detach().numpy()} if weight_input else {})})
    np.testing.assert_allclose(dx, x.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, w.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, b.grad.numpy(), rtol=1e-4, atol=1e-4)
