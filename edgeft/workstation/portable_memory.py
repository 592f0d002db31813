"""Where the portable step's memory goes: what the backward pass computes again, and what
is rebuilt once per session (see portable.py, and edgeft.plan for which one a bundle gets).

The step's peak is set by what the forward pass leaves alive for the backward pass. ORT's
graph keeps every fp32 weight rebuilt from packed codes, and every forward result the
backward pass reads. For a large base `recompute_for_backward` rebuilds each weight (and
cheap elementwise results) again where the backward pass needs it; for a small one
`rebuild_graph` moves rebuilding the base out of the step into `rebuild.onnx`, run once per
session. Both only move or copy nodes of the rewritten graph: the computed values are unchanged.
"""

from __future__ import annotations

from .portable_ops import OPSET, check_standard


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
    off for this graph (see portable.DISABLED_OPTIMIZERS)."""
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


# ONNX Runtime's CPU Where takes these element types (float, int64, int32, double, uint8, bool); most preferred first
WHERE_TYPES = (7, 1, 6, 11, 2, 9)


def gate_graph(graph, user: set[str]) -> None:
    """gate_rebuilds on a whole graph, in place: every graph input but `user` is the frozen base."""
    frozen = {i.name for i in graph.input if i.name not in user}
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input} | {t.name: t.data_type for t in graph.initializer}
    nodes = gate_rebuilds(list(graph.node), frozen, constant_names(graph.initializer, graph.node), set(user), types)
    del graph.node[:]
    graph.node.extend(nodes)


def gate_rebuilds(nodes: list, frozen: set[str], constants: set[str], inputs: set[str] = frozenset(), types: dict | None = None) -> list:
    """Each weight rebuilt where it is used, not all of them first.

    A node that reads only the packed base and constants is ready when the step starts, and ONNX
    Runtime's order runs it then: every layer's weight was rebuilt before the first layer ran, and
    the fp32 weights of the whole base sat in memory together (SmolLM2 int3, 1 x 64: +235 MiB at the
    step's peak, where one layer's weights are 14 MiB). Here each chain that rebuilds a weight starts
    only once the activation of its first user exists: one input of each of the chain's first nodes
    passes through Where(m == m, x, x) with m = ReduceMax(activation), which is x whatever the condition, so
    the values do not change; ReduceMax over the activation and a copy of a small input (a constant
    or a slice's bounds where there is one) are all it costs. The first user is the earliest in the
    (topological) node order, so the activation never depends on the chain: no cycle.
    `inputs`: the graph's inputs (never worth waiting for); `types`: element types of the graph's
    inputs and initializers (Where is gated on a type ONNX Runtime's CPU kernel takes)."""
    from onnx import helper

    types = dict(types or {})
    for n in nodes:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            types[n.output[0]] = n.attribute[0].t.data_type
    base = set(frozen)
    rebuild = set()
    for n in nodes:
        if rebuilds_base(n, base, constants):
            base.update(o for o in n.output if o)
            rebuild.add(id(n))
    index = {id(n): i for i, n in enumerate(nodes)}
    producer = {o: n for n in nodes for o in n.output if o}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    first_user: dict[int, object] = {}  # rebuild node -> the earliest non-rebuild node reading its chain
    for n in reversed(nodes):
        if id(n) not in rebuild:
            continue
        best = None
        for o in n.output:
            for c in consumers.get(o, []):
                cand = first_user.get(id(c)) if id(c) in rebuild else c
                if cand is not None and (best is None or index[id(cand)] < index[id(best)]):
                    best = cand
        if best is not None:
            first_user[id(n)] = best
    gates: dict[str, str] = {}  # activation -> its condition
    extra: dict[int, list] = {}  # node position -> nodes to insert before it
    for n in nodes:
        if id(n) not in rebuild or any(i in producer and id(producer[i]) in rebuild for i in n.input):
            continue  # not the start of a chain
        user = first_user.get(id(n))
        act = next((i for i in (user.input if user is not None else []) if i and i not in base and i not in constants and i not in inputs), None)
        if act is None:
            continue
        # gate a small input: a constant (a slice's bounds: a few bytes) before a frozen one (scales before codes)
        rank = lambda k: (n.input[k] not in constants, WHERE_TYPES.index(types[n.input[k]]))  # noqa: E731
        slots = [k for k, i in enumerate(n.input) if i and types.get(i) in WHERE_TYPES]
        if not slots:
            continue
        slot = min(slots, key=rank)
        where = index[id(n)]
        made = []
        if act not in gates:
            gates[act] = f"{act}::gate"
            made += [helper.make_node("ReduceMax", [act], [act + "::gate_max"], keepdims=0, name=act + "::gate_max"),
                     helper.make_node("Equal", [act + "::gate_max", act + "::gate_max"], [gates[act]], name=act + "::gate")]
        x = n.input[slot]
        gated = f"{x}::gated{index[id(n)]}"
        made.append(helper.make_node("Where", [gates[act], x, x], [gated], name=gated))
        n.input[slot] = gated
        extra.setdefault(where, []).extend(made)
    if not extra:
        return nodes
    listed = []
    for i, n in enumerate(nodes):
        listed.extend(extra.get(i, []))
        listed.append(n)
    return topological(listed)


def topological(nodes: list) -> list:
    """`nodes` in an order where each comes after the producers of its inputs, otherwise as listed."""
    import heapq

    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    users: dict[int, list] = {}
    for k, n in enumerate(nodes):
        deps = {producer[i] for i in n.input if i in producer and producer[i] != k}
        waiting[k] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(k)
    ready = [k for k in range(len(nodes)) if not waiting[k]]
    heapq.heapify(ready)
    out = []
    while ready:
        k = heapq.heappop(ready)
        out.append(nodes[k])
        for u in users.get(k, []):
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, u)
    if len(out) != len(nodes):
        raise ValueError("gating the rebuilds made a cycle")
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


def rebuild_graph(models: list, frozen: set[str], constant: bool = False):
    """For a base small enough to hold: the weights are the same every step, so the device
    rebuilds them once per session with this graph, (packed base) -> (fp32 weights), and the
    steps in `models` (changed in place) take those weights as inputs, or with `constant`, those
    weights and the frozen tensors they read straight from the base file as constants the device
    supplies (supplied_constant).

    Returns (the rebuild graph, for each step the names of the constants it must be given)."""
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
    supplied = []
    for step, rest, handed in parts:
        used = {i for n in rest for i in n.input}
        base = [i for i in step.graph.input if i.name in used and i.name in frozen and constant] + [typed[h] for h in handed]
        del step.graph.node[:]
        step.graph.node.extend(rest)
        held = {v.name for v in base}
        inputs = [i for i in step.graph.input if i.name in used and i.name not in held] + ([] if constant else base)
        del step.graph.input[:]
        step.graph.input.extend(inputs)
        if constant:
            step.graph.initializer.extend(supplied_constant(v) for v in base)
            supplied.append(sorted(v.name for v in base))
        check_standard(step)
    model.graph.output.extend(typed[h] for h in sorted({h for _, _, handed in parts for h in handed}))
    check_standard(model)
    return model, supplied


# Where a step's supplied constants say their data is: nowhere on disk (see supplied_constant)
SUPPLIED = "supplied-by-edgeft-at-session-start"


def supplied_constant(value_info):
    """An initializer whose values the device hands ONNX Runtime when it makes the session
    (SessionOptions.add_external_initializers), from the base it holds: the fp32 weights rebuilt once and
    the frozen tensors of the base file, in memory once, shared by every session.

    As initializers, not graph inputs, ORT treats them as constants: it constant-folds what depends only
    on them (a backward convolution's transposed or flipped kernel) and gives convolutions with a constant
    kernel its blocked-layout (NCHWc) kernels, which it cannot for a kernel fed as an input (EfficientNet-
    Lite0's step, BENCHMARKS.md section 12). The data is external and never written: a session made without
    the values fails, naming this location."""
    import numpy as np
    from onnx import TensorProto, helper

    t = TensorProto()
    t.name, t.data_type, t.data_location = value_info.name, value_info.type.tensor_type.elem_type, TensorProto.EXTERNAL
    t.dims.extend(d.dim_value for d in value_info.type.tensor_type.shape.dim)
    size = int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    for key, value in (("location", SUPPLIED), ("offset", "0"), ("length", str(size))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def clip_masks_from_outputs(nodes: list) -> list:
    """ReLU6 (Clip) gradients masked by the Clip's output instead of its input.

    ORT writes Clip's gradient as dY * (x >= min) * (x <= max), which keeps every Clip input x
    alive until the backward pass, beside the output y the next convolution keeps anyway: for
    EfficientNet-Lite, an extra copy of every BN output. (y > min) and (y < max) are the same mask
    but at x exactly equal to a bound, where they give torch's own hardtanh gradient (strict
    inequalities); x is then freed after the forward pass (EfficientNet-Lite0, 16 x 160 px: the
    step's peak RSS 600 -> see BENCHMARKS.md section 12)."""
    from onnx import helper

    clips = {(n.input[0], n.input[i]): n.output[0] for n in nodes if n.op_type == "Clip" for i in (1, 2) if len(n.input) > i and n.input[i]}
    out = []
    for n in nodes:
        y = clips.get((n.input[0], n.input[1])) if n.op_type in ("GreaterOrEqual", "LessOrEqual") and len(n.input) == 2 else None
        if y is None:
            out.append(n)
            continue
        op = "Greater" if n.op_type == "GreaterOrEqual" else "Less"
        out.append(helper.make_node(op, [y, n.input[1]], list(n.output), name=n.name))
    return out

