"""The vocabulary projection of a causal LM's step, chunk by chunk: no vocabulary-sized fp32 tensor.

ORT's training graph projects the labelled positions' hidden states X (N, H) onto the whole
vocabulary: it rebuilds the head W (V, H) in fp32 (Qwen2.5-0.5B: 519 MiB), keeps the (N, V) log-
probabilities for the backward pass, and builds (N, V) gradients there. `chunk_vocab` replaces that
part of the graph (LogSoftmax(X @ W^T) picked at the labels) by a streaming log-sum-exp over chunks
of W's rows, each rebuilt from its packed codes (packed_rows.row_range) and dropped:

  forward   t = X . W[y]                       (the label's rows, gathered packed)
            per chunk c: Z_c = X @ W_c^T, m_c = max Z_c, s_c = sum exp(Z_c - m_c)
            M = max_c m_c, L = log(sum_c s_c exp(m_c - M));  picked = (t - M) - L
  backward  dX = G * (W[y] - sum_c exp((Z_c - M) - L) @ W_c)     (G: the gradient of `picked`)
            Z_c computed again from a chunk rebuilt again: (N, chunk) at a time, never (N, V)

M and L stay apart, as in ORT's LogSoftmax ((z - max) - log sum): their sum, the log-sum-exp, would
round L to the spacing of M's fp32 values, and where the model is confident L (about 1 - p[y]) is
not much larger than that: p[y] rounded towards 1, and the gradient lost part of the label's term
(tests/test_vocab_chunks.py, a confident head: 8.2e-5 from float64, the unchunked graph 2.5e-5).

The same values as the graph it replaces, to fp32 rounding (summed in another order); what the
step holds at its peak is one chunk of W and one (N, chunk) block, not W and three (N, V) tensors.
"""

from __future__ import annotations

import numpy as np

from ..plan import VOCAB_CHUNK_BYTES as CHUNK_BYTES
from ..plan import VOCAB_MIN_ROWS as MIN_ROWS
from ..plan import vocab_chunk_rows
from .packed_rows import Layout, gather_rows, row_range


def chunk_rows(vocab: int, hidden: int) -> int:
    return vocab_chunk_rows(vocab, hidden, CHUNK_BYTES, MIN_ROWS)  # the module's values: tests make chunks small


def packed_source(name: str, producer: dict, layouts: dict) -> Layout | None:
    """The packed weight that `name` is rebuilt from alone (None if it reads anything else)."""
    found, todo, seen = set(), [name], set()
    while todo:
        v = todo.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v.endswith("::q.codes") and v[: -len("::q.codes")] in layouts:
            found.add(v[: -len("::q.codes")])
            continue
        n = producer.get(v)
        if n is not None:
            todo.extend(n.input)
        elif "::q." not in v:
            return None  # a graph input that is not packed data: not a rebuilt weight
    return layouts[found.pop()] if len(found) == 1 else None


def _head(mm, producer: dict, layouts: dict) -> Layout | None:
    """The packed weight W when `mm` is MatMul(X, Transpose(W)) with W rebuilt from it alone."""
    tr = producer.get(mm.input[1]) if mm is not None and mm.op_type == "MatMul" else None
    if tr is None or tr.op_type != "Transpose" or [list(a.ints) for a in tr.attribute if a.name == "perm"] != [[1, 0]]:
        return None
    return packed_source(tr.input[0], producer, layouts)


def _find(nodes: list, layouts: dict):
    """(head layout, X, the node picking the labels' log-probabilities) of the pattern, or None."""
    from onnx import TensorProto, helper

    producer = {o: n for n in nodes for o in n.output if o}
    readers: dict = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for ls in nodes:
        if ls.op_type != "LogSoftmax":
            continue
        mm = producer.get(ls.input[0])
        while mm is not None and (mm.op_type == "Identity" or (mm.op_type == "Cast" and mm.attribute[0].i == TensorProto.FLOAT)):
            mm = producer.get(mm.input[0])  # `.float()` of fp32 logits: a no-op ORT's training graph drops
        lay = _head(mm, producer, layouts)
        # its other readers are the backward pass's, which the rewrite replaces
        picks = [r for r in readers.get(ls.output[0], []) if r.op_type == "GatherElements"]
        if lay is None or not lay.row_addressable or len(picks) != 1:
            continue
        axis = next((helper.get_attribute_value(a) for a in picks[0].attribute if a.name == "axis"), 0)
        if axis in (1, -1):
            return lay, mm.input[0], picks[0]
    return None


