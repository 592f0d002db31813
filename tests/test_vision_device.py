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

    step = onnx.load(str(b / "portable" / "train_step.onnx"))
    ops = {n.op_type for n in step.graph.node}
    assert {"ConvTranspose", "Conv"} <= ops and all(n.domain in ("", "ai.onnx") for n in step.graph.node)
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


def test_image_bundles_give_freed_memory_back(image_bundle, cls_bundle, monkeypatch):
    """An image step runs without ONNX Runtime's arena (its high-water mark was a third of the step's
    peak); text keeps it (many small allocations: slower without). EDGEFT_MEMORY overrides either."""
    from edgeft.bundle import read_manifest
    from edgeft.device.runtime import lean_memory

    image, text = read_manifest(image_bundle["bundle"]), read_manifest(cls_bundle)
    monkeypatch.delenv("EDGEFT_MEMORY", raising=False)
    assert lean_memory(image) and not lean_memory(text)
    monkeypatch.setenv("EDGEFT_MEMORY", "fast")
    assert not lean_memory(image)
    monkeypatch.setenv("EDGEFT_MEMORY", "lean")
    assert lean_memory(text)
