"""ORT-only ops rewritten into standard `ai.onnx` ops: the core of the portable step (see portable.py).

ONNX Runtime's gradient builder writes the backward pass with com.microsoft kernels
(LayerNormalizationGrad, SoftmaxGrad_13, FusedMatMul, ...) that only the training build has,
and the training build stops at 1.19.2, x86-64. `Rewriter` replaces each such node by the few
standard ops that compute the same values, so stock ONNX Runtime on any platform runs the
graph; `check_standard` proves none is left. A new architecture that brings a new ORT op gets
its rewrite here, as one `_<OpType>` method.
"""

from __future__ import annotations

import numpy as np

OPSET = 17  # every portable graph declares this opset of the standard domain


class Rewriter:
    """Rewrites one graph node by node; each ORT-only node becomes a few standard nodes."""

    def __init__(self, graph):
        from onnx import helper, numpy_helper

        self.h, self.nh, self.graph = helper, numpy_helper, graph
        self.nodes: list = []
        self.inits: list = []
        self.count = 0
        self.ranks = {}
        for v in list(graph.value_info) + list(graph.input) + list(graph.output):
            t = v.type.tensor_type
            if t.HasField("shape"):
                self.ranks[v.name] = len(t.shape.dim)
        for i in graph.initializer:
            self.ranks[i.name] = len(i.dims)
        self.consumed = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}

    # -- building blocks ---------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"portable::{hint}_{self.count}"

    def const(self, value, dtype=np.float32) -> str:
        name = self.fresh("c")
        self.inits.append(self.nh.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op_type)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=self.fresh(op_type + "_node"), **attrs))
        return out

    def rank(self, name: str) -> int:
        if name not in self.ranks:
            raise NotImplementedError(f"rank of {name} unknown")
        return self.ranks[name]

    def used(self, name: str) -> bool:
        return bool(name) and name in self.consumed

    def transpose_last2(self, x: str) -> str:
        r = self.rank(x)
        perm = list(range(r - 2)) + [r - 1, r - 2]
        return self.op("Transpose", [x], perm=perm)

    def reduce_leading(self, x: str, out: str, r: int) -> None:
        """Sum over every axis but the last: the gradient of a per-channel scale or bias."""
        self.op("ReduceSum", [x, self.const(list(range(r - 1)), np.int64)], out, keepdims=0)

    # -- the rewrite -------------------------------------------------------------
    def run(self, accumulated: dict) -> None:
        for node in self.graph.node:
            attrs = {a.name: self.h.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "InPlaceAccumulatorV2":
                accumulated[node.output[0]] = node.input[1]  # the device accumulates; the step returns raw gradients
                continue
            if node.domain in ("", "ai.onnx") and node.op_type != "SimplifiedLayerNormalization":
                self.nodes.append(node)
                continue
            rewrite = getattr(self, "_" + node.op_type, None)
            if rewrite is None:
                raise NotImplementedError(f"no standard-op rewrite for {node.domain}::{node.op_type}")
            rewrite(list(node.input), list(node.output), attrs)

    def _FusedMatMul(self, i, o, a):
        if a.get("transBatchA") or a.get("transBatchB"):
            raise NotImplementedError("FusedMatMul with transBatch")
        x = self.transpose_last2(i[0]) if a.get("transA") else i[0]
        y = self.transpose_last2(i[1]) if a.get("transB") else i[1]
        alpha = a.get("alpha", 1.0)
        if alpha == 1.0:
            self.op("MatMul", [x, y], o[0])
        else:
            self.op("Mul", [self.op("MatMul", [x, y]), self.const(alpha)], o[0])

    def normal_cdf(self, x: str) -> str:
        """Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
        return self.op("Mul", [self.op("Add", [self.op("Erf", [self.op("Mul", [x, self.const(np.sqrt(0.5))])]), self.const(1.0)]), self.const(0.5)])

    def _Gelu(self, i, o, a):
        self.op("Mul", [i[0], self.normal_cdf(i[0])], o[0])

    def _GeluGrad(self, i, o, a):
        dy, x = i
        cdf = self.normal_cdf(x)
        pdf = self.op("Mul", [self.op("Exp", [self.op("Mul", [self.op("Mul", [x, x]), self.const(-0.5)])]), self.const(1 / np.sqrt(2 * np.pi))])
        self.op("Mul", [dy, self.op("Add", [cdf, self.op("Mul", [x, pdf])])], o[0])

    def _QuickGelu(self, i, o, a):
        s = self.op("Sigmoid", [self.op("Mul", [i[0], self.const(a.get("alpha", 1.702))])])
        self.op("Mul", [i[0], s], o[0])

    def _QuickGeluGrad(self, i, o, a):
        dy, x = i
        ax = self.op("Mul", [x, self.const(a.get("alpha", 1.702))])
        s = self.op("Sigmoid", [ax])
        inner = self.op("Add", [self.const(1.0), self.op("Mul", [ax, self.op("Sub", [self.const(1.0), s])])])
        self.op("Mul", [dy, self.op("Mul", [s, inner])], o[0])

    def _FastGelu(self, i, o, a):
        """x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) / 2, written as x * sigmoid(2u): the same value."""
        x = self.op("Add", [i[0], i[1]]) if len(i) > 1 and i[1] else i[0]
        self.op("Mul", [x, self.op("Mul", [self.op("Add", [self.op("Tanh", [self.gelu_tanh_arg(x)]), self.const(1.0)]), self.const(0.5)])], o[0])

    def gelu_tanh_arg(self, x: str) -> str:
        cube = self.op("Mul", [self.op("Mul", [x, x]), x])
        return self.op("Mul", [self.op("Add", [x, self.op("Mul", [cube, self.const(0.044715)])]), self.const(np.sqrt(2 / np.pi))])

    def _FastGeluGrad(self, i, o, a):
        """d/dx = (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2, t = tanh(u)."""
        dy, x = i[0], i[1]
        t = self.op("Tanh", [self.gelu_tanh_arg(x)])
        du = self.op("Mul", [self.op("Add", [self.op("Mul", [self.op("Mul", [x, x]), self.const(3 * 0.044715)]), self.const(1.0)]),
                             self.const(np.sqrt(2 / np.pi))])
        sech2 = self.op("Sub", [self.const(1.0), self.op("Mul", [t, t])])
        grad = self.op("Add", [self.op("Add", [t, self.const(1.0)]), self.op("Mul", [self.op("Mul", [x, sech2]), du])])
        self.op("Mul", [dy, self.op("Mul", [grad, self.const(0.5)])], o[0])

    def _ReluGrad(self, i, o, a):
        dy, y = i  # y > 0 exactly where the input was
        self.op("Where", [self.op("Greater", [y, self.const(0.0)]), dy, self.const(0.0)], o[0])

    def _TanhGrad(self, i, o, a):
        dy, y = i
        self.op("Mul", [dy, self.op("Sub", [self.const(1.0), self.op("Mul", [y, y])])], o[0])

    def _SoftmaxGrad_13(self, i, o, a):
        dy, y = i
        axes = self.const([a.get("axis", -1)], np.int64)
        dot = self.op("ReduceSum", [self.op("Mul", [dy, y]), axes], keepdims=1)
        self.op("Mul", [y, self.op("Sub", [dy, dot])], o[0])

    def _LogSoftmaxGrad_13(self, i, o, a):
        dy, y = i  # y = log softmax: dx = dy - softmax * sum(dy)
        total = self.op("ReduceSum", [dy, self.const([a.get("axis", -1)], np.int64)], keepdims=1)
        self.op("Sub", [dy, self.op("Mul", [self.op("Exp", [y]), total])], o[0])

    def _GatherElementsGrad(self, i, o, a):
        dy, shape, index = i  # every gathered gradient added back where it came from
        zeros = self.op("ConstantOfShape", [shape], value=self.nh.from_array(np.zeros(1, np.float32)))
        self.op("ScatterElements", [zeros, index, dy], o[0], axis=a.get("axis", 0), reduction="add")

    def _SimplifiedLayerNormalization(self, i, o, a):
        if a.get("axis", -1) != -1:
            raise NotImplementedError("SimplifiedLayerNormalization over more than the last axis")
        x, scale = i
        ms = self.op("ReduceMean", [self.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.const(a.get("epsilon", 1e-5))])])],
                      o[1] if len(o) > 1 and o[1] else None)
        self.op("Mul", [self.op("Mul", [x, inv]), scale], o[0])

    def _SimplifiedLayerNormalizationGrad(self, i, o, a):
        dy, x, scale, inv = i
        xhat = self.op("Mul", [x, inv])
        g = self.op("Mul", [dy, scale])
        proj = self.op("ReduceMean", [self.op("Mul", [g, xhat])], axes=[-1], keepdims=1)
        self.op("Mul", [inv, self.op("Sub", [g, self.op("Mul", [xhat, proj])])], o[0])
        if len(o) > 1 and self.used(o[1]):
            self.reduce_leading(self.op("Mul", [dy, xhat]), o[1], self.rank(dy))

    def _LayerNormalizationGrad(self, i, o, a):
        if a.get("axis", -1) != -1:
            raise NotImplementedError("LayerNormalizationGrad over more than the last axis")
        dy, x, scale, mean, inv = i
        xhat = self.op("Mul", [self.op("Sub", [x, mean]), inv])
        g = self.op("Mul", [dy, scale])
        g_mean = self.op("ReduceMean", [g], axes=[-1], keepdims=1)
        proj = self.op("ReduceMean", [self.op("Mul", [g, xhat])], axes=[-1], keepdims=1)
        self.op("Mul", [inv, self.op("Sub", [self.op("Sub", [g, g_mean]), self.op("Mul", [xhat, proj])])], o[0])
        r = self.rank(dy)
        if len(o) > 1 and self.used(o[1]):
            self.reduce_leading(self.op("Mul", [dy, xhat]), o[1], r)
        if len(o) > 2 and self.used(o[2]):
            self.reduce_leading(dy, o[2], r)

    def _SoftmaxCrossEntropyLossGrad(self, i, o, a):
        """(softmax - onehot) * keep * scale, with the one subtracted in place by a scatter:
        a dense one-hot would be one more (tokens x vocabulary) tensor at the step's peak."""
        if len(i) > 3 and i[3]:
            raise NotImplementedError("SoftmaxCrossEntropyLossGrad with class weights")
        dy, log_prob, label = i[:3]
        reduction = a.get("reduction", b"mean")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        keep = self.op("Not", [self.op("Equal", [label, self.const(a.get("ignore_index", -100), np.int64)])])
        keep_f = self.op("Cast", [keep], to=1)
        if reduction == "mean":
            scale = self.op("Div", [dy, self.op("ReduceSum", [keep_f], keepdims=0)])
        elif reduction == "sum":
            scale = dy
        else:
            raise NotImplementedError(f"SoftmaxCrossEntropyLossGrad reduction {reduction}")
        column = self.const([1], np.int64)
        safe = self.op("Unsqueeze", [self.op("Where", [keep, label, self.const(0, np.int64)]), column])
        minus = self.op("Unsqueeze", [self.op("Neg", [keep_f]), column])
        diff = self.op("ScatterElements", [self.op("Exp", [log_prob]), safe, minus], axis=1, reduction="add")
        self.op("Mul", [diff, self.op("Mul", [self.op("Unsqueeze", [keep_f, column]), scale])], o[0])

    def _GatherGrad(self, i, o, a):
        """Zeros of the data's shape with dY scatter-added at the gathered positions."""
        shape, indices, dy = i
        r, q, axis = self.rank(o[0]), self.rank(indices), a.get("axis", 0)
        axis = axis % r
        to_front = [axis] + [d for d in range(r) if d != axis]
        zeros = self.op("ConstantOfShape", [self.op("Gather", [shape, self.const(to_front, np.int64)])],
                        value=self.nh.from_array(np.zeros(1, np.float32)))
        perm_dy = list(range(axis, axis + q)) + list(range(axis)) + list(range(axis + q, r - 1 + q))
        dy_t = dy if perm_dy == sorted(perm_dy) else self.op("Transpose", [dy], perm=perm_dy)
        idx = self.op("Unsqueeze", [indices, self.const([-1], np.int64)])
        scattered = self.op("ScatterND", [zeros, idx, dy_t], reduction="add")
        back = [to_front.index(d) for d in range(r)]
        if back == list(range(r)):
            self.op("Identity", [scattered], o[0])
        else:
            self.op("Transpose", [scattered], o[0], perm=back)

    def _SliceGrad(self, i, o, a):
        """dY zero-padded back to the input's shape: pads computed from starts/ends at run time."""
        dy, shape, starts, ends, axes = i[:5]
        if len(i) > 5 and i[5] and not self.all_ones(i[5]):
            raise NotImplementedError("SliceGrad with steps other than 1")
        r = self.rank(dy)
        i64 = lambda v: self.const(v, np.int64)  # noqa: E731
        axes_n = self.op("Where", [self.op("Less", [axes, i64(0)]), self.op("Add", [axes, i64(r)]), axes])
        dims = self.op("Gather", [shape, axes_n])

        def clamp(t):
            t = self.op("Where", [self.op("Less", [t, i64(0)]), self.op("Add", [t, dims]), t])
            return self.op("Min", [self.op("Max", [t, i64(0)]), dims])

        zeros = i64(np.zeros(r))
        before = self.op("ScatterElements", [zeros, axes_n, clamp(starts)], axis=0)
        after = self.op("ScatterElements", [zeros, axes_n, self.op("Sub", [dims, clamp(ends)])], axis=0)
        self.op("Pad", [dy, self.op("Concat", [before, after], axis=0)], o[0], mode="constant")

    def all_ones(self, name: str) -> bool:
        for init in list(self.graph.initializer) + self.inits:
            if init.name == name:
                return bool(np.all(self.nh.to_array(init) == 1))
        return False

    def _ConcatTraining(self, i, o, a):
        axis = a.get("axis", 0)
        self.op("Concat", i, o[0], axis=axis)
        if len(o) > 1 and self.used(o[1]):
            lengths = []
            for x in i:
                ax = axis % self.rank(x)
                lengths.append(self.op("Shape", [x], start=ax, end=ax + 1))
            self.op("Concat", lengths, o[1], axis=0)

    def _Scale(self, i, o, a):
        """y = x * s, or x / s with scale_down (ReduceMean's gradient: dY spread over the reduced cells)."""
        x, s = i
        s = self.op("Cast", [s], to=1)
        self.op("Div" if a.get("scale_down", 0) else "Mul", [x, s], o[0])

    def _ConvGrad(self, i, o, a):
        """dX, dW, dB of Conv(X, W) from dY, in standard ops (see conv_grad.py)."""
        from .conv_grad import conv_grad

        conv_grad(self, i, o, a)

    def _SplitTraining(self, i, o, a):
        self.nodes.append(self.h.make_node("Split", i, o, name=self.fresh("Split_node"), axis=a.get("axis", 0)))


def check_standard(model) -> None:
    import onnx

    bad = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                  if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type, "")})
    if bad:
        raise RuntimeError(f"the portable step still has non-standard ops: {', '.join(bad)}")
    supplied = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if supplied:  # constants the device supplies (portable_memory.supplied_constant) have no file to check: as inputs
        checked = onnx.ModelProto()
        checked.CopyFrom(model)
        keep = [t for t in checked.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        del checked.graph.initializer[:]
        checked.graph.initializer.extend(keep)
        checked.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in supplied)
        model = checked
    onnx.checker.check_model(model)
