"""The portable step rebuilds each weight where it is used (edgeft.workstation.portable_memory.gate_rebuilds):
ONNX Runtime runs a node as soon as its inputs exist, and a weight rebuilt from the packed base needs
nothing the step computes, so without the gates every layer's fp32 weight is rebuilt before the first
layer runs."""

import json

import numpy as np
import pytest

LAYERS, D = 6, 64


def chain_graph():
    """h <- MatMul(h, DequantizeLinear(codes_i, scale_i)) for LAYERS layers; codes and scales are graph
    inputs (the frozen base), as in a bundle's step."""
    from onnx import TensorProto, helper

    nodes, inputs, frozen = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])], set()
    h = "x"
    for i in range(LAYERS):
        codes, scale = f"l{i}.codes", f"l{i}.scale"
        frozen |= {codes, scale}
        inputs += [helper.make_tensor_value_info(codes, TensorProto.INT8, [D, D]), helper.make_tensor_value_info(scale, TensorProto.FLOAT, [D])]
        nodes += [helper.make_node("DequantizeLinear", [codes, scale], [f"w{i}"], axis=1, name=f"dq{i}"),
                  helper.make_node("MatMul", [h, f"w{i}"], [f"h{i}"], name=f"mm{i}")]
        h = f"h{i}"
    graph = helper.make_graph(nodes, "chain", inputs, [helper.make_tensor_value_info(h, TensorProto.FLOAT, [4, D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, frozen


def run_profiled(model, feeds, tmp_path, name):
    """(output, the executed order of the DequantizeLinear and MatMul nodes) under ONNX Runtime's default order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / name)
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)[0]
    events = json.loads(open(session.end_profiling()).read())
    order = [e["name"][: -len("_kernel_time")] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return out, [n for n in order if n.startswith(("dq", "mm"))]


def most_weights_waiting(order):
    """The most rebuilt weights waiting at once for their MatMul."""
    waiting, most = 0, 0
    for n in order:
        waiting += 1 if n.startswith("dq") else -1
        most = max(most, waiting)
    return most


def test_each_weight_is_rebuilt_only_once_its_layer_input_exists(tmp_path):
    import onnx

    from edgeft.workstation.portable_memory import constant_names, gate_rebuilds

    model, frozen = chain_graph()
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((4, D)).astype(np.float32)}
    for i in range(LAYERS):
        feeds[f"l{i}.codes"] = rng.integers(-127, 128, (D, D)).astype(np.int8)
        feeds[f"l{i}.scale"] = (rng.random(D).astype(np.float32) + 0.5) / 127
    plain, plain_order = run_profiled(model, feeds, tmp_path, "plain")
    assert most_weights_waiting(plain_order) == LAYERS  # what the gates are for: ORT rebuilds every weight first

    gated = onnx.ModelProto()
    gated.CopyFrom(model)
    nodes = gate_rebuilds(list(gated.graph.node), frozen, constant_names(gated.graph.initializer, gated.graph.node),
                          {i.name for i in gated.graph.input}, {i.name: i.type.tensor_type.elem_type for i in gated.graph.input})
    del gated.graph.node[:]
    gated.graph.node.extend(nodes)
    onnx.checker.check_model(gated, full_check=True)  # topologically sorted, well typed
    out, order = run_profiled(gated, feeds, tmp_path, "gated")
    assert most_weights_waiting(order) == 1 and len(order) == 2 * LAYERS
    np.testing.assert_array_equal(out, plain)  # Where(c, x, x) is x: the same values, bit for bit


@pytest.mark.parametrize("case", ["graph input", "computed"])
def test_gates_need_a_computed_activation(case):
    """A weight whose first user reads only graph inputs (the embedding's lookup by input_ids) is left as it is;
    one read with a computed tensor waits for it, through an input of a type ONNX Runtime's Where takes."""
    from onnx import helper

    from edgeft.workstation.portable_memory import gate_rebuilds

    nodes = [helper.make_node("DequantizeLinear", ["codes", "scale"], ["w"], name="dq"), helper.make_node("Gather", ["w", "ids"], ["e"], name="g")]
    if case == "graph input":
        out = gate_rebuilds(nodes, {"codes", "scale"}, set(), {"ids"})
        assert [n.name for n in out] == ["dq", "g"] and list(out[0].input) == ["codes", "scale"]
    else:
        nodes.insert(0, helper.make_node("Relu", ["ids"], ["ids2"], name="r"))
        nodes[-1].input[1] = "ids2"
        out = gate_rebuilds(nodes, {"codes", "scale"}, set(), {"ids"}, {"codes": 3, "scale": 1})  # int8 codes: Where cannot take them
        assert [n.op_type for n in out] == ["Relu", "ReduceMax", "Equal", "Where", "DequantizeLinear", "Gather"]
        assert out[3].input[1] == out[3].input[2] == "scale" and out[4].input[1] == out[3].output[0]
