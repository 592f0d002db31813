"""`edgeft device` on tiny exported bundles: real ONNX Runtime training, real files, real kills."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import device, run, write_jsonl

POS = ["i loved it", "great result", "so happy today", "what a great movie"]
NEG = ["terrible day", "sad movie", "i hate this", "awful and sad"]


def cls_rows(n=6, flip=False):
    rows = [{"text": t, "label": "pos"} for t in POS * n] + [{"text": t, "label": "neg"} for t in NEG * n]
    if flip:
        rows = [{**r, "label": "neg" if r["label"] == "pos" else "pos"} for r in rows]
    return rows


def state_json(state):
    p = state / "state.json"
    return p.read_text() if p.exists() else None


def test_train_promotes_a_generation_and_status_lists_it(tmp_path, cls_bundle):
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows())
    held = write_jsonl(tmp_path / "held.jsonl", cls_rows(1))
    state = tmp_path / "state"
    # --tolerance 1: no accuracy can drop by more than 1, so the outcome is known: promoted
    r, s = device("train", "--bundle", cls_bundle, "--state", state, "--data", data, "--eval-data", held, "--max-steps", 6,
                  "--checkpoint-every", 2, "--tolerance", 1, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert s["generation"] == 1 and s["steps"] == 6 and s["resumed_at_step"] is None
    manifest = json.loads((cls_bundle / "manifest.json").read_text())
    assert not manifest.get("reference")  # cls_run trained without --eval-data: the bundle carries no reference rows
    assert set(s["metrics"]["candidate"]) == {"heldout"}  # and a first generation has no replay rows
    # the plan covers the whole process: the bundle's step plan plus the check, the tokenizer and the rows
    assert s["peak_rss_mib"] > 0 and s["plan"]["step_mib"] == round(manifest["memory_plan"]["total_mib"], 1)
    assert s["plan_mib"] == s["plan"]["total_mib"] > s["plan"]["step_mib"] and s["plan"]["fits"]
    assert s["check"]["drawn"] == {"heldout": len(cls_rows(1))} and s["check_seconds"] >= 0
    assert s["promoted"] and s["reason"] == "no regression on heldout"
    assert not (state / "job").exists()  # the finished job leaves nothing behind
    r, st = device("status", "--bundle", cls_bundle, "--state", state, "--json")
    assert r.exit_code == 0, r.output
    gens = st["generations"]
    assert [g["id"] for g in gens] == [0, 1] and gens[1]["data"]["rows"] == len(cls_rows()) and gens[1]["data"]["sha256"]
    assert st["current"] == 1
    # rollback to the bundle's adapter and forward again
    r, rb = device("rollback", "0", "--bundle", cls_bundle, "--state", state, "--json")
    assert r.exit_code == 0 and rb["current"] == 0
    r, _ = device("rollback", "7", "--bundle", cls_bundle, "--state", state)
    assert r.exit_code == 11 and "no generation 7" in r.output


def test_a_regressing_update_is_not_promoted(tmp_path, lm_bundle, chat_rows):
    """An update on junk answers makes held-out loss worse: it is refused and the good generation stays current."""
    state = tmp_path / "state"
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows)
    held = write_jsonl(tmp_path / "held.jsonl", chat_rows[:3])
    junk = write_jsonl(tmp_path / "junk.jsonl", [{"messages": [r["messages"][0], {"role": "assistant", "content": "numbers 9 8 7 6 5 4 3 2 1 0"}]}
                                                  for r in chat_rows])
    r, s = device("train", "--bundle", lm_bundle, "--state", state, "--data", good, "--eval-data", held, "--max-steps", 20, "--lr", "3e-3", "--json", "--quiet")
    assert r.exit_code == 0 and s["promoted"] and s["last_loss"] < s["first_loss"], r.output
    r, s = device("train", "--bundle", lm_bundle, "--state", state, "--data", junk, "--eval-data", held, "--max-steps", 20, "--lr", "1e-2", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert not s["promoted"] and "regressed" in s["reason"] and s["current"] == 1
    new, old = s["metrics"]["candidate"]["heldout"]["eval_loss"], s["metrics"]["baseline"]["heldout"]["eval_loss"]
    assert new > old * 1.01
    r, st = device("status", "--bundle", lm_bundle, "--state", state, "--json")
    assert [g["status"] for g in st["generations"]] == ["initial", "promoted", "rejected"] and st["current"] == 1
    r, text = device("status", "--bundle", lm_bundle, "--state", state)
    assert "rejected" in r.output and "junk.jsonl" in r.output


def test_nan_loss_stops_and_keeps_the_good_state(tmp_path, cls_bundle):
    state = tmp_path / "state"
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows())
    r, _ = device("train", "--bundle", cls_bundle, "--state", state, "--data", data, "--max-steps", 30, "--lr", "1e30", "--quiet")
    assert r.exit_code == 13, r.output
    assert "loss became" in r.output and "stays on generation 0" in r.output
    st = json.loads(state_json(state))
    assert st["current"] == 0 and st["generations"][-1]["status"] == "failed" and not (state / "job").exists()


def _device_cmd(bundle, state, data, *extra):
    return [sys.executable, "-m", "edgeft", "device", "train", "--bundle", str(bundle), "--state", str(state), "--data", str(data),
            "--max-steps", "16", "--checkpoint-every", "2", "--quiet", "--json", *extra]


def test_sigkill_mid_training_resumes_to_the_same_weights(tmp_path, cls_bundle):
    """Killed after a checkpoint, the rerun resumes there and ends bit-identical to an uninterrupted run."""
    from safetensors.numpy import load_file

    data = write_jsonl(tmp_path / "new.jsonl", cls_rows(8))
    clean = tmp_path / "clean"
    out = subprocess.run(_device_cmd(cls_bundle, clean, data), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_device_cmd(cls_bundle, killed, data), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = killed / "job" / "last.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(_device_cmd(cls_bundle, killed, data), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["resumed_at_step"] is not None and s["resumed_at_step"] >= 2 and s["resumed_at_step"] % 2 == 0
    a = load_file(str(clean / "generations" / "g0001.safetensors"))
    b = load_file(str(killed / "generations" / "g0001.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_both_engines_give_one_loss_curve_and_share_checkpoints(tmp_path, cls_bundle):
    """50 steps on the training build and on the portable step agree within 1e-4; a job killed on
    one engine resumes on the other from the same checkpoint."""
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows(8))
    curves = {}
    for backend in ("onnxruntime-training", "portable"):
        r, s = device("train", "--bundle", cls_bundle, "--state", tmp_path / backend, "--data", data, "--max-steps", 50,
                      "--backend", backend, "--quiet", "--json")
        assert r.exit_code == 0 and s["backend"] == backend, r.output
        curves[backend] = s["losses"]
    a, b = curves["onnxruntime-training"], curves["portable"]
    assert len(a) == len(b) == 50 and max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-4, (a, b)

    state = tmp_path / "switched"
    proc = subprocess.Popen(_device_cmd(cls_bundle, state, data, "--backend", "onnxruntime-training"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (state / "job" / "last.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(_device_cmd(cls_bundle, state, data, "--backend", "portable"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["backend"] == "portable" and s["resumed_at_step"] is not None and s["resumed_at_step"] >= 2


def test_interrupted_job_with_other_data_is_refused_until_restart(tmp_path, cls_bundle):
    state = tmp_path / "state"
    data = write_jsonl(tmp_path / "a.jsonl", cls_rows())
    other = write_jsonl(tmp_path / "b.jsonl", cls_rows(2))
    proc = subprocess.Popen(_device_cmd(cls_bundle, state, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (state / "job" / "last.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    r, _ = device("train", "--bundle", cls_bundle, "--state", state, "--data", other, "--max-steps", 4, "--quiet")
    assert r.exit_code == 11 and "interrupted" in r.output and "--restart" in r.output
    r, s = device("train", "--bundle", cls_bundle, "--state", state, "--data", other, "--max-steps", 4, "--quiet", "--restart", "--json")
    assert r.exit_code == 0 and s["generation"] == 1 and s["resumed_at_step"] is None, r.output


@pytest.mark.parametrize("content, code, words", [
    (b'{"text": "fine", "label": "pos"}\n{"text": "broken\n', 3, "line 2"),
    (b'{"text": "fine", "label": "pos"}\n{"text": "new class", "label": "meh"}\n', 3, "line 2: label 'meh'"),
    (b'{"text": "caf\xe9", "label": "pos"}\n', 3, "not UTF-8"),
    (b"", 3, ""),
])
def test_bad_data_is_named_and_changes_nothing(tmp_path, cls_bundle, content, code, words):
    state = tmp_path / "state"
    ok = write_jsonl(tmp_path / "ok.jsonl", cls_rows())
    r, _ = device("train", "--bundle", cls_bundle, "--state", state, "--data", ok, "--max-steps", 2, "--quiet")
    assert r.exit_code == 0, r.output
    before = state_json(state)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    r, _ = device("train", "--bundle", cls_bundle, "--state", state, "--data", bad, "--max-steps", 2, "--quiet")
    assert r.exit_code == code, r.output
    assert words in r.output and "Traceback" not in r.output
    assert state_json(state) == before and not (state / "job").exists()


def test_long_rows_truncate_with_a_warning_or_are_refused(tmp_path, cls_bundle):
    long = " ".join(["great"] * 200)
    data = write_jsonl(tmp_path / "long.jsonl", cls_rows() + [{"text": long, "label": "pos"}])
    r, _ = device("train", "--bundle", cls_bundle, "--state", tmp_path / "s1", "--data", data, "--max-steps", 2, "--quiet", "--refuse-long")
    assert r.exit_code == 3 and "longer than" in r.output and "row 49" in r.output
    r, _ = device("train", "--bundle", cls_bundle, "--state", tmp_path / "s2", "--data", data, "--max-steps", 2, "--quiet")
    assert r.exit_code == 0 and "truncated" in r.output


def test_tampered_bundle_and_wrong_runtime_are_refused(tmp_path, cls_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(cls_bundle, bundle, ignore=shutil.ignore_patterns("state"))
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows())
    with open(bundle / "eval_model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    r, _ = device("train", "--bundle", bundle, "--data", data, "--max-steps", 2, "--quiet")
    assert r.exit_code == 8 and "eval_model.onnx" in r.output
    shutil.rmtree(bundle)
    shutil.copytree(cls_bundle, bundle, ignore=shutil.ignore_patterns("state"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["onnxruntime"]["training"] = "1.18.0"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r, _ = device("train", "--bundle", bundle, "--data", data, "--max-steps", 2, "--quiet", "--backend", "onnxruntime-training")
    assert r.exit_code == 12 and "1.18.0" in r.output and "onnxruntime-training" in r.output
    assert not (bundle / "state" / "state.json").exists()
    r, s = device("train", "--bundle", bundle, "--data", data, "--max-steps", 2, "--quiet", "--json")  # auto needs no training build
    assert r.exit_code == 0 and s["backend"] == "portable", r.output


def test_full_disk_while_checkpointing_loses_nothing(tmp_path, cls_bundle):
    """A real write failure: the kernel refuses to grow a file past RLIMIT_FSIZE (EFBIG)."""
    state = tmp_path / "state"
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows())
    r, _ = device("train", "--bundle", cls_bundle, "--state", state, "--data", data, "--max-steps", 2, "--quiet")
    assert r.exit_code == 0
    before = state_json(state)
    # job.json fits, a checkpoint (parameters and two AdamW moments) does not
    limit = (state / "generations" / "g0001.safetensors").stat().st_size * 2
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from edgeft.cli import main; sys.argv = ['edgeft'] + sys.argv[1:]; main()")
    out = subprocess.run([sys.executable, "-c", code, *_device_cmd(cls_bundle, state, data)[3:]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 6, out.stderr
    assert "checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert state_json(state) == before
    assert not list((state / "job").glob(".*tmp"))  # no half-written file left
    out = subprocess.run(_device_cmd(cls_bundle, state, data), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_eval_predict_and_export_adapter_match_the_workstation(tmp_path, cls_bundle, tiny_bert):
    state = tmp_path / "state"
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows())
    r, s = device("train", "--bundle", cls_bundle, "--state", state, "--data", data, "--max-steps", 4, "--lr", "5e-3", "--tolerance", "1", "--json", "--quiet")
    assert r.exit_code == 0 and s["promoted"], r.output
    r, ev = device("eval", "--bundle", cls_bundle, "--state", state, "--data", data, "--json")
    assert r.exit_code == 0 and ev["generation"] == 1 and ev["rows"] == len(cls_rows()), r.output
    r, every = device("predict", "--bundle", cls_bundle, "--state", state, "--data", data, "--json")
    assert r.exit_code == 0 and len(every) == len(cls_rows()), r.output
    right = [p["label"] == row["label"] for p, row in zip(every, cls_rows())]
    assert ev["accuracy"] == pytest.approx(sum(right) / len(right), abs=1e-4)  # eval scores exactly what predict answers
    r, preds = device("predict", "--bundle", cls_bundle, "--state", state, "--text", "i loved it", "--text", "sad movie", "--json")
    assert r.exit_code == 0 and [p["text"] for p in preds] == ["i loved it", "sad movie"], r.output
    assert all(set(p["probabilities"]) == {"neg", "pos"} and abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in preds)
    assert all(p["label"] == max(p["probabilities"], key=p["probabilities"].get) for p in preds)  # the label is the argmax

    out = tmp_path / "adapter"
    r, _ = device("export-adapter", "--bundle", cls_bundle, "--state", state, "--out", out)
    assert r.exit_code == 0, r.output
    from edgeft.device.cli import open_state, predictor
    from edgeft.schemes import parse_scheme
    from edgeft.workstation.adapters import load_adapted

    model, tok, meta = load_adapted(out, parse_scheme("int4-g32"), base_model=tiny_bert)  # the adapter names its base, not a path
    assert meta["task"] == "classify" and meta["labels"] == ["neg", "pos"]
    ids = tok(["i loved it", "terrible day", "what a great movie"], padding=True, return_tensors="np")
    import torch

    with torch.no_grad():
        ws = model(input_ids=torch.from_numpy(ids["input_ids"]), attention_mask=torch.from_numpy(ids["attention_mask"])).logits.numpy()
    dev, _ = predictor(open_state(cls_bundle, state), None)
    on_device = dev.logits(ids["input_ids"].astype(np.int64), ids["attention_mask"].astype(np.int64))
    assert np.abs(ws - on_device).max() < 1e-4 * max(1.0, np.abs(ws).max())
    # and the first generation differs from the bundle's adapter: the device really trained
    gen0, _ = predictor(open_state(cls_bundle, state), 0)
    assert np.abs(gen0.logits(ids["input_ids"].astype(np.int64), ids["attention_mask"].astype(np.int64)) - on_device).max() > 1e-4


def test_causal_lm_trains_and_generates_on_device(tmp_path, lm_bundle, chat_rows):
    state = tmp_path / "state"
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows)
    r, s = device("train", "--bundle", lm_bundle, "--state", state, "--data", data, "--max-steps", 4, "--grad-accum", 2, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert s["steps"] == 4 and "eval_loss" in s["metrics"]["candidate"]["heldout"]
    r, g = device("generate", "--bundle", lm_bundle, "--state", state, "--prompt", "what is two plus two?", "--max-new-tokens", 5, "--json")
    assert r.exit_code == 0 and g["tokens"] <= 5, r.output
    r, g2 = device("generate", "--bundle", lm_bundle, "--state", state, "--prompt", "what is two plus two?", "--max-new-tokens", 5,
                   "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--seed", "3", "--json")
    assert r.exit_code == 0, r.output
    r, _ = device("predict", "--bundle", lm_bundle, "--state", state, "--text", "x")
    assert r.exit_code == 2 and "generate" in r.output


def test_sign_test_separates_noise_from_regression():
    from edgeft.device.guard import sign_test

    assert sign_test([True] * 10, [True] * 10) == 1.0
    assert sign_test([True] * 8 + [False] * 2, [False] * 8 + [True] * 2) < 0.06  # lost 8, won 2
    assert sign_test([True] * 4 + [False] * 3, [False] * 4 + [True] * 3) > 0.3  # lost 4, won 3: chance


def test_device_tokenizer_matches_the_workstation(tiny_llama, tiny_bert, chat_rows):
    from transformers import AutoTokenizer

    from edgeft.device.tokenizer import DeviceTokenizer
    from edgeft.encode import encode_causal, encode_classify

    for folder in (tiny_llama, tiny_bert):
        hf, dev = AutoTokenizer.from_pretrained(folder), DeviceTokenizer(folder)
        if hf.pad_token_id is None:
            hf.pad_token = hf.eos_token
        texts = ["i loved it", "the cat sat on the mat " * 20]
        assert [e.input_ids for e in encode_classify(hf, texts, ["a", "b"], ["a", "b"], 16)] == \
               [e.input_ids for e in encode_classify(dev, texts, ["a", "b"], ["a", "b"], 16)]
    hf, dev = AutoTokenizer.from_pretrained(tiny_llama), DeviceTokenizer(tiny_llama)
    rows = chat_rows[:3] + [{"prompt": "what is two plus two?", "completion": " four"}, {"text": "the cat sat"}]
    a, _ = encode_causal(hf, rows, 64)
    b, _ = encode_causal(dev, rows, 64)
    assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]


def test_adapters_come_back_merged_or_to_train_on(tmp_path, cls_bundle, tiny_bert, tiny_llama):
    state = tmp_path / "state"
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows())
    r, _ = device("train", "--bundle", cls_bundle, "--state", state, "--data", data, "--max-steps", 4, "--lr", "5e-3", "--tolerance", "1", "--quiet")
    assert r.exit_code == 0, r.output
    r, _ = device("export-adapter", "--bundle", cls_bundle, "--state", state, "--out", tmp_path / "gen1")
    r, ev = device("eval", "--bundle", cls_bundle, "--state", state, "--data", data, "--json")
    # merged into its (quantized, rebuilt) base: a plain transformers folder with the device's logits
    r = run("import", tmp_path / "gen1", "--merge", "--out", tmp_path / "merged", "--json")
    assert r.exit_code == 4 and "cannot find the base model" in r.output and "--model" in r.output  # the device knows no workstation path
    r = run("import", tmp_path / "gen1", "--merge", "--model", tiny_llama, "--out", tmp_path / "merged")
    assert r.exit_code == 4 and "tiny-llama" in r.output and "made for base tiny-bert" in r.output  # not its base
    r = run("import", tmp_path / "gen1", "--merge", "--model", tiny_bert, "--out", tmp_path / "merged", "--json")
    assert r.exit_code == 0, r.output
    merged_meta = json.loads((tmp_path / "merged" / "edgeft.json").read_text())
    assert merged_meta["merged_from"]["adapter"] == "gen1" and merged_meta["base"]["name"] == "tiny-bert"
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgeft.device.cli import open_state, predictor

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tok(["i loved it", "sad movie"], padding=True, return_tensors="np")
    with torch.no_grad():
        ws = merged(input_ids=torch.from_numpy(ids["input_ids"]), attention_mask=torch.from_numpy(ids["attention_mask"])).logits.numpy()
    dev, _ = predictor(open_state(cls_bundle, state), None)
    assert np.abs(ws - dev.logits(ids["input_ids"].astype(np.int64), ids["attention_mask"].astype(np.int64))).max() < 1e-4
    # continue training on the workstation from the device's weights: it starts where the device stopped
    r = run("import", tmp_path / "gen1", "--data", data, "--eval-data", data, "--model", tiny_bert, "--out", tmp_path / "continued",
            "--max-steps", 1, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert abs(s["before"]["eval_loss"] - ev["eval_loss"]) < 1e-4 and s["before"]["accuracy"] == ev["accuracy"]
    r = run("import", tmp_path / "gen1", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--merge" in r.output


def test_bundle_carries_reference_rows_the_device_checks(tmp_path, cls_run):
    from conftest import target

    ref = write_jsonl(tmp_path / "ref.jsonl", cls_rows(1))
    r = run("export", "--run", cls_run, "--target", target(tmp_path), "--out", tmp_path / "b", "--reference-data", ref)
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["reference"] == {"file": "reference.jsonl", "rows": 8} and "reference.jsonl" in manifest["files"]
    data = write_jsonl(tmp_path / "new.jsonl", cls_rows())
    r, s = device("train", "--bundle", tmp_path / "b", "--data", data, "--max-steps", 2, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    # half of them check for forgetting, the other half are rehearsed (edgeft/device/rehearsal.py)
    assert s["metrics"]["candidate"]["reference"]["rows"] == 4 and s["rehearsal"]["pool_rows"] == 4


def test_token_log_probs_match_float64_log_softmax():
    """The evaluation's log-probabilities without a float64 copy of the logits."""
    from edgeft.device.infer import log_softmax, token_log_probs

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((37, 4096)) * 8).astype(np.float32)
    target = rng.integers(0, 4096, 37)
    want = log_softmax(logits.astype(np.float64))[np.arange(37), target]
    np.testing.assert_allclose(token_log_probs(logits, target), want, rtol=1e-6, atol=1e-6)


