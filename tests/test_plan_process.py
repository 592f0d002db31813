"""The whole device process's memory plan (edgeft.plan.plan_process) and the promotion check
(edgeft/device/check.py): a bounded seeded sample, the training engine's eval step for a causal LM,
one inference session for a classifier; refused over the budget unless --force."""

import json
import shutil

import numpy as np
import pytest

from conftest import device, write_jsonl

POS = ["i loved it", "great result", "so happy today", "what a great movie"]
NEG = ["terrible day", "sad movie", "i hate this", "awful and sad"]


def cls_rows(n=6, tag=""):
    return [{"text": f"{t}{tag}", "label": "pos"} for t in POS * n] + [{"text": f"{t}{tag}", "label": "neg"} for t in NEG * n]


def test_sample_rows_is_bounded_seeded_and_keeps_order():
    from edgeft.device.check import sample_rows

    rows = list(range(300))
    a = sample_rows(rows, 40, "reference", 0)
    assert len(a) == 40 and a == sorted(a) and a == sample_rows(rows, 40, "reference", 0)
    assert a != sample_rows(rows, 40, "reference", 1) and a != sample_rows(rows, 40, "earlier", 0)
    assert sample_rows(rows[:10], 40, "reference", 0) == rows[:10] and sample_rows(rows, None, "x", 0) == rows


def test_the_default_check_follows_the_generations_size():
    from edgeft.device.check import CHECK_ROWS, MIN_CHECK_ROWS, auto_check_rows

    assert auto_check_rows(None) == CHECK_ROWS == 128 and MIN_CHECK_ROWS == 16
    assert [auto_check_rows(n) for n in (4, 48, 96, 120, 200, 383, 384, 1200, 10**6)] == [16, 16, 32, 32, 64, 64, 128, 128, 128]


def test_eval_step_check_equals_the_inference_graph_on_a_causal_lm(tmp_path, lm_bundle, chat_rows):
    """The check on the training engine's eval step gives the inference graph's metrics (the token-weighted
    mean over batches is the mean over all labelled tokens), for both adapters."""
    from edgeft.bundle import verify_bundle
    from edgeft.device.backends import PortableBackend
    from edgeft.device.check import PromotionCheck
    from edgeft.device.data import encode_rows
    from edgeft.device.tokenizer import DeviceTokenizer
    from safetensors.numpy import load_file

    m = verify_bundle(lm_bundle)
    tok = DeviceTokenizer(lm_bundle / "tokenizer")

    class Owner:
        bundle, manifest, task, tokenizer = lm_bundle, m, m.task, tok
        held_set = encode_rows(chat_rows, m.task, tok, [], m.train_shape.seq, warn=lambda _: None)
        check_sets = {"reference": held_set[:5]}

    peft = load_file(str(lm_bundle / "adapter" / "adapter_model.safetensors"))
    old = {n: peft[k] for n, k in m.trainable.items()}
    rng = np.random.default_rng(0)
    new = {n: v + rng.standard_normal(v.shape).astype(np.float32) * 0.05 for n, v in old.items()}
    engine = PortableBackend(lm_bundle, m)
    fast, _ = PromotionCheck(Owner, 100, 0, engine=engine).compare(old, new)
    slow, _ = PromotionCheck(Owner, 100, 0, engine=None).compare(old, new)
    for side in ("baseline", "candidate"):
        for split in ("heldout", "reference"):
            a, b = fast[side][split], slow[side][split]
            assert a["rows"] == b["rows"] and a["tokens"] == b["tokens"] > 0
            assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-4 * b["eval_loss"], (side, split, a, b)
    assert fast["candidate"]["heldout"]["eval_loss"] != fast["baseline"]["heldout"]["eval_loss"]  # the weights were swapped


