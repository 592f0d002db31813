"""The bundle's graphs, from one trace of the workstation model.

`BundleGraphs` returns (loss, logits) from one pass of the model; `export_graph` traces it with
the legacy exporter (parameter names kept, no weights: export_params=False); `split_graphs` prunes
the trace into the loss graph (ORT's training artifacts are generated from it) and the inference
graph; `base_as_inputs` swaps each packed weight for the subgraph rebuilding it from the packed
tensors, which, like every frozen tensor, stay graph inputs; `shorten_names` renames the values
inside a graph (ORT and the portable rewrite derive every name from them; a graph's size is
mostly its names).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .onnx_base import PackedWeight, replace_with_packed

OPSET = 17  # ORT 1.19 reads <= 21; 17 is what the legacy exporter handles best
IR_VERSION = 9
USER_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")


class BundleGraphs(torch.nn.Module):
    """(loss, logits) from one pass of the model: one trace, split into the training graph's
    forward and the inference graph (`split_graphs`), instead of tracing the model twice. The loss
    is LossGraph's; the logits are the model's own (validation compares them with LogitsGraph)."""

    def __init__(self, model, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids, attention_mask, labels):
        if self.task == "classify":
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            return torch.nn.functional.cross_entropy(logits, labels), logits
        from .objective import causal_lm_loss_on_hidden, vocab_logits

        hf = self.model.get_base_model()
        hidden = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return causal_lm_loss_on_hidden(hf, hidden, labels)[0], vocab_logits(hf, hidden)


def prune(graph, outputs: list[str]) -> None:
    """Keep what `outputs` need: nodes, inputs, initializers, value_info (in place)."""
    needed, kept = set(outputs), []
    for node in reversed(graph.node):  # the exporter writes nodes in topological order
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    made = {o for n in kept for o in n.output}
    for field, keep in ((graph.node, kept), (graph.input, [i for i in graph.input if i.name in needed]),
                        (graph.output, [o for o in graph.output if o.name in outputs]),
                        (graph.initializer, [t for t in graph.initializer if t.name in needed]),
                        (graph.value_info, [v for v in graph.value_info if v.name in made])):
        keep = list(keep)
        del field[:]
        field.extend(keep)


def split_graphs(both: Path, loss: Path, logits: Path) -> None:
    """The (loss, logits) trace as two graphs: the loss graph (for ORT's training artifacts) and the
    inference graph, whose dropouts (ratio 0, traced in training mode) become Identity."""
    import onnx

    model = onnx.load(str(both))
    inference = onnx.ModelProto()
    inference.CopyFrom(model)
    prune(model.graph, ["loss"])
    onnx.save(model, str(loss))
    used = {i for n in inference.graph.node for i in n.input}
    for node in inference.graph.node:
        if node.op_type == "Dropout" and not (len(node.output) > 1 and node.output[1] in used):
            node.op_type = "Identity"
            del node.input[1:], node.output[1:], node.attribute[:]
    prune(inference.graph, ["logits"])
    onnx.save(inference, str(logits))


def export_graph(module, args, path: Path, inputs: list[str], outputs: list[str], dynamic: dict, training: bool) -> None:
    """The graph only: parameters come out as named inputs (export_params=False), and the bundle
    feeds them, so the fp32 base is never serialized just to be replaced by packed codes."""
    import warnings

    with warnings.catch_warnings(), _weights_hidden_from_shape_inference():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=False, export_params=False,
                          training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic)


@contextlib.contextmanager
def _weights_hidden_from_shape_inference():
    """The legacy exporter hands every weight's values to its ONNX shape inference, which copies
    the weights a node reads into a model proto for each such node: time and memory that grow with
    the model (Qwen2.5-1.5B: 104 s of tracing, and gigabytes) for shapes the weights' types already
    give. With export_params=False the values are never written either, so the exporter gets an
    empty name -> value map: the same graph (node for node, tested), in a fraction of the time."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter
    except ImportError:  # another torch: export as it comes
        yield
        return
    original = exporter._get_named_param_dict
    exporter._get_named_param_dict = lambda graph, params: {}
    try:
        yield
    finally:
        exporter._get_named_param_dict = original


def add_layernorm_stats(model) -> None:
    """ORT's LayerNormalization gradient needs the saved mean and inv-std outputs."""
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "LayerNormalization"):
        while len(node.output) < 3:
            node.output.append(f"{node.output[0]}::stat{len(node.output)}_{i}")


def base_as_inputs(source: Path, target: Path, packed: list[PackedWeight], initial: dict, short: bool = False,
                   chunk_head: bool = False, gate: bool = False) -> list[str]:
    """An exported graph (every parameter an input, export_params=False) made into a bundle graph:
    the parameters in `initial` (the trainable ones, for ORT's training artifacts) become initializers,
    each packed weight a subgraph rebuilding it from its packed tensors, which like every other
    frozen tensor stay inputs; `short`: with shortened value names; `chunk_head`: the vocabulary
    projection chunk by chunk (vocab_chunks.chunk_head_logits); `gate`: each weight rebuilt only once
    its layer's input exists (portable_memory.gate_rebuilds), not the whole base first. Returns the
    frozen input names (what base.safetensors holds)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    names = {i.name for i in model.graph.input}
    inputs = [i for i in model.graph.input if i.name not in initial]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(numpy_helper.from_array(initial[n], n) for n in initial if n in names)
    replace_with_packed(model, [p for p in packed if p.name in names])
    if chunk_head:
        from .packed_rows import Layout
        from .vocab_chunks import chunk_head_logits

        chunk_head_logits(model, {p.name: Layout.of(p) for p in packed if p.name in names})
    add_layernorm_stats(model)
    if gate:
        from .portable_memory import gate_graph

        gate_graph(model.graph, USER_INPUTS)
    model.ir_version = IR_VERSION
    if short:
        shorten_names(model)
    onnx.save(model, str(target))
    return [i.name for i in model.graph.input if i.name not in USER_INPUTS]


def shorten_names(model, keep: set[str] = frozenset()) -> None:
    """Every value a node computes gets a short name (`v1a`...), every node one too, in place; graph
    inputs, outputs, initializers and `keep` keep theirs. ONNX Runtime names gradients and the
    portable rewrite its values after these, so a graph shrinks by over half (Gemma-3-270M's five
    graphs: most of their bytes were module paths like /model/layers.17/self_attn/...)."""
    graph = model.graph
    fixed = set(keep) | {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    names: dict[str, str] = {}
    count = 0
    for node in graph.node:
        for name in node.output:
            if name and name not in fixed and name not in names:
                while f"v{count:x}" in fixed:
                    count += 1
                names[name] = f"v{count:x}"
                count += 1
    for k, node in enumerate(graph.node):
        node.name = f"n{k:x}"
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
    for v in graph.value_info:
        v.name = names.get(v.name, v.name)
