"""The portable training step: ORT's training graphs rewritten into standard `ai.onnx` ops.

onnxruntime-training stopped at 1.19.2 and has no aarch64 wheels, so a Raspberry Pi cannot
run its graphs: the backward pass uses com.microsoft gradient kernels (LayerNormalizationGrad,
SoftmaxGrad_13, ...) that only the training build has. This module rewrites each of those
nodes into the standard ops that compute the same thing, so stock ONNX Runtime (any version
>= 1.19, any platform) runs the step.

Why rewrite ORT's graph rather than trace a new one with torch: the gradients are then the
very ones the training build computes, so the two backends agree to rounding, and there is one
source of gradients to test. What the backward pass keeps differs where it saves memory: for a
large base it rebuilds each weight and cheap activations instead of holding the forward's.

Files written under `portable/` in the bundle:
  train_step.onnx   (batch, all params) -> (loss, one gradient per trainable param)
  eval_step.onnx    (batch, all params) -> loss
  adamw.onnx        torch.optim.AdamW over the trainable params as one flat vector
  frozen.safetensors  the frozen (packed, quantized) base, fed to both graphs as inputs
  rebuild.onnx      only for a small base: (packed base) -> fp32 weights, run once per session;
                    the steps then take the weights as inputs
Frozen tensors are inputs, not initializers, so ORT cannot constant-fold them into fp32 and
one copy in memory serves both graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 17
FOLDER = "portable"
STEP, EVAL, ADAMW, FROZEN, REBUILD = "train_step.onnx", "eval_step.onnx", "adamw.onnx", "frozen.safetensors", "rebuild.onnx"
# CSE would merge the backward pass's own rebuild of each weight back into the forward one
DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]


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

    def _SplitTraining(self, i, o, a):
        self.nodes.append(self.h.make_node("Split", i, o, name=self.fresh("Split_node"), axis=a.get("axis", 0)))


def constant_names(initializers, nodes: list) -> set[str]:
    return {i.name for i in initializers} | {o for n in nodes if not n.input for o in n.output}  # + Constant nodes


def rebuilds_base(node, base: set[str], constants: set[str]) -> bool:
    """Whether `node` is part of rebuilding the base: only frozen-derived inputs and constants."""
    return bool(node.input) and any(i in base for i in node.input) and all(i in base or i in constants or not i for i in node.input)


# Elementwise ops cheap enough to run again in the backward pass rather than keep their output
CHEAP = {"Add", "Sub", "Mul", "Div", "Neg", "Sigmoid", "Tanh", "Exp", "Sqrt", "Reciprocal", "Pow", "Cast", "Identity", "Relu", "Erf"}


def recompute_for_backward(nodes: list, frozen: set[str], constants: set[str], loss: str) -> list:
    """The backward pass computes again, right where it needs them, two kinds of forward tensors:

    - each quantized weight rebuilt from its packed codes. In ORT's graph the fp32 weight
      rebuilt for the forward matmul stays alive until the backward matmul that needs it: the
      whole base in fp32 (SmolLM2: ~540 MiB) at the step's peak;
    - cheap elementwise results whose inputs the backward pass keeps anyway (SiLU(gate) and
      SiLU(gate) * up beside gate and up, the normalized hidden state beside the residual and
      its inverse RMS): a few elementwise passes instead of holding them from the forward.

    Only for a large base (see edgeft.plan.HOLD_BASE_MIB): a small model's step is quicker holding them.
    Forward is what the loss needs; every other node is backward, wherever ORT listed it.
    Clones are placed before their first backward use; ORT's common-subexpression pass must be
    off for this graph (see DISABLED_OPTIMIZERS)."""
    producer = {o: n for n in nodes for o in n.output if o}
    forward, todo = set(), [loss]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in forward:
            forward.add(id(n))
            todo.extend(i for i in n.input if i)
    kept = {i for n in nodes if id(n) not in forward for i in n.input}  # what backward reads
    again, base = set(), set(frozen)
    for n in nodes:
        if id(n) not in forward or not n.input:
            continue
        if rebuilds_base(n, base, constants):
            base.update(o for o in n.output if o)
        elif n.op_type in CHEAP and all(i in kept or i in constants or i in base or i in again or not i for i in n.input):
            again.update(o for o in n.output if o)
    derived = (base - set(frozen)) | again
    clones: dict[str, str] = {}
    out = []
    for n in nodes:
        if id(n) not in forward:
            for name in n.input:
                if name in derived and name not in clones:
                    out.extend(_clone_chain(name, producer, derived, clones))
            n.input[:] = [clones.get(i, i) for i in n.input]
        out.append(n)
    return out


def _clone_chain(name: str, producer: dict, derived: set[str], clones: dict) -> list:
    """Copies of the nodes computing `name` from what stays alive, in order, with fresh output names."""
    from onnx import NodeProto

    node = producer[name]
    made = []
    for i in node.input:
        if i in derived and i not in clones:
            made.extend(_clone_chain(i, producer, derived, clones))
    copy = NodeProto()
    copy.CopyFrom(node)
    copy.name = f"{node.name or node.op_type}::bwd{len(clones)}"
    copy.input[:] = [clones.get(i, i) for i in node.input]
    for o in node.output:
        if o:
            clones[o] = o + "::bwd"
    copy.output[:] = [clones.get(o, o) for o in node.output]
    return made + [copy]


def portable_graph(path: Path, frozen: set[str] = frozenset(), recompute: bool = True):
    """ORT's training (or eval) graph as standard ops: params stay inputs, gradients become outputs."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    rewriter = Rewriter(graph)
    accumulated: dict = {}
    rewriter.run(accumulated)
    user = [i for i in graph.input if not i.name.endswith(".accumulation.buffer") and i.name != "lazy_reset_grad"]
    inputs = {i.name: i for i in graph.input}
    outputs = []
    for out in graph.output:
        if out.name in accumulated:  # the accumulator's output is a flag; the gradient has its param's type
            grad = accumulated[out.name]
            param = inputs[grad[: -len("_grad")]]
            outputs.append(helper.make_value_info(grad, param.type))
        else:
            outputs.append(out)
    nodes = rewriter.nodes
    if accumulated and frozen and recompute:
        constants = constant_names(list(graph.initializer) + rewriter.inits, nodes)
        nodes = recompute_for_backward(nodes, set(frozen), constants, graph.output[0].name)
    new = helper.make_graph(nodes, graph.name, user, outputs, list(graph.initializer) + rewriter.inits,
                            value_info=[v for v in graph.value_info])
    result = helper.make_model(new, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeft")
    result.ir_version = 8
    check_standard(result)
    return result


def check_standard(model) -> None:
    import onnx

    bad = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                  if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type, "")})
    if bad:
        raise RuntimeError(f"the portable step still has non-standard ops: {', '.join(bad)}")
    onnx.checker.check_model(model)