def test_a_classifier_is_checked_in_one_inference_session(tmp_path, cls_bundle, monkeypatch):
    from edgeft.device import infer
    from edgeft.device.trainer import DeviceTrainConfig, DeviceTrainer

    built = []
    real = infer.inference_session
    monkeypatch.setattr(infer, "inference_session", lambda *a, **k: built.append(1) or real(*a, **k))
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows())
    held = write_jsonl(tmp_path / "held.jsonl", cls_rows(40, " held"))  # 320 rows: more than --check-rows
    cfg = DeviceTrainConfig(data=str(data), eval_data=str(held), max_steps=2, check_rows=50, tolerance=1)
    DeviceTrainer(cls_bundle, tmp_path / "api-state", cfg, log=lambda _: None, progress=False).run()
    assert len(built) == 1  # one session, the two adapters' weights swapped in it
    r, s = device("train", "--bundle", cls_bundle, "--state", tmp_path / "state", "--data", data, "--eval-data", held,
                  "--max-steps", 2, "--check-rows", 50, "--tolerance", 1, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert s["check"]["drawn"] == {"heldout": 50} and s["check"]["of"] == {"heldout": 320} and s["check"]["rows_per_set"] == 50
    assert s["metrics"]["baseline"]["heldout"]["rows"] == s["metrics"]["candidate"]["heldout"]["rows"] == 50
    st = json.loads((tmp_path / "state" / "state.json").read_text())
    assert st["generations"][-1]["check"]["drawn"] == {"heldout": 50}  # recorded with the generation
    r, _ = device("train", "--bundle", cls_bundle, "--state", tmp_path / "s2", "--data", data, "--check-rows", 0, "--quiet")
    assert r.exit_code == 2 and "--check-rows" in r.output


def test_a_process_over_its_budget_is_refused_unless_forced(tmp_path, lm_bundle, chat_rows):
    """The step fits, the whole process does not: refused (exit 9) before any state is made; --force runs it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(lm_bundle, bundle)
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    plan = manifest["memory_plan"]
    plan["budget_mib"] = int(plan["total_mib"]) + 1  # the step alone fits; with the rows it does not
    path.write_text(json.dumps(manifest))
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows)
    state = tmp_path / "state"
    r, _ = device("train", "--bundle", bundle, "--state", state, "--data", data, "--max-steps", 2, "--quiet")
    assert r.exit_code == 9 and "budget" in r.output and "rows" in r.output and "--force" in r.output, r.output
    assert not state.exists()
    r, s = device("train", "--bundle", bundle, "--state", state, "--data", data, "--max-steps", 2, "--force", "--json", "--quiet")
    assert r.exit_code == 0 and not s["plan"]["fits"], r.output
    r, _ = device("eval", "--bundle", bundle, "--state", state, "--data", data)
    assert r.exit_code == 9 and "device eval" in r.output, r.output
    r, e = device("eval", "--bundle", bundle, "--state", state, "--data", data, "--force", "--json")
    assert r.exit_code == 0 and e["peak_rss_mib"] > 0 and e["plan_mib"] == e["plan"]["total_mib"], r.output


def test_device_eval_reports_its_peak_beside_its_plan(lm_bundle, tmp_path, chat_rows):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows)
    r, e = device("eval", "--bundle", lm_bundle, "--state", tmp_path / "state", "--data", data, "--json")
    assert r.exit_code == 0, r.output
    assert e["plan"]["command"] == "device eval" and e["plan"]["fits"] and e["peak_rss_mib"] > 0
    r = device("eval", "--bundle", lm_bundle, "--state", tmp_path / "state", "--data", data)[0]
    assert "peak RSS" in r.output and "plan" in r.output


@pytest.mark.parametrize("kind", ["classify", "causal-lm"])
def test_the_parents_check_results_are_reused(tmp_path, kind, cls_run, lm_run, chat_rows):
    """Generation 2's baseline is generation 1: on the bundle's reference rows (the same sample) its
    metrics (and, for a classifier, which rows it got right) come from generation 1's check."""
    from conftest import run as cli, target

    if kind == "classify":
        src, ref_rows, scheme = cls_run, cls_rows(3, " ref"), "int4-g32"
        data = [cls_rows(2, " a"), cls_rows(2, " b")]
    else:
        src, scheme = lm_run, "int3-g32"
        ref_rows = [{"prompt": f"question {i}?", "completion": f" answer {i}"} for i in range(12)]
        data = [chat_rows, chat_rows[::-1]]
    ref = write_jsonl(tmp_path / "ref.jsonl", ref_rows)
    r = cli("export", "--run", src, "--target", target(tmp_path, scheme), "--out", tmp_path / "bundle", "--reference-data", ref)
    assert r.exit_code == 0, r.output
    state, out = tmp_path / "state", []
    for i, rows in enumerate(data):
        r, s = device("train", "--bundle", tmp_path / "bundle", "--state", state, "--data", write_jsonl(tmp_path / f"{i}.jsonl", rows),
                      "--max-steps", 2, "--tolerance", 1, "--json", "--quiet")
        assert r.exit_code == 0 and s["promoted"], r.output
        out.append(s)
    first, second = out
    assert first["check"]["baseline_reused"] == [] and second["check"]["baseline_reused"] == ["reference"]
    assert second["check"]["fingerprints"]["reference"] == first["check"]["fingerprints"]["reference"]
    assert second["metrics"]["baseline"]["reference"] == first["metrics"]["candidate"]["reference"]
    if kind == "classify":
        assert second["check"]["correct"]["baseline"]["reference"] == first["check"]["correct"]["candidate"]["reference"]
    # the same check recomputed from scratch agrees with what was reused
    from edgeft.device.trainer import DeviceTrainConfig, DeviceTrainer

    t = DeviceTrainer(tmp_path / "bundle", state, DeviceTrainConfig(data=str(tmp_path / "1.jsonl")), log=lambda _: None, progress=False)
    t.prepare_data()
    if kind == "causal-lm":
        from edgeft.device.backends import PortableBackend

        t.check_engine = PortableBackend(t.bundle, t.manifest)
    fresh, _ = t.compare(t.state.params(1), t.state.params(2))
    a, b = fresh["baseline"]["reference"], second["metrics"]["baseline"]["reference"]
    assert a["rows"] == b["rows"] and abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 * abs(b["eval_loss"])


def _header_only_safetensors(path, tensors: dict) -> None:
    """A safetensors file whose header names `tensors` (name -> shape): what plan_memory reads."""
    import struct

    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text)


