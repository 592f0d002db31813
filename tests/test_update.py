"""Adapter-only updates: `edgeft export --update-for` on the workstation, `edgeft device apply-update` on the device."""

import json
import shutil

import numpy as np
import pytest

from conftest import build_model_dir, device, run, tiny_bundle, write_jsonl

PAIRS = [("i loved it", "pos"), ("great result", "pos"), ("terrible day", "neg"), ("sad movie", "neg")] * 5
UPDATE_FILES = {"update.json", "weights.safetensors", "adapter/adapter_config.json", "adapter/edgeft.json"}


def cls_rows(pairs=PAIRS):
    return [{"text": t, "label": y} for t, y in pairs]


def train(tmp, model, rows, *extra, task="classify", scheme="int4-g32"):
    """A short run on a tiny model; cls_run is 3 steps at the defaults, these differ by seed and length."""
    out = tmp / "run"
    r = run("train", "--model", model, "--data", write_jsonl(tmp / "d.jsonl", rows), "--task", task, "--out", out, "--max-steps", 6,
            "--batch-size", 4, "--quant", scheme, "--seed", 1, "--lr", "5e-3", "--quiet", *extra)
    assert r.exit_code == 0, r.output
    return out


def files_of(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def state_json(state):
    p = state / "state.json"
    return p.read_text() if p.exists() else None


def sample_ids(model_dir, texts):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="np")
    return ids["input_ids"].astype(np.int64), ids["attention_mask"].astype(np.int64)


def workstation_logits(run_dir, scheme, ids, mask):
    """The run's adapter on its quantized base in torch (load_adapted: not the code path the update's own check uses)."""
    import torch

    from edgeft.schemes import parse_scheme
    from edgeft.workstation.adapters import load_adapted

    model, _, _ = load_adapted(run_dir, parse_scheme(scheme))
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()


def device_logits(bundle, state, generation, ids, mask):
    from edgeft.device.cli import open_state, predictor

    model, _ = predictor(open_state(bundle, state), generation)
    return model.logits(ids, mask)


@pytest.fixture(scope="module")
def cls_run2(tmp_path_factory, tiny_bert):
    """A second run on the bundle's base: other seed, more steps, so other weights."""
    return train(tmp_path_factory.mktemp("run2"), tiny_bert, cls_rows())


