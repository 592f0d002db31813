"""Image bundles: export (conv gradients in the portable step, parity), device train on class
folders, device predict on files, Learner.predict on a numpy frame, without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import device, run, target
from test_device_boundary import BLOCK, HEAVY
from vision_fixtures import build_image_folder, build_vision_model_dir, make_image


@pytest.fixture(scope="session")
def image_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision-bundle")
    model = build_vision_model_dir(tmp / "tiny-lite")
    data = build_image_folder(tmp / "train", 10, seed=0)
    val = build_image_folder(tmp / "val", 4, seed=1)
    r = run("train", "--model", model, "--data", data, "--eval-data", val, "--task", "image-classify", "--out", tmp / "run",
            "--max-steps", 3, "--batch-size", 4, "--lora-r", 4, "--unfreeze-blocks", 1, "--quiet")
    assert r.exit_code == 0, r.output
    r = run("export", "--run", tmp / "run", "--target", target(tmp, "int8"), "--out", tmp / "bundle", "--batch", 4, "--json")
    assert r.exit_code == 0, r.output
    return {"bundle": tmp / "bundle", "train": data, "val": val, "summary": json.loads(r.stdout), "tmp": tmp}


def test_export_parity_and_manifest(image_bundle):
    s, b = image_bundle["summary"], image_bundle["bundle"]
    p = s["parity"]
    assert p["grad_rel"] < 1e-4 and p["portable_grad_rel"] < 1e-4 and p["logits_rel"] < 1e-4 and p["reference"].startswith("torch float64")
    m = json.loads((b / "manifest.json").read_text())
    assert m["task"] == "image-classify" and m["scheme"] == "int8" and m["preprocess"]["size"] == 32
    assert m["inputs"]["pixel_values"] == ["batch", 3, 32, 32] and m["memory_plan"]["activations_mib"] > 0
    assert (b / "portable" / "train_step.onnx").is_file() and (b / "reference.jsonl").is_file()
    import onnx

    step = onnx.load(str(b / "portable" / "train_step.onnx"), load_external_data=False)
    ops = {n.op_type for n in step.graph.node}
    assert {"ConvTranspose", "Conv"} <= ops and all(n.domain in ("", "ai.onnx") for n in step.graph.node)
    # the base is held as constants the device supplies, not stored and not fed: none is a graph input
    from safetensors import safe_open

    from edgeft.workstation.portable_memory import SUPPLIED

    supplied = {t.name: t for t in step.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert set(supplied) == set(m["portable"]["supplied"]["train_step"]) and len(supplied) > 10
    assert all(t.external_data[0].value == SUPPLIED and not t.raw_data for t in supplied.values())
    with safe_open(str(b / "base.safetensors"), "np") as f:
        base = set(f.keys())
    assert not {i.name for i in step.graph.input} & (base | set(supplied))
    # the depthwise conv of the unfrozen last block trains: its weight gradient is an output of the step
    assert any("_depthwise_conv" in o.name for o in step.graph.output)


def test_device_train_predict_and_frame(tmp_path, image_bundle):
    b, state = image_bundle["bundle"], tmp_path / "state"
    r, s = device("train", "--bundle", b, "--state", state, "--data", image_bundle["train"], "--eval-data", image_bundle["val"],
                  "--max-steps", 3, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert s["generation"] == 1 and s["steps"] == 3
    r, preds = device("predict", "--bundle", b, "--state", state, "--image", image_bundle["val"] / "bar_h", "--json")
    assert r.exit_code == 0, r.output
    assert len(preds) == 4 and all(p["label"] in ("bar_h", "bar_v") for p in preds)
    from edgeft.device.learner import Learner

    learner = Learner(b, state_dir=state)
    frame = make_image(np.random.default_rng(5), 0)  # a camera frame: (h, w) uint8
    one = learner.predict(frame)
    assert set(one) == {"label", "probability", "probabilities"}
    path = sorted((image_bundle["val"] / "bar_h").glob("*.png"))[0]
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert learner.predict(rgb)["probabilities"] == learner.predict(str(path))["probabilities"]  # file and frame: one preprocessing
    r, m = device("eval", "--bundle", b, "--state", state, "--data", image_bundle["val"], "--json")
    assert r.exit_code == 0 and "accuracy" in m, r.output


@pytest.mark.parametrize("case", ["broken image", "unknown class", "missing folder"])
def test_device_bad_images_are_one_message(tmp_path, image_bundle, case):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(image_bundle["val"], data)
    if case == "broken image":
        (data / "bar_v" / "zz.png").write_bytes(b"garbage")
    elif case == "unknown class":
        shutil.copytree(data / "bar_v", data / "diagonal")
    else:
        data = tmp_path / "nowhere"
    r, _ = device("train", "--bundle", image_bundle["bundle"], "--state", tmp_path / "s", "--data", data, "--max-steps", 1, "--quiet")
    assert r.exit_code == 3, r.output
    assert "Traceback" not in r.output
    r, _ = device("predict", "--bundle", image_bundle["bundle"], "--state", tmp_path / "s", "--image", tmp_path / "nope.png")
    assert r.exit_code == 3 and "not found" in r.output, r.output


def test_image_device_commands_without_torch(tmp_path, image_bundle):
    b = image_bundle["bundle"]
    code = BLOCK + f"""