def test_rows_cut_before_their_answer_are_refused_on_the_device(tmp_path, lm_bundle):
    """The bundle's sequence length is fixed: rows whose prompt fills it keep no answer token, and
    training on only such rows would change nothing; the device says so instead of a loss of 0."""
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": f"{long_prompt} {i}?", "completion": " yes"} for i in range(12)])
    state = tmp_path / "state"
    r, _ = device("train", "--bundle", lm_bundle, "--state", state, "--data", data, "--max-steps", 1, "--quiet")
    assert r.exit_code == 3 and "no row keeps an answer token within 32 tokens" in r.output and "shorten the prompts" in r.output


def test_adamw_in_slices_equals_adamw_whole(cls_bundle, monkeypatch):
    """The optimizer graph runs over slices of the flat vectors (bounded temporaries): the values of
    one run over all of them, and the caller's earlier parameters are left as they were."""
    from safetensors.numpy import load_file

    from edgeft.bundle import read_manifest
    from edgeft.device.backends import AdamW, Layout

    manifest = read_manifest(cls_bundle)
    adapter = load_file(str(cls_bundle / "adapter" / "adapter_model.safetensors"))
    params = {n: adapter[k] for n, k in manifest.trainable.items()}
    layout = Layout({n: v.shape for n, v in params.items()})
    runs = {}
    for chunk in (layout.size, 7):
        monkeypatch.setattr(AdamW, "CHUNK", chunk)
        opt = AdamW(cls_bundle, manifest, layout, params)
        first = opt.params
        kept = first.copy()
        for step in range(3):
            opt.update(np.random.default_rng(step).standard_normal(layout.size).astype(np.float32), 1e-2)
        np.testing.assert_array_equal(first, kept)
        runs[chunk] = (opt.params, opt.exp_avg, opt.exp_avg_sq)
    assert layout.size > 7 * 3
    for whole, sliced in zip(runs[layout.size], runs[7]):  # to fp32 rounding: ORT's vector and scalar loops round apart
        np.testing.assert_allclose(sliced, whole, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(runs[7][0], layout.flatten(params))  # it moved