def adamw_graph(betas: tuple[float, float], eps: float, weight_decay: float):
    """torch.optim.AdamW on flat fp32 vectors: (lr, step, params, grads, m, v) -> (params, m, v)."""
    from onnx import TensorProto, helper, numpy_helper

    b1, b2 = betas
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    inits = [c("b1", b1), c("b2", b2), c("one_b1", 1 - b1), c("one_b2", 1 - b2), c("eps", eps), c("one", 1.0), c("wd", weight_decay)]
    n = helper.make_node
    nodes = [
        n("Pow", ["b1", "step"], ["b1_t"]), n("Pow", ["b2", "step"], ["b2_t"]),
        n("Mul", ["b1", "exp_avg"], ["m_a"]), n("Mul", ["one_b1", "grads"], ["m_b"]), n("Add", ["m_a", "m_b"], ["exp_avg_out"]),
        n("Mul", ["grads", "grads"], ["g2"]), n("Mul", ["b2", "exp_avg_sq"], ["v_a"]), n("Mul", ["one_b2", "g2"], ["v_b"]),
        n("Add", ["v_a", "v_b"], ["exp_avg_sq_out"]),
        n("Sub", ["one", "b1_t"], ["bc1"]), n("Sub", ["one", "b2_t"], ["bc2"]),
        n("Div", ["lr", "bc1"], ["step_size"]), n("Sqrt", ["bc2"], ["bc2_sqrt"]),
        n("Sqrt", ["exp_avg_sq_out"], ["v_sqrt"]), n("Div", ["v_sqrt", "bc2_sqrt"], ["v_hat"]), n("Add", ["v_hat", "eps"], ["denom"]),
        n("Div", ["exp_avg_out", "denom"], ["ratio"]), n("Mul", ["ratio", "step_size"], ["update"]),
        n("Mul", ["lr", "wd"], ["lr_wd"]), n("Sub", ["one", "lr_wd"], ["decay"]), n("Mul", ["params", "decay"], ["decayed"]),
        n("Sub", ["decayed", "update"], ["params_out"]),
    ]
    vec = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n"])  # noqa: E731
    scalar = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [])  # noqa: E731
    graph = helper.make_graph(nodes, "adamw", [scalar("lr"), scalar("step"), vec("params"), vec("grads"), vec("exp_avg"), vec("exp_avg_sq")],
                              [vec("params_out"), vec("exp_avg_out"), vec("exp_avg_sq_out")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeft")
    model.ir_version = 8
    check_standard(model)
    return model


def split_base(model, frozen: set[str]):
    """(the step's other nodes, the nodes rebuilding the base, the fp32 tensors handed over)."""
    nodes = model.graph.node
    constant_nodes = {o: n for n in nodes if not n.input for o in n.output}
    constants = constant_names(model.graph.initializer, nodes)
    base, rebuild = set(frozen), []
    for n in nodes:
        if rebuilds_base(n, base, constants):
            base.update(o for o in n.output if o)
            rebuild.append(n)
    made = base - set(frozen)
    rest = [n for n in nodes if not set(n.output) & made]
    handed = sorted({i for n in rest for i in n.input} & made)
    needed = [constant_nodes[i] for i in dict.fromkeys(i for n in rebuild for i in n.input) if i in constant_nodes]
    return rest, needed + rebuild, handed


def rebuild_graph(models: list, frozen: set[str]):
    """For a base small enough to hold: the weights are the same every step, so the device
    rebuilds them once per session with this graph, (packed base) -> (fp32 weights), and the
    steps in `models` (changed in place) take those weights as inputs."""
    import onnx
    from onnx import helper

    nodes, inputs, inits, parts = {}, {}, {}, []
    for model in models:
        rest, rebuild, handed = split_base(model, frozen)
        known = {i.name: i for i in model.graph.input}
        initializers = {i.name: i for i in model.graph.initializer}
        for n in rebuild:
            nodes.setdefault(n.output[0], n)  # both steps rebuild the base with the same names
            inputs.update({i: known[i] for i in n.input if i in known})
            inits.update({i: initializers[i] for i in n.input if i in initializers})
        parts.append((model, rest, handed))
    # a constant may be a Constant node in one step and an initializer in the other (Gemma's `1 + norm.weight`)
    produced = {o for n in nodes.values() for o in n.output}
    inits = [t for name, t in inits.items() if name not in produced]
    ordered = [n for n in nodes.values() if not n.input] + [n for n in nodes.values() if n.input]  # constants first: topological
    graph = helper.make_graph(ordered, "rebuild", list(inputs.values()), [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeft")
    model.ir_version = 8
    typed = {v.name: v for v in onnx.shape_inference.infer_shapes(model, ).graph.value_info}
    for step, rest, handed in parts:
        used = {i for n in rest for i in n.input}
        step_inputs = [i for i in step.graph.input if i.name in used] + [typed[h] for h in handed]
        del step.graph.node[:]
        step.graph.node.extend(rest)
        del step.graph.input[:]
        step.graph.input.extend(step_inputs)
        check_standard(step)
    model.graph.output.extend(typed[h] for h in sorted({h for _, _, handed in parts for h in handed}))
    check_standard(model)
    return model


def write_portable(bundle: Path, optimizer: dict, recompute: bool = True) -> dict:
    """Writes `portable/` next to ORT's artifacts; returns its manifest entry.

    recompute: a large base is rebuilt inside the step, where each weight is used (and again in
    the backward pass); a small one (recompute off) once per session, by `rebuild.onnx`."""
    from onnxruntime.training import api
    from safetensors.numpy import save

    from ..fsutil import atomic_write_bytes

    folder = Path(bundle) / FOLDER
    folder.mkdir(exist_ok=True)
    state = api.CheckpointState.load_checkpoint(str(Path(bundle) / "checkpoint"))
    frozen = {name: np.ascontiguousarray(p.data) for name, p in state.parameters if not p.requires_grad}
    atomic_write_bytes(folder / FROZEN, save(frozen))
    steps = [portable_graph(Path(bundle) / source, set(frozen), recompute) for source in ("training_model.onnx", "eval_model.onnx")]
    entry = {"folder": FOLDER, "train_step": f"{FOLDER}/{STEP}", "eval_step": f"{FOLDER}/{EVAL}", "optimizer": f"{FOLDER}/{ADAMW}",
             "frozen": f"{FOLDER}/{FROZEN}", "opset": OPSET, "disabled_optimizers": DISABLED_OPTIMIZERS}
    if not recompute:
        atomic_write_bytes(folder / REBUILD, rebuild_graph(steps, set(frozen)).SerializeToString())
        entry["rebuild"] = f"{FOLDER}/{REBUILD}"
    for model, target in zip(steps, (STEP, EVAL)):
        atomic_write_bytes(folder / target, model.SerializeToString())
    adamw = adamw_graph(tuple(optimizer["betas"]), optimizer["eps"], optimizer["weight_decay"])
    atomic_write_bytes(folder / ADAMW, adamw.SerializeToString())
    return entry