from edgeft.cli import main
for args in (["device", "train", "--bundle", {str(b)!r}, "--state", {str(tmp_path / 's')!r}, "--data", {str(image_bundle['train'])!r}, "--max-steps", "2", "--quiet"],
             ["device", "predict", "--bundle", {str(b)!r}, "--state", {str(tmp_path / 's')!r}, "--image", {str(image_bundle['val'])!r}]):
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        assert not e.code, (args, e.code)
import numpy as np
from edgeft.device.learner import Learner
print(Learner({str(b)!r}, state_dir={str(tmp_path / 's')!r}).predict(np.zeros((40, 48, 3), np.uint8))["label"])
loaded = [m for m in {HEAVY!r} if sys.modules.get(m) is not None]
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]


def test_learner_feedback_with_images(tmp_path, image_bundle):
    """An app saves a corrected camera frame and adds it; the next update trains on it."""
    from PIL import Image

    from edgeft.device.learner import Learner
    from edgeft.errors import DataError

    learner = Learner(image_bundle["bundle"], state_dir=tmp_path / "state")
    rng = np.random.default_rng(9)
    rows = []
    for i in range(8):
        Image.fromarray(make_image(rng, i % 2)).save(tmp_path / f"frame{i}.png")
        rows.append({"image": str(tmp_path / f"frame{i}.png"), "label": ["bar_h", "bar_v"][i % 2]})
    with pytest.raises(DataError, match="not one the model was trained with"):
        learner.add_examples([{"image": rows[0]["image"], "label": "diagonal"}])
    learner.add_examples(rows)
    assert learner.status()["pending_rows"] == 8
    s = learner.update(min_rows=1, max_steps=2)
    assert s["generation"] == 1 and learner.status()["pending_rows"] == 0