def test_a_large_vocabulary_is_never_planned_whole(tmp_path):
    """Qwen2.5-0.5B's shape: the step plans a head chunk and a layer weight, not the 152k x 896 head in fp32."""
    from edgeft.plan import MIB, plan_memory
    from edgeft.targets import load_target

    vocab, hidden, inter = 151936, 896, 4864
    model, adapter = tmp_path / "m", tmp_path / "a"
    model.mkdir(), adapter.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
                                                   "num_hidden_layers": 24, "num_attention_heads": 14}))
    _header_only_safetensors(model / "model.safetensors", {"embed": (vocab, hidden), "head": (vocab, hidden), "layers": (24 * 12, hidden, hidden)})
    _header_only_safetensors(adapter / "adapter_model.safetensors", {"lora": (1000, 16)})
    target = load_target("raspberry-pi-4-4gb")
    chunked = plan_memory(model, adapter, target, "causal-lm", 2, 128)
    whole = plan_memory(model, adapter, target, "causal-lm", 2, 128, vocab_chunked=False)
    head_mib = vocab * hidden * 4 / MIB
    assert chunked.vocab_chunk_rows == 8192 and whole.vocab_chunk_rows == 0
    assert chunked.base_rebuilt_mib == round(2 * 8192 * hidden * 4 / MIB, 1) and whole.base_rebuilt_mib > 2 * head_mib - 1
    assert chunked.activations_mib < whole.activations_mib - 2 * 128 * vocab * 4 / MIB
    assert chunked.total_mib < whole.total_mib - head_mib


def test_lean_is_chosen_when_the_arena_would_not_fit(tmp_path, lm_bundle, chat_rows, monkeypatch):
    """A large base's plan counts the arena's high-water mark; when that is what puts the process over its
    budget, device train runs without the arena (runtime.lean_memory) and plans so: same step, same losses.
    The tokenizer is dropped once the rows are encoded (not counted in the plan)."""
    from edgeft.bundle import read_manifest
    from edgeft.device import runtime
    from edgeft.device.tokenizer import PadOnly
    from edgeft.device.trainer import DeviceTrainConfig, DeviceTrainer
    from edgeft.plan import plan_process

    monkeypatch.setattr(runtime, "_MODE", "fast")
    monkeypatch.delenv("EDGEFT_MEMORY", raising=False)
    bundle = tmp_path / "bundle"
    shutil.copytree(lm_bundle, bundle)
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["memory_plan"]["arena_mib"] = 500.0  # as if it were a large base
    manifest["memory_plan"]["measured_step_mib"] = None  # the formula alone (a bundle exported before the measurement)
    path.write_text(json.dumps(manifest))
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows)
    lean = plan_process(read_manifest(bundle), bundle, "device train", 0, "lean")
    fast = plan_process(read_manifest(bundle), bundle, "device train", 0, "fast")
    assert fast.total_mib == lean.total_mib + 500 and "tokenizer" not in " ".join(lean.parts)
    manifest["memory_plan"]["budget_mib"] = int(lean.total_mib) + 20  # rows: a few KiB, planned at 8 MiB at least
    path.write_text(json.dumps(manifest))

    r, s = device("train", "--bundle", bundle, "--state", tmp_path / "lean", "--data", data, "--max-steps", 2, "--json", "--quiet")
    assert r.exit_code == 0 and s["plan"]["memory"] == "lean" and s["plan"]["fits"], r.output
    assert runtime.lean_memory()
    monkeypatch.setenv("EDGEFT_MEMORY", "fast")  # asked for: planned with the arena, over the budget
    cfg = DeviceTrainConfig(data=str(data), max_steps=2, force=True)
    trainer = DeviceTrainer(bundle, tmp_path / "fast", cfg, log=lambda _: None, progress=False)
    out = trainer.run()
    assert out["plan"]["memory"] == "fast" and not out["plan"]["fits"] and not runtime.lean_memory()
    assert out["losses"] == s["losses"] and isinstance(trainer.tokenizer, PadOnly)


