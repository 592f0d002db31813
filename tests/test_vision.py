"""--task image-classify on the workstation: preprocessing, data formats, the frozen quantized
backbone, LoRA on convolutions, training through the CLI. Tiny config-built backbone, no hub."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run
from vision_fixtures import TINY_PRE, build_image_folder, build_image_jsonl, build_vision_model_dir


@pytest.fixture(scope="session")
def tiny_effnet(tmp_path_factory):
    return build_vision_model_dir(tmp_path_factory.mktemp("effnet") / "tiny-lite")


@pytest.fixture(scope="session")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    train = build_image_folder(root / "train", 12, seed=0)
    val = build_image_folder(root / "val", 4, seed=1)
    return {"train": train, "val": val, "jsonl": build_image_jsonl(train, root / "train.jsonl")}


def train_images(model, data, out, *extra):
    return run("train", "--model", model, "--data", data, "--task", "image-classify", "--out", out, "--batch-size", 4, "--quiet", *extra)


# -- preprocessing (torch-free, shared with the device) -------------------------
def test_preprocess_shapes_and_values(tmp_path):
    from PIL import Image

    from edgeft.images import Preprocess

    pre = Preprocess.from_dict(TINY_PRE)
    gray = (np.arange(40 * 48) % 256).astype(np.uint8).reshape(40, 48)
    Image.fromarray(gray).save(tmp_path / "g.png")
    a, b = pre(tmp_path / "g.png"), pre(gray)  # a file and a camera frame give the same tensor
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], a[1])  # gray -> RGB
    rgba = np.dstack([np.stack([gray] * 3, -1), np.full((40, 48), 255, np.uint8)])
    np.testing.assert_array_equal(pre(rgba), a)
    np.testing.assert_allclose(pre(gray.astype(np.float32) / 255.0), a, atol=1e-6)
    big = Preprocess.from_dict(TINY_PRE, size=64)
    assert (big.size, big.resize) == (64, 72)


def test_data_formats_and_errors(tmp_path, image_data):
    from edgeft.errors import DataError
    from edgeft.images import load_image_rows

    paths, labels = load_image_rows(image_data["train"])
    paths2, labels2 = load_image_rows(image_data["jsonl"])
    assert sorted(labels) == sorted(labels2) and len(paths) == 24 and set(labels) == {"bar_h", "bar_v"}
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "bad.png", "label": "x"}) + "\n")
    from edgeft.images import open_image

    with pytest.raises(DataError, match="not a readable image"):
        open_image(tmp_path / "bad.png")
    with pytest.raises(DataError, match="not found"):
        load_image_rows(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_rows(tmp_path / "empty")
    (tmp_path / "missing.jsonl").write_text(json.dumps({"image": "gone.png", "label": "x"}) + "\n")
    with pytest.raises(DataError, match="not found"):
        load_image_rows(tmp_path / "missing.jsonl")


# -- the frozen base --------------------------------------------------------------
def test_base_is_quantized_per_channel_and_frozen(tiny_effnet):
    import torch

    from edgeft.schemes import parse_scheme
    from edgeft.workstation.vision_model import FrozenBatchNorm, load_vision_base

    keep: dict = {}
    model = load_vision_base(tiny_effnet, parse_scheme("int8"), ["a", "b"], keep_codes=keep)
    assert "_blocks.0._depthwise_conv" in keep and "_conv_stem" in keep and "classifier" not in keep
    w = model._blocks[1]._expand_conv.weight.detach()
    codes = keep["_blocks.1._expand_conv"]
    np.testing.assert_array_equal((codes.codes.float() * codes.scale).reshape(w.shape).numpy(), w.numpy())  # exactly the codes' values
    assert codes.scale.shape == (w.shape[0], 1)  # one scale per output channel
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    bn = model._bn0
    assert isinstance(bn, FrozenBatchNorm) and not list(bn.parameters())
    model.train()  # training mode changes nothing: the statistics are frozen
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y_train = model.features(x)
        model.eval()
        np.testing.assert_array_equal(model.features(x).numpy(), y_train.numpy())


def test_frozen_bn_matches_torch_eval_bn():
    import torch

    from edgeft.workstation.vision_model import FrozenBatchNorm

    bn = torch.nn.BatchNorm2d(5, eps=1e-3).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    fb = FrozenBatchNorm(5, 1e-3)
    fb.load_bn(bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var)
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(fb(x), bn(x), rtol=1e-5, atol=1e-6)


# -- training through the CLI -----------------------------------------------------
def test_train_image_folder(tmp_path, tiny_effnet, image_data):
    out = tmp_path / "run"
    r = train_images(tiny_effnet, image_data["train"], out, "--eval-data", image_data["val"], "--max-steps", 6, "--lora-r", 4, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["task"] == "image-classify" and s["scheme"] == "int8" and s["steps"] == 6
    meta = json.loads((out / "adapter" / "edgeft.json").read_text())
    assert meta["labels"] == ["bar_h", "bar_v"] and meta["preprocess"]["size"] == 32
    peft = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(peft["target_modules"]) == {"_expand_conv", "_project_conv", "_conv_head"}
    assert (out / "report.md").is_file() and (out / "metrics.jsonl").is_file()
    from safetensors.numpy import load_file

    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("_expand_conv.lora_A" in k for k in keys) and any("classifier" in k for k in keys)


def test_train_jsonl_unfreeze_and_resume(tmp_path, tiny_effnet, image_data):
    out = tmp_path / "run"
    r = train_images(tiny_effnet, image_data["jsonl"], out, "--max-steps", 4, "--unfreeze-blocks", 1, "--image-size", 48,
                     "--no-augment", "--checkpoint-every", 2, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["trainable_params"] > 32 * 2 + 2  # the last block's convolutions and the head conv train whole
    assert json.loads((out / "adapter" / "edgeft.json").read_text())["preprocess"]["size"] == 48
    r = run("train", "--resume", out, "--max-steps", 6, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 6


@pytest.mark.parametrize("case", ["bad image", "text model", "missing folder"])
def test_bad_input_is_one_message(tmp_path, tiny_effnet, tiny_bert, image_data, case):
    data, model = image_data["train"], tiny_effnet
    if case == "bad image":
        import shutil

        data = tmp_path / "imgs"
        shutil.copytree(image_data["train"], data)
        (data / "bar_h" / "broken.png").write_bytes(b"\x89PNG garbage")
    elif case == "text model":
        model = tiny_bert
    else:
        data = tmp_path / "nowhere"
    r = train_images(model, data, tmp_path / "run", "--max-steps", 1)
    assert r.exit_code in (3, 4), r.output
    assert "Traceback" not in r.output and not (tmp_path / "run").exists()
