"""A tiny EfficientNet-Lite folder (config-built, random weights and BN statistics) and tiny image
data sets (class folders and a jsonl), for the image tests. No real model, no hub."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# (repeats, kernel, stride, expand, in, out): every block kind of Lite0 (expand 1 and 6, k3/k5, stride 1/2, a skip)
TINY_STAGES = [(1, 3, 1, 1, 8, 8), (2, 3, 2, 4, 8, 12), (1, 5, 2, 4, 12, 16)]
TINY_PRE = {"size": 32, "resize": 36, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def build_vision_model_dir(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from edgeft.workstation.vision_model import EfficientNetLite, FrozenBatchNorm, lite_config

    torch.manual_seed(0)
    config = lite_config(TINY_STAGES, stem=8, head=32, preprocess=TINY_PRE)
    model = EfficientNetLite(config, 10)
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, FrozenBatchNorm):
            c = m.scale.numel()
            state.update({f"{name}.weight": 1 + 0.1 * torch.randn(c), f"{name}.bias": 0.1 * torch.randn(c),
                          f"{name}.running_mean": 0.1 * torch.randn(c), f"{name}.running_var": 0.5 + torch.rand(c)})
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and name != "classifier":
            state[f"{name}.weight"] = m.weight.detach().clone()
    state["_fc.weight"], state["_fc.bias"] = torch.randn(10, 32) * 0.1, torch.zeros(10)  # an ImageNet-style head, dropped
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def make_image(rng: np.random.Generator, label: int, size=(40, 48)) -> np.ndarray:
    """Class 0: a bright horizontal bar, class 1: a vertical one, on noise (learnable by a tiny net)."""
    h, w = size
    img = (rng.random((h, w)) * 80).astype(np.uint8)
    if label == 0:
        img[h // 2 - 3 : h // 2 + 3, :] = 230
    else:
        img[:, w // 2 - 3 : w // 2 + 3] = 230
    return img


def build_image_folder(root: Path, n_per_class: int = 12, seed: int = 0, classes=("bar_h", "bar_v")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(make_image(rng, c)).save(root / name / f"{i:03d}.png")
    return root


def build_image_jsonl(folder: Path, path: Path) -> Path:
    rows = [{"image": str(p.relative_to(path.parent)), "label": p.parent.name} for p in sorted(folder.rglob("*.png"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