def test_export_accepts_a_step_that_fits_only_lean():
    """`edgeft export`'s check: a step over the budget only by the arena's high-water mark passes with a note
    (device train will run lean); one over it even without the arena is refused unless forced."""
    from edgeft.errors import PlanError
    from edgeft.plan import MemoryPlan, check_plan

    def plan(budget):
        return MemoryPlan(target="t", budget_mib=budget, base_packed_mib=84, base_rebuilt_mib=36, trainable_mib=7, activations_mib=77,
                          runtime_mib=160, total_mib=408, batch=1, seq=64, arena_mib=44)
    notes = []
    check_plan(plan(400), False, notes.append)
    assert plan(400).to_dict()["fits_lean"] and not plan(400).fits and "lean" in notes[0] and "lean" in plan(400).render()
    with pytest.raises(PlanError):
        check_plan(plan(360), False, notes.append)
    assert not plan(360).fits_lean and "does NOT fit" in plan(360).render()


def test_a_step_measured_above_its_formula_is_planned_as_measured(lm_bundle):
    """Export measures the step (edgeft.device.step_probe) in both allocator modes; the plans count the
    larger of the formula and the measurement, for the step's own plan and the whole process's."""
    from edgeft.bundle import read_manifest
    from edgeft.plan import MemoryPlan, plan_process

    step = read_manifest(lm_bundle).memory_plan
    assert set(step["measured_step_mib"]) == {"fast", "lean"} and step["measured_step_mib"]["fast"] > 0  # this export measured it
    plan = MemoryPlan(target="t", budget_mib=1000, base_packed_mib=84, base_rebuilt_mib=36, trainable_mib=7, activations_mib=77,
                      runtime_mib=160, total_mib=408, batch=1, seq=64, arena_mib=44)
    assert plan.with_measured({"fast": 100.0, "lean": 90.0}).total_mib == 408  # under the formula: the formula stands
    hot = plan.with_measured({"fast": 657.0, "lean": 600.0})  # Gemma-3-like: twice the formula
    assert hot.total_mib == 408 - 157 + 657 and hot.lean_total_mib == 251 + 600 and hot.fits
    assert "step measured at export" in hot.render() and not replace_budget(hot, 800).fits and not replace_budget(hot, 800).fits_lean
    assert replace_budget(hot, 860).fits_lean

    class Manifest:
        task, max_seq_len, memory_plan = "causal-lm", 64, {**hot.to_dict(), "measured_step_mib": {"fast": 657.0, "lean": 600.0}}
    fast = plan_process(Manifest, lm_bundle, "device train", 0, "fast")
    lean = plan_process(Manifest, lm_bundle, "device train", 0, "lean")
    assert fast.parts["training step (1 x 64): weights + activations"] == 657 and fast.total_mib - lean.total_mib == 57


def replace_budget(plan, budget):
    from dataclasses import replace

    return replace(plan, budget_mib=budget)


def test_device_eval_keeps_a_causal_lms_logits_bounded():
    """One row at a time where a batch's (B, S, V) logits would pass INFER_LOGITS_BYTES; a classifier's are tiny."""
    from edgeft.plan import inference_batch

    assert inference_batch("causal-lm", 4, 256, 49152) == 1  # SmolLM2: 48 MiB a row
    assert inference_batch("causal-lm", 8, 64, 49152) == 5  # 64 MiB // 12 MiB a row
    assert inference_batch("causal-lm", 4, 64, 49152) == 4  # never more than the training batch
    assert inference_batch("causal-lm", 4, 128, 262144) == 1  # Gemma-3: 128 MiB a row, still one
    assert inference_batch("classify", 4, 128, 3) == 16


def test_evaluation_order_changes_no_metric_and_no_rows_verdict(tmp_path, cls_bundle):
    """Rows run longest first; the loss and each row's right/wrong come back as if in file order."""
    from edgeft.device.learner import Learner

    learner = Learner(cls_bundle, tmp_path / "state")
    texts = ["sad", "i loved it so much today", "great", "terrible day and a sad movie too", "awful", "what a great movie"]
    said = [p["label"] for p in learner.predict(texts)]
    other = {"pos": "neg", "neg": "pos"}
    wrong = [False, True, True, False, True, False]  # rows of every length, right and wrong
    rows = [{"text": t, "label": other[y] if w else y} for t, y, w in zip(texts, said, wrong)]
    from edgeft.device.data import encode_rows

    m = learner.manifest
    encoded = encode_rows(rows, m.task, learner.tokenizer, m.labels, m.max_seq_len, where="rows", warn=lambda _: None)
    model = learner.model()
    out = model.evaluate(encoded, per_row=True)
    assert out["correct"] == [not w for w in wrong]
    back = model.evaluate(encoded[::-1], per_row=True)
    assert back["correct"] == out["correct"][::-1] and abs(back["eval_loss"] - out["eval_loss"]) < 1e-9