def chunk_vocab(nodes: list, layouts: dict, training: bool) -> tuple[list, dict, dict | None]:
    """(nodes, new constants, what was done) with the vocabulary projection chunked; the nodes as
    they are (and None) when the graph has no such projection over a packed, row-addressable head."""
    from onnx import helper

    found = _find(nodes, layouts)
    if found is None:
        return nodes, {}, None
    lay, x, pick = found
    picked, labels = pick.output[0], pick.input[1]
    grad_x, grad_picked = f"{x}_grad", f"{picked}_grad"
    produced = {o for n in nodes for o in n.output}
    if training and not (grad_x in produced and grad_picked in produced):
        return nodes, {}, None
    rows = chunk_rows(lay.out, lay.cols)
    chunks = [(a, min(lay.out, a + rows)) for a in range(0, lay.out, rows)]
    consts: dict = {}
    i64 = np.int64

    def sub(pair):
        part, c = pair
        consts.update(c)
        return part

    def const(name, value, dtype):
        consts[name] = np.asarray(value, dtype=dtype)
        return name

    mk = helper.make_node
    pre = "vocab::"
    one = const(pre + "axis1", [1], i64)
    fwd = [mk("Squeeze", [labels, one], [pre + "y"])]
    fwd += sub(gather_rows(lay, pre + "y", pre + "w_y", pre + "wy"))
    fwd += [mk("Mul", [x, pre + "w_y"], [pre + "xw"]), mk("ReduceSum", [pre + "xw", one], [pre + "t"], keepdims=1)]
    maxes, sums = [], []
    for k, (a, b) in enumerate(chunks):
        c = f"{pre}f{k}."
        fwd += sub(row_range(lay, a, b, c + "w", c + "rows"))
        fwd += [mk("Gemm", [x, c + "w"], [c + "z"], transB=1), mk("ReduceMax", [c + "z"], [c + "m"], axes=[1], keepdims=1),
                mk("Sub", [c + "z", c + "m"], [c + "zc"]), mk("Exp", [c + "zc"], [c + "e"]), mk("ReduceSum", [c + "e", one], [c + "s"], keepdims=1)]
        maxes.append(c + "m")
        sums.append(c + "s")
    fwd.append(mk("Max", maxes, [pre + "M"]))
    scaled = []
    for m, s in zip(maxes, sums):
        fwd += [mk("Sub", [m, pre + "M"], [m + "d"]), mk("Exp", [m + "d"], [m + "x"]), mk("Mul", [s, m + "x"], [s + "w"])]
        scaled.append(s + "w")
    fwd += [mk("Sum", scaled, [pre + "S"]), mk("Log", [pre + "S"], [pre + "logS"]),
            mk("Sub", [pre + "t", pre + "M"], [pre + "tc"]), mk("Sub", [pre + "tc", pre + "logS"], [picked])]
    bwd = []
    if training:
        acc = None
        for k, (a, b) in enumerate(chunks):
            c = f"{pre}b{k}."
            bwd += sub(row_range(lay, a, b, c + "w", c + "rows"))
            bwd += [mk("Gemm", [x, c + "w"], [c + "z"], transB=1), mk("Sub", [c + "z", pre + "M"], [c + "zm"]),
                    mk("Sub", [c + "zm", pre + "logS"], [c + "zc"]), mk("Exp", [c + "zc"], [c + "p"]), mk("MatMul", [c + "p", c + "w"], [c + "a"])]
            if acc is not None:
                bwd.append(mk("Add", [acc, c + "a"], [c + "acc"]))
            acc = c + "acc" if acc is not None else c + "a"
        bwd += [mk("Sub", [pre + "w_y", acc], [pre + "dw"]), mk("Mul", [grad_picked, pre + "dw"], [grad_x])]
    out = []
    for n in nodes:
        if n is pick:
            out += fwd
        elif training and grad_x in n.output:
            if list(n.output) != [grad_x]:
                return nodes, {}, None
            out += bwd
        else:
            out.append(n)
    return out, consts, {"head": lay.name, "vocab": lay.out, "chunk_rows": rows, "chunks": len(chunks)}


def prune_dead(nodes: list, outputs: list[str]) -> list:
    """The nodes the outputs need, in order."""
    needed, kept = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
    return kept[::-1]


def chunk_head_logits(model, layouts: dict) -> dict | None:
    """The inference graph's head, chunk by chunk (in place): logits = Concat_c(h @ W_c^T) over the
    last axis, each chunk rebuilt from its codes and dropped, so generating a token never holds the
    head in fp32. Returns what was done, or None when the graph has no such head."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output if o}
    for mm in nodes:
        lay = _head(mm, producer, layouts)
        if lay is None or lay.out < max(lay.cols, 2 * chunk_rows(lay.out, lay.cols)):  # a head, and worth chunking
            continue
        rows = chunk_rows(lay.out, lay.cols)
        new, consts, parts = [], {}, []
        for k, a in enumerate(range(0, lay.out, rows)):
            c = f"head::{k}."
            n, cs = row_range(lay, a, min(lay.out, a + rows), c + "w", c + "rows")
            new += n + [helper.make_node("Transpose", [c + "w"], [c + "wt"], perm=[1, 0]), helper.make_node("MatMul", [mm.input[0], c + "wt"], [c + "z"])]
            consts.update(cs)
            parts.append(c + "z")
        new.append(helper.make_node("Concat", parts, [mm.output[0]], axis=-1))
        i = nodes.index(mm)
        kept = prune_dead(nodes[:i] + new + nodes[i + 1 :], [o.name for o in graph.output])
        read = {x for n in kept for x in n.input}
        inits = [t for t in graph.initializer if t.name in read] + [numpy_helper.from_array(v, k) for k, v in consts.items()]
        del graph.node[:], graph.initializer[:]
        graph.node.extend(kept)
        graph.initializer.extend(inits)
        return {"head": lay.name, "vocab": lay.out, "chunk_rows": rows, "chunks": len(parts)}
    return None
