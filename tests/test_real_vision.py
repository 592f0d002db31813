"""EfficientNet-Lite0 (ImageNet weights) on elpv solar cells (CC-BY-NC-SA-4.0), from tools/prepare_assets:
the workstation learns, the Pi 5 bundle matches torch, the device trains and predicts. Slow."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets/models/efficientnet-lite0"
ELPV = ROOT / "assets/data/elpv"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (MODEL.is_dir() and ELPV.is_dir()), reason="run tools/prepare_assets first")]


def cli(*args):
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_effnet_lite0_elpv_end_to_end(tmp_path):
    s = cli("train", "--model", MODEL, "--task", "image-classify", "--data", ELPV / "train.jsonl", "--eval-data", ELPV / "val.jsonl",
            "--target", "raspberry-pi-5-8gb", "--image-size", 128, "--max-steps", 20, "--eval-every", 10, "--out", tmp_path / "run", "--quiet")
    assert s["scheme"] == "int8" and s["total_params"] > 3_500_000
    assert s["best"] >= 0.7  # ImageNet features + 20 steps: well above the 2/3 'functional' share of the val set
    e = cli("export", "--run", tmp_path / "run", "--target", "raspberry-pi-5-8gb", "--out", tmp_path / "bundle")
    assert e["parity"]["grad_rel"] < 1e-4 and e["parity"]["portable_grad_rel"] < 1e-4
    d = cli("device", "train", "--bundle", tmp_path / "bundle", "--data", ELPV / "gen1", "--max-steps", 3, "--quiet")
    assert d["steps"] == 3
    from edgeft.device.learner import Learner

    frame = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(next((ELPV / "gen1" / "defective").glob("*.png"))))
    p = Learner(tmp_path / "bundle").predict(frame)
    assert p["label"] in ("defective", "functional")


def test_converted_weights_recognise_an_imagenet_photo():
    """The architecture and the converted weights agree: matplotlib's Grace Hopper portrait gets
    ImageNet's academic gown / mortarboard / Windsor tie / suit / bow tie / military uniform."""
    import matplotlib.cbook
    import torch
    from safetensors.torch import load_file

    from edgeft.images import Preprocess
    from edgeft.workstation.vision_model import EfficientNetLite, FrozenBatchNorm, read_config

    cfg = read_config(MODEL)
    model, state = EfficientNetLite(cfg, 1000).eval(), load_file(str(MODEL / "model.safetensors"))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, FrozenBatchNorm):
                m.load_bn(*(state[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")))
            elif isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(state[f"{name}.weight"])
        model.classifier.weight.copy_(state["_fc.weight"])
        model.classifier.bias.copy_(state["_fc.bias"])
        x = torch.from_numpy(Preprocess.from_dict(cfg["preprocess"])(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
        top = set(model(x[None])[0].topk(5).indices.tolist())
    assert (400 in top or 652 in top) and len(top & {400, 457, 652, 667, 834, 906}) >= 4, top
