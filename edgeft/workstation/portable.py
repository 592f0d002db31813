"""The portable training step: ORT's training graphs rewritten into standard `ai.onnx` ops.

onnxruntime-training stopped at 1.19.2 and has no aarch64 wheels, so a Raspberry Pi cannot
run its graphs: the backward pass uses com.microsoft gradient kernels (LayerNormalizationGrad,
SoftmaxGrad_13, ...) that only the training build has. portable_ops.py rewrites each of those
nodes into the standard ops that compute the same thing, so stock ONNX Runtime (any version
>= 1.19, any platform) runs the step.

Why rewrite ORT's graph rather than trace a new one with torch: the gradients are then the
very ones the training build computes, so the two backends agree to rounding, and there is one
source of gradients to test. What the backward pass keeps differs where it saves memory
(portable_memory.py): for a large base it rebuilds each weight and cheap activations instead
of holding the forward's; a small base is rebuilt once per session instead of every step.

This module is the entry point (`write_portable`, called by export): it puts the step
together and writes the files under `portable/` in the bundle:
  train_step.onnx   (batch, all params) -> (loss, one gradient per trainable param)
  eval_step.onnx    (batch, all params) -> loss; not written when ORT's eval_model.onnx already is
                    this graph in standard ops (the manifest then names that file)
  adamw.onnx        torch.optim.AdamW over the trainable params as one flat vector
  rebuild.onnx      only for a small base: (packed base) -> fp32 weights, run once per session;
                    the steps then take the weights as inputs, or (an image model's) hold them as
                    constants the device supplies, not stored (portable_memory.supplied_constant;
                    the manifest's `supplied` names them)
The frozen base is not here: like every graph of the bundle, the steps take it from the bundle's
one base file (edgeft.workstation.export.FROZEN), as inputs, not initializers: ORT cannot constant-fold
a packed base into fp32, and one copy in memory serves every graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .portable_memory import clip_masks_from_outputs, constant_names, gate_rebuilds, rebuild_graph, recompute_for_backward
from .portable_ops import OPSET, Rewriter, check_standard
from .vocab_chunks import chunk_vocab, prune_dead

FOLDER = "portable"
STEP, EVAL, ADAMW, REBUILD = "train_step.onnx", "eval_step.onnx", "adamw.onnx", "rebuild.onnx"
# CSE would merge the backward pass's own rebuild of each weight back into the forward one
DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]


def portable_graph(path: Path, frozen: set[str] = frozenset(), recompute: bool = True, layouts: dict | None = None, info: dict | None = None):
    """ORT's training (or eval) graph as standard ops: params stay inputs, gradients become outputs.

    layouts: the packed weights' layouts (packed_rows.Layout by name); with them a large base's
    vocabulary projection runs chunk by chunk (vocab_chunks.py), and `info` says how."""
    import onnx
    from onnx import helper, numpy_helper

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
    nodes = clip_masks_from_outputs(rewriter.nodes)
    inits = list(graph.initializer) + rewriter.inits
    if layouts and recompute:
        nodes, consts, chunked = chunk_vocab(nodes, layouts, training=bool(accumulated))
        if chunked:
            nodes = prune_dead(nodes, [o.name for o in outputs])
            read = {i for n in nodes for i in n.input}
            inits = [t for t in inits if t.name in read] + [numpy_helper.from_array(v, k) for k, v in consts.items()]
            user = [i for i in user if i.name in read or i.name in ("input_ids", "attention_mask", "labels")]
            if info is not None:
                info.update(chunked)
    if frozen and recompute:
        constants = constant_names(inits, nodes)
        if accumulated:
            nodes = recompute_for_backward(nodes, set(frozen), constants, graph.output[0].name)
        types = {i.name: i.type.tensor_type.elem_type for i in graph.input} | {t.name: t.data_type for t in inits}
        nodes = gate_rebuilds(nodes, set(frozen), constants, {i.name for i in user}, types)
    made = {o for n in nodes for o in n.output}
    new = helper.make_graph(nodes, graph.name, user, outputs, inits, value_info=[v for v in graph.value_info if v.name in made])
    result = helper.make_model(new, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeft")
    result.ir_version = 8
    check_standard(result)
    return result


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


def _same_graph(model, path: Path) -> bool:
    """Whether the graph at `path` computes `model` with the same nodes, inputs, outputs and
    initializers, in standard ops only (so stock ONNX Runtime runs the file as it is)."""
    import onnx

    other = onnx.load(str(path))
    a, b = model.graph, other.graph
    same = all(list(getattr(a, f)) == list(getattr(b, f)) for f in ("node", "input", "output", "initializer"))
    return same and [(o.domain, o.version) for o in other.opset_import] == [("", OPSET)] and other.ir_version <= 9


def write_portable(bundle: Path, optimizer: dict, frozen: list[str], recompute: bool = True, layouts: dict | None = None,
                   constant_base: bool = False) -> dict:
    """Writes `portable/` next to ORT's artifacts; returns its manifest entry.

    frozen: the names of the frozen base's tensors (inputs of ORT's graphs, and of these).
    recompute: a large base is rebuilt inside the step, where each weight is used (and again in
    the backward pass); a small one (recompute off) once per session, by `rebuild.onnx`.
    constant_base: a small base's steps hold it as constants the device supplies, not as inputs: for
    convolutions, whose kernels ORT runs far faster when constant (an EfficientNet-Lite0 step in 0.6 s
    instead of 1.2). Not for a text model: ORT's folded and prepacked copies of its matrices cost
    more memory than they save time (MiniLM's step: 420 MiB instead of 281, 3% faster)."""
    from ..fsutil import atomic_write_bytes

    folder = Path(bundle) / FOLDER
    folder.mkdir(exist_ok=True)
    frozen = set(frozen)
    chunked: dict = {}
    steps = [portable_graph(Path(bundle) / source, frozen, recompute, layouts, chunked) for source in ("training_model.onnx", "eval_model.onnx")]
    entry = {"folder": FOLDER, "train_step": f"{FOLDER}/{STEP}", "eval_step": f"{FOLDER}/{EVAL}", "optimizer": f"{FOLDER}/{ADAMW}",
             "opset": OPSET, "disabled_optimizers": DISABLED_OPTIMIZERS}
    if chunked:
        entry["vocab_chunks"] = chunked
    if not recompute:
        rebuild, supplied = rebuild_graph(steps, frozen, constant_base)
        atomic_write_bytes(folder / REBUILD, rebuild.SerializeToString())
        entry["rebuild"] = f"{FOLDER}/{REBUILD}"
        if constant_base:
            entry["supplied"] = dict(zip(("train_step", "eval_step"), supplied))
    if recompute and _same_graph(steps[1], Path(bundle) / "eval_model.onnx"):
        entry["eval_step"] = "eval_model.onnx"  # ORT's eval graph is all standard ops already: stored once
        steps = steps[:1]
    for model, target in zip(steps, (STEP, EVAL)):
        atomic_write_bytes(folder / target, model.SerializeToString())
    adamw = adamw_graph(tuple(optimizer["betas"]), optimizer["eps"], optimizer["weight_decay"])
    atomic_write_bytes(folder / ADAMW, adamw.SerializeToString())
    return entry
