"""`edgeft export` on tiny models: real ONNX Runtime training artifacts, real validation."""

import json
import shutil

import pytest

from conftest import run, target

def test_classify_bundle_is_complete_verified_and_matches_torch(tmp_path, cls_run):
    from edgeft.bundle import BundleError, verify_bundle

    out = tmp_path / "bundle"
    r = run("export", "--run", cls_run, "--target", target(tmp_path), "--out", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "inference_model.onnx", "base.safetensors",
              "manifest.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer/tokenizer.json.gz"):
        assert (out / f).is_file(), f
    p = s["parity"]
    assert p["logits_rel"] < 1e-5 and p["grad_rel"] < 1e-5 and p["loss_rel"] < 1e-6 and p["step_max_abs"] < 1e-6
    assert p["portable_grad_rel"] < 1e-5 and p["portable_loss_rel"] < 1e-6 and p["portable_step_rel"] < 1e-4
    assert_standard_ops(out)
    manifest = verify_bundle(out)
    assert manifest.labels == ["neg", "pos"] and manifest.scheme == "int4-g32" and manifest.task == "classify"
    assert manifest.base.name == "tiny-bert" and "source" not in manifest.target  # by name + fingerprint; no path
    assert all(v.startswith("base_model.model.") and ".default." not in v for v in manifest.trainable.values())
    assert "tokenizer/tokenizer.json.gz" in manifest.tokenizer and manifest.files["tokenizer/tokenizer.json.gz"]["sha256"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter/adapter_model.safetensors"), "np") as f:
        assert set(manifest.trainable.values()) == set(f.keys())  # every trainable tensor maps to a PEFT key
    import onnx

    for f in ("training_model.onnx", "eval_model.onnx", "inference_model.onnx", "optimizer_model.onnx"):
        m = onnx.load(str(out / f), load_external_data=False)
        assert m.ir_version <= 10 and all(o.version <= 21 for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert_base_stored_once(out, manifest)
    # tampering is caught, by file name
    for name in ("checkpoint", "base.safetensors"):
        data = bytearray((out / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (out / name).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=name):
            verify_bundle(out)
        data[len(data) // 2] ^= 0xFF
        (out / name).write_bytes(bytes(data))


def assert_base_stored_once(bundle, manifest):
    """Every graph takes the frozen base as inputs, from base.safetensors; no graph and no checkpoint
    holds a copy, nor a copy of the trainable tensors (the adapter holds those)."""
    import onnx
    from safetensors import safe_open

    assert manifest.frozen == "base.safetensors" and "base.safetensors" in manifest.files
    with safe_open(str(bundle / "base.safetensors"), "np") as f:
        frozen = set(f.keys())
    assert any(k.endswith("::q.codes") for k in frozen) and not frozen & set(manifest.trainable)
    graphs = {"training_model.onnx", "eval_model.onnx", "inference_model.onnx", manifest.portable["train_step"], manifest.portable["eval_step"]}
    for f in sorted(graphs) + (["portable/rebuild.onnx"] if (bundle / "portable/rebuild.onnx").exists() else []):
        g = onnx.load(str(bundle / f)).graph
        inits = {i.name: i for i in g.initializer}
        assert not inits.keys() & (frozen | set(manifest.trainable)), f
        assert sum(len(i.raw_data) for i in inits.values()) < 64 * 1024, f  # the rebuilding subgraphs' small constants only
        assert frozen & {i.name for i in g.input}, f
    assert (bundle / "checkpoint").stat().st_size < 64 * 1024  # ORT's nominal checkpoint: names and shapes


@pytest.mark.parametrize("scheme,hold", [("int3-g32", False), ("nf4", False), ("nf4", True)])
def test_causal_bundle_matches_torch(tmp_path, lm_run, scheme, hold, monkeypatch):
    if not hold:  # the tiny model's base is small enough to hold; make it rebuild as a large one does
        monkeypatch.setattr("edgeft.plan.HOLD_BASE_MIB", 0)
        monkeypatch.setattr("edgeft.workstation.vocab_chunks.MIN_ROWS", 64)  # the 300-word head in 5 chunks
        monkeypatch.setattr("edgeft.workstation.vocab_chunks.CHUNK_BYTES", 64 * 64 * 4)
    r = run("export", "--run", lm_run, "--target", target(tmp_path, scheme), "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    p = out["parity"]
    assert p["logits_rel"] < 1e-5 and p["grad_rel"] < 1e-5 and p["step_max_abs"] < 1e-6
    assert p["portable_grad_rel"] < 1e-5 and p["portable_loss_rel"] < 1e-6 and p["portable_step_rel"] < 1e-4
    assert p["portable_eval_loss_rel"] < 1e-6
    assert out["memory_plan"]["holds_base"] is hold
    assert_standard_ops(tmp_path / "b")
    assert_backward_recomputes(tmp_path / "b", hold)
    assert_vocab_chunked(tmp_path / "b", chunks=None if hold else 5)


def assert_vocab_chunked(bundle, chunks):
    """A large base's steps never hold the head, or the (N, V) log-probabilities, whole."""
    import onnx

    portable = json.loads((bundle / "manifest.json").read_text())["portable"]
    assert (portable.get("vocab_chunks") or {}).get("chunks") == chunks
    for f in (portable["train_step"], portable["eval_step"]):
        ops = [n.op_type for n in onnx.load(str(bundle / f)).graph.node]
        assert ("LogSoftmax" in ops) is (chunks is None), f
        assert ops.count("Gemm") >= (2 * chunks if chunks and f.endswith("train_step.onnx") else chunks or 0), f
    inference = onnx.load(str(bundle / "inference_model.onnx")).graph  # the head chunk by chunk, logits concatenated
    concat = [n for n in inference.node if n.op_type == "Concat" and len(n.input) == chunks]
    assert bool(concat) is (chunks is not None)
    # a large base's inference graph rebuilds each weight once its layer's input exists (Where(c, x, x) gates)
    gates = [n for n in inference.node if n.op_type == "Where" and n.input[1] == n.input[2]]
    assert bool(gates) is (chunks is not None)


def assert_backward_recomputes(bundle, holds_base: bool):
    """A held base is rebuilt once per session by rebuild.onnx and fed to the step; otherwise the
    backward pass rebuilds the fp32 weights and SiLU(gate) itself instead of reading the forward's."""
    import onnx
    from safetensors.numpy import load_file

    graph = onnx.load(str(bundle / "portable" / "train_step.onnx")).graph
    frozen = set(load_file(str(bundle / "base.safetensors")))
    producer = {o: n for n in graph.node for o in n.output}
    forward, todo = set(), ["loss"]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in forward:
            forward.add(id(n))
            todo.extend(n.input)
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    base = set(frozen)
    for n in graph.node:
        if id(n) in forward and any(i in base for i in n.input) and all(i in base or i in constants for i in n.input if i):
            base.update(n.output)
    sigmoid = {o for n in graph.node if id(n) in forward and n.op_type == "Sigmoid" for o in n.output}
    silu = {o for n in graph.node if id(n) in forward and n.op_type == "Mul" and sigmoid & set(n.input) for o in n.output}
    read = {i for n in graph.node if id(n) not in forward for i in n.input}
    assert silu and bool(read & silu) is holds_base
    rebuild = bundle / "portable" / "rebuild.onnx"
    assert rebuild.exists() is holds_base
    if holds_base:
        assert not any(n.op_type == "DequantizeLinear" for n in graph.node)
        trainable = set(json.loads((bundle / "manifest.json").read_text())["trainable"])
        fed = {i.name for i in graph.input} - frozen - trainable - {"input_ids", "attention_mask", "labels"}
        assert fed and fed <= {o.name for o in onnx.load(str(rebuild)).graph.output}
    else:
        assert not read & (base - frozen)


def assert_standard_ops(bundle):
    """The portable step runs on any ONNX Runtime: only ops of the ONNX standard, at opset 17."""
    import onnx

    entry = json.loads((bundle / "manifest.json").read_text())["portable"]
    for f in (entry["train_step"], entry["eval_step"], entry["optimizer"]):  # eval_step may be ORT's eval_model.onnx itself
        m = onnx.load(str(bundle / f))
        assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
        assert all(n.domain == "" and onnx.defs.has(n.op_type, "") for n in m.graph.node), f


def test_any_peft_adapter_with_a_base_folder(tmp_path, cls_run, tiny_bert):
    adapter = tmp_path / "peft"
    shutil.copytree(cls_run / "adapter", adapter)
    (adapter / "edgeft.json").unlink()  # as if another tool made it
    r = run("export", "--adapter", adapter, "--model", tiny_bert, "--labels", "neg,pos", "--target", target(tmp_path), "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output


def test_bad_inputs_leave_nothing(tmp_path, cls_run, tiny_bert):
    out = tmp_path / "b"
    (tmp_path / "empty").mkdir()
    r = run("export", "--run", tmp_path / "empty", "--target", target(tmp_path), "--out", out)
    assert r.exit_code == 4 and "no PEFT adapter" in r.output
    r = run("export", "--run", cls_run, "--target", "toaster", "--out", out)
    assert r.exit_code == 5
    r = run("export", "--run", cls_run, "--target", target(tmp_path), "--out", tmp_path / "missing" / "b")
    assert r.exit_code == 6 and "not writable" in r.output
    r = run("export", "--run", cls_run, "--target", target(tmp_path, budget=64), "--out", out)
    assert r.exit_code == 9 and "budget" in r.output and "--force" in r.output
    broken = tmp_path / "broken"
    shutil.copytree(cls_run, broken)
    f = broken / "adapter/adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run("export", "--run", broken, "--target", target(tmp_path), "--out", out)
    assert r.exit_code == 4 and "corrupt" in r.output
    assert not out.exists() and not list(tmp_path.glob(".b.*"))
    out.mkdir()
    r = run("export", "--run", cls_run, "--target", target(tmp_path), "--out", out)
    assert r.exit_code == 6 and "already exists" in r.output


def test_plan_refuses_then_force_warns(tmp_path, cls_run):
    r = run("plan", "--run", cls_run, "--target", target(tmp_path, budget=64), "--json")
    assert r.exit_code == 9 and json.loads(r.stdout)["fits"] is False
    r = run("export", "--run", cls_run, "--target", target(tmp_path, budget=64), "--out", tmp_path / "b", "--force")
    assert r.exit_code == 0 and "warning" in r.output


def test_a_step_measured_over_the_budget_is_refused_and_leaves_nothing(tmp_path, cls_run, monkeypatch):
    """The plan's formula fits; the step export measures (edgeft.device.step_probe) does not: exit 9 naming
    the budget, no bundle. The measurement is recorded where it passes."""
    from edgeft.device import step_probe

    r = run("export", "--run", cls_run, "--target", target(tmp_path), "--out", tmp_path / "ok", "--json")
    assert r.exception is None and r.exit_code == 0, r.output
    measured = json.loads(r.stdout)["memory_plan"]["measured_step_mib"]
    assert measured["fast"] > 0 and measured["lean"] > 0
    monkeypatch.setattr(step_probe, "measure_step", lambda bundle: {"fast": 1e5, "lean": 1e5})
    r = run("export", "--run", cls_run, "--target", target(tmp_path), "--out", tmp_path / "b")
    assert r.exit_code == 9 and "budget" in r.output and "measured" in r.output, r.output
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))  # nor atomic_dir's work folder


def test_preflight_names_the_op_and_layer():
    from onnx import TensorProto, helper

    from edgeft.workstation.preflight import ExportError, preflight

    nodes = [helper.make_node("MatMul", ["x", "lora"], ["h"], name="/model/layers.3/q_proj/MatMul"),
             helper.make_node("CastLike", ["h", "x"], ["c"], name="/model/layers.3/CastLike"),
             helper.make_node("ReduceSum", ["c"], ["loss"], name="sum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                              [helper.make_tensor("lora", TensorProto.FLOAT, [2, 2], [0.0] * 4)])
    with pytest.raises(ExportError, match=r"CastLike at /model/layers.3/CastLike \(layer 3\)"):
        preflight(helper.make_model(graph), ["lora"])
    preflight(helper.make_model(graph), ["x_unrelated"])  # no trainable upstream: nothing to report


def test_weights_hidden_from_shape_inference_change_nothing(tmp_path, tiny_llama):
    """export_graph keeps the weights' values from the exporter's shape inference (its cost grows with
    the model): the graph must be the one the exporter writes with them, node for node."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.workstation import export_graphs

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.set_attn_implementation("eager")
    model.requires_grad_(False)
    ids = torch.randint(0, 200, (2, 8))
    args, names = (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"]
    export_graphs.export_graph(Logits(model), args, tmp_path / "a.onnx", names, ["logits"], {}, training=True)
    torch.onnx.export(Logits(model), args, str(tmp_path / "b.onnx"), dynamo=False, opset_version=export_graphs.OPSET, do_constant_folding=False,
                      export_params=False, training=torch.onnx.TrainingMode.TRAINING, input_names=names, output_names=["logits"])
    a, b = onnx.load(str(tmp_path / "a.onnx")).graph, onnx.load(str(tmp_path / "b.onnx")).graph
    assert list(a.node) == list(b.node) and list(a.input) == list(b.input) and list(a.output) == list(b.output)
    assert list(a.value_info) == list(b.value_info) and len(a.node) > 50