def test_lean_memory_step_is_the_same_step(image_bundle, monkeypatch):
    """EDGEFT_MEMORY=lean (no arena, freed blocks unmapped) changes where tensors live, not what the step computes."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_device import device_steps
    from bench_vision import image_batches

    losses = {}
    for mode in ("fast", "lean"):
        monkeypatch.setenv("EDGEFT_MEMORY", mode)
        data, m = image_batches(image_bundle["bundle"], 2, image_bundle["train"])
        losses[mode] = device_steps(image_bundle["bundle"], m, data, "portable", 0)[1]
    assert len(losses["fast"]) == 2 and losses["fast"] == losses["lean"]


# -- the round trip: device -> workstation -> device ---------------------------------------------------

def workstation_probs(adapter, base, images):
    """The adapter on its int8 base in torch (vision_export's device model), softmax over the val images."""
    import torch

    from edgeft.schemes import parse_scheme
    from edgeft.workstation.adapters import read_adapter_meta, resolve_base
    from edgeft.workstation.vision_export import vision_device_model
    from edgeft.workstation.vision_model import adapter_preprocess

    meta = read_adapter_meta(adapter)
    base, _ = resolve_base(meta, base)  # checked against the adapter's fingerprint
    model = vision_device_model(meta, parse_scheme("int8"), {}, base)
    x = torch.from_numpy(adapter_preprocess(meta, base).batch([str(p) for p in images]))
    with torch.no_grad():
        return model(x).double().softmax(-1).numpy()


def val_loss(model, folder, pre):
    from edgeft.images import load_image_rows
    from edgeft.workstation.objective import evaluate
    from edgeft.workstation.vision_train import ImageObjective, ImageRows

    rows = ImageRows(*load_image_rows(folder), ["bar_h", "bar_v"], pre)
    return evaluate(ImageObjective(model), rows.eval_batches(16), "classify", 2)["eval_loss"]


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, image_bundle):
    """device train -> export-adapter -> import --merge and import --data -> export --update-for -> apply-update."""
    tmp, b = tmp_path_factory.mktemp("vision-roundtrip"), image_bundle["bundle"]
    state, train, val = tmp / "state", image_bundle["train"], image_bundle["val"]
    base = image_bundle["tmp"] / "tiny-lite"  # a device's adapter names its base, without a path: --model
    out = {"tmp": tmp, "state": state, "base": base}
    r, out["device_train"] = device("train", "--bundle", b, "--state", state, "--data", train, "--max-steps", 3, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    r, out["export_adapter"] = device("export-adapter", "--bundle", b, "--state", state, "--out", tmp / "gen", "--json")
    assert r.exit_code == 0, r.output
    r = run("import", tmp / "gen", "--merge", "--model", base, "--out", tmp / "merged", "--json")
    assert r.exit_code == 0, r.output
    out["merge"] = json.loads(r.stdout)
    r = run("import", tmp / "gen", "--model", base, "--data", train, "--eval-data", val, "--max-steps", 2, "--lr", "5e-2", "--out", tmp / "run2", "--json")
    assert r.exit_code == 0, r.output
    out["import"] = json.loads(r.stdout)
    r = run("export", "--run", tmp / "run2", "--update-for", b, "--out", tmp / "upd", "--json")
    assert r.exit_code == 0, r.output
    out["update"] = json.loads(r.stdout)
    r, out["apply"] = device("apply-update", "--bundle", b, "--state", state, tmp / "upd", "--json")
    assert r.exit_code == 0, r.output
    return out


def test_device_adapter_comes_back_as_a_peft_folder_the_workstation_evaluates(round_trip, image_bundle):
    tmp, b = round_trip["tmp"], image_bundle["bundle"]
    assert round_trip["device_train"]["generation"] == 1 and round_trip["export_adapter"]["generation"] == 1
    meta = json.loads((tmp / "gen" / "edgeft.json").read_text())
    assert (meta["task"], meta["labels"], meta["scheme"]) == ("image-classify", ["bar_h", "bar_v"], "int8")
    assert meta["preprocess"] == json.loads((b / "manifest.json").read_text())["preprocess"]  # the size it was trained at
    r = run("eval", "--adapter", tmp / "gen", "--model", round_trip["base"], "--data", image_bundle["val"], "--json")
    assert r.exit_code == 0, r.output
    ws = json.loads(r.stdout)
    r, dev = device("eval", "--bundle", b, "--state", round_trip["state"], "--generation", 1, "--data", image_bundle["val"], "--json")
    assert r.exit_code == 0, r.output
    # torch on the int8 base and ONNX Runtime on the bundle, one adapter: the same numbers (fp32 sums apart)
    assert (ws["rows"], ws["scheme"], ws["accuracy"]) == (8, "int8", dev["accuracy"]), (ws, dev)
    assert abs(ws["eval_loss"] - dev["eval_loss"]) < 1e-5 * dev["eval_loss"], (ws, dev)


def test_merged_image_model_is_the_adapter_on_its_base(round_trip, image_bundle):
    import torch

    from edgeft.workstation.vision_model import load_vision_base

    tmp = round_trip["tmp"]
    merged = tmp / "merged"
    assert round_trip["merge"]["task"] == "image-classify" and round_trip["merge"]["logits_rel"] < 1e-6, round_trip["merge"]
    assert {p.name for p in merged.iterdir()} == {"config.json", "model.safetensors", "edgeft.json"}
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "efficientnet-lite" and config["labels"] == ["bar_h", "bar_v"]
    # The folder as saved (fp32, nothing quantized again) against the adapter on the int8 base: the same
    # fp32 ops on weights that differ by one rounding (W + B A s folded into one tensor): ~1e-7, held to 1e-5.
    images = sorted(image_bundle["val"].rglob("*.png"))
    model = load_vision_base(merged, None, ["bar_h", "bar_v"]).eval()
    from edgeft.images import Preprocess

    x = torch.from_numpy(Preprocess.from_dict(config["preprocess"]).batch([str(p) for p in images]))
    with torch.no_grad():
        got = model(x).double().softmax(-1).numpy()
    want = workstation_probs(tmp / "gen", round_trip["base"], images)
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
    # a base again: its head is kept by label name (a new label starts fresh)
    again = load_vision_base(merged, None, ["bar_v", "diagonal", "bar_h"])
    assert torch.equal(again.classifier.weight[0], model.classifier.weight[1]) and torch.equal(again.classifier.weight[2], model.classifier.weight[0])
    assert torch.equal(again.classifier.bias[[0, 2]], model.classifier.bias[[1, 0]]) and not torch.equal(again.classifier.weight[1], model.classifier.weight[0])
    r = run("train", "--model", merged, "--data", image_bundle["train"], "--eval-data", image_bundle["val"], "--task", "image-classify",
            "--out", tmp / "from-merged", "--max-steps", 1, "--batch-size", 4, "--lora-r", 4, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["scheme"], s["steps"], s["task"]) == ("int8", 1, "image-classify")
    # its first evaluation is the merged model quantized again, with the merged head (a fresh one scores otherwise)
    from edgeft.schemes import parse_scheme

    pre = Preprocess.from_dict(config["preprocess"])
    kept = val_loss(load_vision_base(merged, parse_scheme("int8"), ["bar_h", "bar_v"]), image_bundle["val"], pre)
    fresh = val_loss(load_vision_base(merged, parse_scheme("int8"), ["a", "b"]), image_bundle["val"], pre)
    assert abs(s["before"]["eval_loss"] - kept) < 1e-6 < abs(s["before"]["eval_loss"] - fresh), (s["before"], kept, fresh)


def test_continued_run_updates_the_bundle_and_the_device_predicts_as_the_workstation(round_trip, image_bundle):
    tmp, b = round_trip["tmp"], image_bundle["bundle"]
    s = round_trip["import"]
    assert s["task"] == "image-classify" and s["steps"] == 2 and s["scheme"] == "int8"
    cfg = json.loads((tmp / "run2" / "config.json").read_text())
    # what the device's adapter fixes: one unfrozen block, the bundle's 32-pixel images, rank 4, its labels
    assert (cfg["unfreeze_blocks"], cfg["image_size"], cfg["lora_r"], cfg["labels"]) == (1, 32, 4, ["bar_h", "bar_v"])
    u = round_trip["update"]
    assert u["task"] == "image-classify" and u["tensors"] == 16 and u["scheme"] == "int8"
    assert u["parity"]["logits_rel"] < 1e-5 and u["parity"]["weights_max_abs"] == 0.0 and u["parity"]["seq"] == 32, u["parity"]
    upd = json.loads((tmp / "upd" / "update.json").read_text())
    assert upd["labels"] == ["bar_h", "bar_v"] and upd["task"] == "image-classify"
    a = round_trip["apply"]
    assert (a["generation"], a["promoted"], a["current"], a["previous"]) == (2, True, 2, 1)
    images = sorted(image_bundle["val"].rglob("*.png"))
    r, preds = device("predict", "--bundle", b, "--state", round_trip["state"], "--image", image_bundle["val"], "--json")
    assert r.exit_code == 0, r.output
    by_name = {p["image"]: p for p in preds}
    got = np.array([[by_name[str(p)]["probabilities"][k] for k in ("bar_h", "bar_v")] for p in images])
    want = workstation_probs(tmp / "run2", round_trip["base"], images)
    assert [by_name[str(p)]["label"] for p in images] == [["bar_h", "bar_v"][k] for k in want.argmax(-1)]
    assert np.abs(got - want).max() < 2e-6, np.abs(got - want).max()  # predict rounds to 6 decimals
    assert np.abs(want - workstation_probs(tmp / "gen", round_trip["base"], images)).max() > 1e-3  # the update, not generation 1, predicted


def test_image_update_and_text_bundle_refuse_each_other(tmp_path, round_trip, image_bundle, cls_bundle, cls_run):
    tmp = round_trip["tmp"]
    r = run("export", "--run", tmp / "run2", "--update-for", cls_bundle, "--out", tmp_path / "u")
    assert r.exit_code == 4 and "Traceback" not in r.output, r.output
    # one message: the base and the task, not the LoRA options and tensors that follow from them
    bert = json.loads((cls_bundle / "manifest.json").read_text())["base"]["fingerprint"].removeprefix("sha256:")[:12]
    assert r.output.splitlines()[0].endswith(f"the bundle holds base tiny-bert ({bert}); its task is image-classify, the bundle's is classify"), r.output
    assert not (tmp_path / "u").exists()
    r = run("export", "--run", cls_run, "--update-for", image_bundle["bundle"], "--out", tmp_path / "u")
    assert r.exit_code == 4 and "its task is classify, the bundle's is image-classify" in r.output, r.output
    r, _ = device("apply-update", "--bundle", cls_bundle, "--state", tmp_path / "s", tmp / "upd")
    assert r.exit_code == 8 and "its task is image-classify, the bundle's is classify; nothing was changed" in r.output, r.output
    assert not (tmp_path / "s" / "state.json").exists()