@pytest.fixture(scope="module")
def update(tmp_path_factory, cls_run2, cls_bundle):
    """Made with ONNX export, artifact generation and the portable rewrite all broken: an update needs none of them."""
    out = tmp_path_factory.mktemp("upd") / "update"

    def broken(*a, **k):
        raise AssertionError("an update must not export or generate ONNX graphs")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("edgeft.workstation.export.export_graph", "edgeft.workstation.export.generate", "edgeft.workstation.portable.write_portable",
                     "torch.onnx.export"):
            mp.setattr(name, broken)
        r = run("export", "--run", cls_run2, "--update-for", cls_bundle, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_update_is_small_checked_and_names_its_base_and_bundle(update, cls_bundle):
    from edgeft.bundle import sha256, verify_bundle

    out, s = update
    manifest = verify_bundle(cls_bundle)
    assert files_of(out) == UPDATE_FILES  # no graph, no tokenizer, no PEFT weights a second time
    adapter = (cls_bundle / "adapter" / "adapter_model.safetensors").stat().st_size
    total = sum((out / f).stat().st_size for f in UPDATE_FILES)
    assert s["update_bytes"] == total and total < adapter * 1.05 + 16384, (total, adapter)
    # (a tiny model: its adapter is a fifth of a bundle that stores the base once; a 0.5B model's, a twentieth)
    assert total * 4 < s["bundle_bytes"] == sum(e["bytes"] for e in manifest.files.values())
    u = json.loads((out / "update.json").read_text())
    assert u["kind"] == "edgeft-adapter-update" and u["base"] == manifest.base.to_dict()
    assert u["bundle"]["manifest_sha256"] == "sha256:" + sha256(cls_bundle / "manifest.json")
    assert (u["task"], u["labels"], u["scheme"]) == ("classify", ["neg", "pos"], "int4-g32")
    assert {n: t["peft_key"] for n, t in u["trainable"].items()} == manifest.trainable
    assert set(u["files"]) == UPDATE_FILES - {"update.json"}
    assert all(u["files"][f]["sha256"] == sha256(out / f) for f in u["files"])
    assert u["parity"]["logits_rel"] < 1e-5 and u["parity"]["weights_max_abs"] == 0.0
    assert u["source"]["name"] == "run" and "path_hint" not in json.dumps(u) and str(cls_bundle.parent) not in json.dumps(u)


def test_applied_update_is_what_the_device_runs(tmp_path, update, cls_bundle, cls_run2, tiny_bert):
    out, _ = update
    state = tmp_path / "state"
    r, s = device("apply-update", "--bundle", cls_bundle, "--state", state, out, "--json")
    assert r.exit_code == 0, r.output
    assert s["generation"] == 1 and s["promoted"] and s["current"] == 1 and s["previous"] == 0 and not s["already_applied"]
    r, st = device("status", "--bundle", cls_bundle, "--state", state, "--json")
    g = st["generations"][1]
    assert (g["parent"], g["status"], g["source"]) == (0, "promoted", "update") and g["reason"].startswith("update from the workstation")
    assert g["update"]["sha256"] == s["sha256"] and g["update"]["source"]["name"] == "run"
    r, _ = device("status", "--bundle", cls_bundle, "--state", state)
    assert "update update (run run)" in r.output

    # the device's logits are the workstation model's, and not the bundle's own adapter's
    ids, mask = sample_ids(tiny_bert, ["i loved it", "terrible day", "the cat sat on the mat", "what a great movie"])
    want = workstation_logits(cls_run2, "int4-g32", ids, mask)
    got = device_logits(cls_bundle, state, None, ids, mask)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    before = device_logits(cls_bundle, state, 0, ids, mask)
    assert np.abs(before - got).max() > 1e-3
    r, ev = device("eval", "--bundle", cls_bundle, "--state", state, "--data", write_jsonl(tmp_path / "t.jsonl", cls_rows()), "--json")
    assert r.exit_code == 0 and ev["generation"] == 1, r.output

    # export-adapter gives back the update's weights under PEFT's names
    from safetensors.numpy import load_file

    r, _ = device("export-adapter", "--bundle", cls_bundle, "--state", state, "--out", tmp_path / "gen1")
    assert r.exit_code == 0, r.output
    back, orig = load_file(str(tmp_path / "gen1" / "adapter_model.safetensors")), load_file(str(cls_run2 / "adapter" / "adapter_model.safetensors"))
    assert back.keys() == orig.keys() and all(np.array_equal(back[k], orig[k]) for k in orig)

    # applying it again changes nothing; rollback returns to the bundle's adapter, and forward again
    r, again = device("apply-update", "--bundle", cls_bundle, "--state", state, out, "--json")
    assert r.exit_code == 0 and again["already_applied"] and again["generation"] == 1, r.output
    r, _ = device("rollback", "0", "--bundle", cls_bundle, "--state", state)
    assert r.exit_code == 0 and np.array_equal(device_logits(cls_bundle, state, None, ids, mask), before)
    r, st = device("status", "--bundle", cls_bundle, "--state", state, "--json")
    assert [x["id"] for x in st["generations"]] == [0, 1] and st["current"] == 0


def test_a_causal_lm_update_matches_the_workstation(tmp_path, lm_bundle, tiny_llama):
    pairs = [("what is two plus two?", " four"), ("where did the cat sit?", " on the mat")] * 6
    run2 = train(tmp_path, tiny_llama, [{"prompt": q, "completion": a} for q, a in pairs], task="causal-lm", scheme="int3-g32")
    r = run("export", "--run", run2, "--update-for", lm_bundle, "--out", tmp_path / "u", "--json")
    assert r.exit_code == 0, r.output
    state = tmp_path / "state"
    r, s = device("apply-update", "--bundle", lm_bundle, "--state", state, tmp_path / "u", "--json")
    assert r.exit_code == 0 and s["current"] == 1, r.output
    ids, mask = sample_ids(tiny_llama, ["the cat sat on the mat", "what is two plus two? four"])
    want = workstation_logits(run2, "int3-g32", ids, mask)
    got = device_logits(lm_bundle, state, None, ids, mask)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(device_logits(lm_bundle, state, 0, ids, mask) - got).max() > 1e-3
    r, g = device("generate", "--bundle", lm_bundle, "--state", state, "--prompt", "what is two plus two?", "--max-new-tokens", 3, "--json")
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tiny_bert):
    """The same architecture, names and shapes as tiny-bert, even the same folder name; one weight differs."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path_factory.mktemp("other") / "tiny-bert"
    shutil.copytree(tiny_bert, folder)
    weights = load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if "word_embeddings" in k)
    weights[key] = weights[key] + np.float32(1e-3)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_wrong_base_is_refused_on_both_sides(tmp_path, other_base, cls_bundle, lm_bundle, update, lm_run):
    from edgeft.basemodel import fingerprint

    assert fingerprint(other_base) != json.loads((cls_bundle / "manifest.json").read_text())["base"]["fingerprint"]
    (tmp_path / "o").mkdir()
    other_run = train(tmp_path / "o", other_base, cls_rows())
    # workstation: refused before anything is written, naming both bases
    r = run("export", "--run", other_run, "--update-for", cls_bundle, "--out", tmp_path / "u")
    assert r.exit_code == 4 and "made for base tiny-bert" in r.output and "the bundle holds base tiny-bert" in r.output, r.output
    assert not (tmp_path / "u").exists() and not list(tmp_path.glob(".u.*"))
    r = run("export", "--run", lm_run, "--update-for", cls_bundle, "--out", tmp_path / "u")
    assert r.exit_code == 4 and "made for base tiny-llama" in r.output and "task is causal-lm" in r.output, r.output
    assert not (tmp_path / "u").exists()

    # device: an update made (properly) for a bundle of the other base is refused by this one, which stays as it was
    other_bundle = tiny_bundle(tmp_path / "o", other_run, "int4-g32")
    r = run("export", "--run", other_run, "--update-for", other_bundle, "--out", tmp_path / "u-other")
    assert r.exit_code == 0, r.output
    state = tmp_path / "state"
    r, _ = device("apply-update", "--bundle", cls_bundle, "--state", state, tmp_path / "u-other")
    assert r.exit_code == 8 and "was made for base tiny-bert" in r.output and "nothing was changed" in r.output, r.output
    assert state_json(state) is None and not (state / "generations").exists()
    r, _ = device("apply-update", "--bundle", lm_bundle, "--state", state, update[0])  # a bert update on a llama bundle
    assert r.exit_code == 8 and "made for base tiny-bert" in r.output and "bundle holds base tiny-llama" in r.output, r.output
    assert state_json(state) is None


@pytest.mark.parametrize("extra, scheme, rows, words", [
    ([], "int8", None, "trained against base quantization int8, the bundle's base is int4-g32"),
    (["--lora-r", "8"], "int4-g32", None, "r 8 (bundle 16)"),
    (["--lora-alpha", "8"], "int4-g32", None, "lora_alpha 8.0 (bundle 32"),  # same shapes: the scaling baked into the graph differs
    (["--target-modules", "query,value"], "int4-g32", None, "lacks"),
    ([], "int4-g32", [("i loved it", "pos"), ("so-so", "meh"), ("sad movie", "neg")] * 6, "its labels are meh,neg,pos"),
])
def test_a_run_that_does_not_fit_the_bundle_is_refused_before_anything_is_written(tmp_path, tiny_bert, cls_bundle, extra, scheme, rows, words):
    mine = train(tmp_path, tiny_bert, cls_rows(rows or PAIRS), *extra, scheme=scheme)
    r = run("export", "--run", mine, "--update-for", cls_bundle, "--out", tmp_path / "u")
    assert r.exit_code == 4 and words in r.output and "cannot update" in r.output, r.output
    assert not (tmp_path / "u").exists() and not list(tmp_path.glob(".u.*"))


def test_the_parity_check_catches_what_the_metadata_checks_would_miss(tmp_path, tiny_bert, cls_bundle, monkeypatch):
    """With the metadata checks switched off, an adapter of the bundle's shapes but another LoRA alpha (a
    constant in the bundle's graphs) still fails: the bundle's graph with its weights is not the torch model."""
    mine = train(tmp_path, tiny_bert, cls_rows(), "--lora-alpha", "8")
    monkeypatch.setattr("edgeft.update.mismatches", lambda **k: [])
    r = run("export", "--run", mine, "--update-for", cls_bundle, "--out", tmp_path / "u")
    assert r.exit_code == 10 and "does not compute what torch does" in r.output, r.output
    assert not (tmp_path / "u").exists()


def test_export_update_options(tmp_path, cls_run2, cls_bundle):
    from conftest import target

    r = run("export", "--run", cls_run2, "--update-for", cls_bundle, "--out", tmp_path / "u", "--target", target(tmp_path, "int8"))
    assert r.exit_code == 2 and "is not the target of" in r.output, r.output
    r = run("export", "--run", cls_run2, "--update-for", cls_bundle, "--out", tmp_path / "u", "--batch", 4)
    assert r.exit_code == 2 and "--batch" in r.output
    r = run("export", "--run", cls_run2, "--out", tmp_path / "u")
    assert r.exit_code == 2 and "--target" in r.output and "--update-for" in r.output
    r = run("export", "--run", cls_run2, "--update-for", tmp_path / "nope", "--out", tmp_path / "u")
    assert r.exit_code == 8 and "not an edgeft bundle" in r.output
    r = run("export", "--run", cls_run2, "--update-for", cls_bundle, "--out", tmp_path / "u", "--target", target(tmp_path), "--json")
    assert r.exit_code == 0, r.output  # the bundle's own target may be named
    r = run("export", "--run", cls_run2, "--update-for", cls_bundle, "--out", tmp_path / "u")
    assert r.exit_code == 6 and "exists" in r.output


@pytest.mark.parametrize("damage, code, words", [
    ("flip weights", 8, "update file weights.safetensors does not match its sha256"),
    ("drop edgeft.json", 8, "update file missing: adapter/edgeft.json"),
    ("drop update.json", 8, "not a complete edgeft update"),
    ("relabel", 8, "its labels are pos,neg"),  # update.json is not in its own list: its content is checked against the bundle
    ("other bundle", 8, "checked against another bundle"),
    ("shape", 8, "other shapes"),
])
def test_tampered_update_is_refused_and_changes_nothing(tmp_path, update, cls_bundle, damage, code, words):
    bad = tmp_path / "bad"
    shutil.copytree(update[0], bad)
    u = json.loads((bad / "update.json").read_text())
    if damage == "flip weights":
        data = bytearray((bad / "weights.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x01
        (bad / "weights.safetensors").write_bytes(bytes(data))
    elif damage == "drop edgeft.json":
        (bad / "adapter" / "edgeft.json").unlink()
    elif damage == "drop update.json":
        (bad / "update.json").unlink()
    elif damage == "relabel":
        u["labels"] = ["pos", "neg"]
    elif damage == "other bundle":
        u["bundle"]["manifest_sha256"] = "sha256:" + "0" * 64
    elif damage == "shape":
        first = next(iter(u["trainable"]))
        u["trainable"][first]["shape"] = [1, 1]
    if damage in ("relabel", "other bundle", "shape"):
        (bad / "update.json").write_text(json.dumps(u))
    state = tmp_path / "state"
    r, _ = device("apply-update", "--bundle", cls_bundle, "--state", state, bad)
    assert r.exit_code == code and words in r.output, r.output
    assert state_json(state) is None and not (state / "generations").exists()


def test_an_interrupted_apply_leaves_the_state_as_it_was(tmp_path, update, cls_bundle, monkeypatch):
    import errno

    state = tmp_path / "state"
    r, _ = device("apply-update", "--bundle", cls_bundle, "--state", state, update[0], "--dry-run")
    assert r.exit_code == 0 and "would become generation 1" in r.output and state_json(state) is None, r.output
    r, _ = device("rollback", "0", "--bundle", cls_bundle, "--state", state)  # a state.json to keep
    before = state_json(state)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:  # the weights land, then the state.json rewrite fails: as a kill between the two
        mp.setattr("edgeft.device.state.atomic_write_json", full)
        r, _ = device("apply-update", "--bundle", cls_bundle, "--state", state, update[0])
    assert r.exit_code == 6 and "disk is full" in r.output, r.output
    assert state_json(state) == before and (state / "generations" / "g0001.safetensors").exists()  # an orphan, not a generation
    r, s = device("apply-update", "--bundle", cls_bundle, "--state", state, update[0], "--json")
    assert r.exit_code == 0 and s["generation"] == 1 and s["current"] == 1, r.output

    # an interrupted device train job is never silently overtaken
    state2 = tmp_path / "state2"
    (state2 / "job").mkdir(parents=True)
    (state2 / "job" / "job.json").write_text(json.dumps({"generation": 1, "data": {"file": "new.jsonl"}}))
    r, _ = device("apply-update", "--bundle", cls_bundle, "--state", state2, update[0])
    assert r.exit_code == 11 and "interrupted" in r.output and "--discard-interrupted" in r.output, r.output
    assert state_json(state2) is None
    r, s = device("apply-update", "--bundle", cls_bundle, "--state", state2, update[0], "--discard-interrupted", "--json")
    assert r.exit_code == 0 and s["generation"] == 1 and not (state2 / "job").exists(), r.output


def test_check_gates_the_update_like_device_train(tmp_path, update, cls_bundle, tiny_bert):
    state = tmp_path / "state"
    r, _ = device("apply-update", "--bundle", cls_bundle, "--state", state, update[0], "--check")
    assert r.exit_code == 2 and "no rows to compare on" in r.output  # cls_bundle carries no reference rows; no replay yet
    # an update that has learnt the task, checked on rows with the labels flipped: it regresses there, so it is kept, not promoted
    learnt = train(tmp_path, tiny_bert, cls_rows(), "--max-steps", 20, "--eval-data", tmp_path / "d.jsonl")
    r = run("export", "--run", learnt, "--update-for", cls_bundle, "--out", tmp_path / "u")
    assert r.exit_code == 0, r.output
    flipped = [{"text": t, "label": "neg" if y == "pos" else "pos"} for t, y in PAIRS]
    ids, mask = sample_ids(tiny_bert, [t for t, _ in PAIRS])
    old, new = device_logits(cls_bundle, None, 0, ids, mask), workstation_logits(learnt, "int4-g32", ids, mask)
    labels = np.array([0 if y == "pos" else 1 for t, y in PAIRS])  # flipped, as indices of ["neg", "pos"]
    assert (new.argmax(-1) == labels).mean() < (old.argmax(-1) == labels).mean() - 0.2  # the premise of this test
    r, s = device("apply-update", "--bundle", cls_bundle, "--state", state, tmp_path / "u", "--check", "--eval-data",
                  write_jsonl(tmp_path / "flipped.jsonl", flipped), "--json")
    assert r.exit_code == 0 and not s["promoted"] and s["status"] == "rejected" and "regressed" in s["reason"], r.output
    assert s["current"] == 0 and s["metrics"]["candidate"]["heldout"]["rows"] == len(flipped)
    # the same update on the true labels passes (a new state: the rejected one is already recorded there)
    r, s = device("apply-update", "--bundle", cls_bundle, "--state", tmp_path / "s2", tmp_path / "u", "--check", "--eval-data",
                  write_jsonl(tmp_path / "true.jsonl", cls_rows()), "--json")
    assert r.exit_code == 0 and s["promoted"] and s["current"] == 1 and "no regression on heldout" in s["reason"], r.output


def test_apply_update_runs_with_torch_unimportable(tmp_path, update, cls_bundle):
    import subprocess
    import sys

    from test_device_boundary import BLOCK, HEAVY

    data = write_jsonl(tmp_path / "d.jsonl", cls_rows())
    state = str(tmp_path / "s")
    code = BLOCK + f"""
from edgeft.cli import main
for args in (["device", "apply-update", "--bundle", {str(cls_bundle)!r}, "--state", {state!r}, {str(update[0])!r}, "--dry-run"],
             ["device", "apply-update", "--bundle", {str(cls_bundle)!r}, "--state", {state!r}, {str(update[0])!r}, "--check", "--eval-data", {str(data)!r}],
             ["device", "status", "--bundle", {str(cls_bundle)!r}, "--state", {state!r}]):
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        assert not e.code, (args, e.code)
loaded = [m for m in {HEAVY!r} if sys.modules.get(m) is not None]
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "s" / "state.json").read_text())["generations"][1]["source"] == "update"
