"""The chunked vocabulary projection (vocab_chunks.chunk_vocab) against float64 and against the unchunked
graph it replaces, on a packed head: a graph as ORT's training graph has it (LogSoftmax picked at the
labels, its backward in standard ops), run whole and chunked."""

import numpy as np
import pytest

VOCAB, HIDDEN, ROWS, N = 2048, 64, 128, 64  # 16 chunks


def packed_head(seed=0):
    import torch

    from edgeft.workstation.onnx_base import pack_int

    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(-8, 8, (VOCAB, HIDDEN)).astype(np.int8))
    scale = torch.from_numpy((rng.random((VOCAB, HIDDEN // 32)).astype(np.float32) + 0.5) / 8)
    return pack_int("head", codes, scale, None, 32, 4, True)


def head_step(p, chunked: bool):
    """A session computing (picked log-probabilities, their gradient wrt x) of x @ W^T at the labels,
    and the packed data it reads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.workstation.onnx_base import rebuild_subgraph
    from edgeft.workstation.packed_rows import Layout
    from edgeft.workstation.vocab_chunks import chunk_vocab, prune_dead

    nodes, data, consts = rebuild_subgraph(p)
    mk = helper.make_node
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes += [mk("Transpose", ["head"], ["wt"], perm=[1, 0]), mk("MatMul", ["x", "wt"], ["z"]), mk("LogSoftmax", ["z"], ["logp"], axis=1),
              mk("GatherElements", ["logp", "labels"], ["picked"], axis=1), mk("Identity", ["g"], ["picked_grad"]),
              # the unchunked backward: d logp = G at the labels; dz = d logp - softmax * sum(d logp); dx = dz @ W
              mk("Shape", ["logp"], ["shape"]), mk("ConstantOfShape", ["shape"], ["zeros"], value=zero),
              mk("ScatterElements", ["zeros", "labels", "picked_grad"], ["dlogp"], axis=1), mk("Exp", ["logp"], ["softmax"]),
              mk("ReduceSum", ["dlogp", "axis1"], ["dsum"], keepdims=1), mk("Mul", ["softmax", "dsum"], ["sd"]),
              mk("Sub", ["dlogp", "sd"], ["dz"]), mk("MatMul", ["dz", "head"], ["x_grad"])]
    consts["axis1"] = np.array([1], np.int64)
    if chunked:
        nodes, more, info = chunk_vocab(nodes, {"head": Layout.of(p)}, training=True)
        assert info["chunks"] == VOCAB // ROWS
        nodes = prune_dead(nodes, ["picked", "x_grad"])
        consts.update(more)
    read = {i for n in nodes for i in n.input}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", HIDDEN]), helper.make_tensor_value_info("labels", TensorProto.INT64, ["n", 1]),
              helper.make_tensor_value_info("g", TensorProto.FLOAT, ["n", 1])]
    inputs += [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in data.items()]
    graph = helper.make_graph(nodes, "head", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("picked", "x_grad")],
                              [numpy_helper.from_array(v, k) for k, v in consts.items() if k in read])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), data


@pytest.mark.parametrize("confidence", [1.0, 6.0])
def test_chunked_head_is_as_exact_as_the_whole_one(monkeypatch, confidence):
    """Each position's hidden state points at its label's row, `confidence` times as far as noise: at 6
    the model is sure of most labels (a large model's usual case on real text); at 1 it is not."""
    monkeypatch.setattr("edgeft.workstation.vocab_chunks.MIN_ROWS", ROWS)
    monkeypatch.setattr("edgeft.workstation.vocab_chunks.CHUNK_BYTES", ROWS * HIDDEN * 4)
    p = packed_head()
    w = p.dequantize().astype(np.float64)
    rng = np.random.default_rng(1)
    y = rng.integers(0, VOCAB, N)
    x = (confidence * w[y] / np.linalg.norm(w[y], axis=1, keepdims=True) + rng.standard_normal((N, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    g = np.full((N, 1), -1.0 / N, np.float32)  # the mean loss's gradient
    z = x.astype(np.float64) @ w.T
    lse = z.max(1, keepdims=True) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    want_logp, want_dx = (z - lse)[np.arange(N), y], g * (w[y] - np.exp(z - lse) @ w)
    err = {}
    for chunked in (False, True):
        session, data = head_step(p, chunked)
        logp, dx = session.run(None, {"x": x, "labels": y[:, None], "g": g, **data})
        err[chunked] = np.linalg.norm(dx - want_dx) / np.linalg.norm(want_dx), np.abs(logp[:, 0] - want_logp).max()
    whole, chunks = err[False], err[True]
    # measured at 6: whole 2.5e-5, chunked 1.9e-5 (8.2e-5 while the log-sum-exp was one fp32 number)
    assert whole[0] < 1e-4 and chunks[0] <= 1.5 * whole[0] + 1e-6, err  # as exact as the graph it replaces
    # the label's logit is its own dot product (t), rounded apart from its chunk's: 9.6e-6 at 6
    assert chunks[1] < 3e-5, err
