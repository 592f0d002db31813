"""EfficientNet-Lite as a small torch module, and its frozen base as the device will hold it.

Lite = EfficientNet without squeeze-excite, with ReLU6 and a fixed stem (32) and head (1280)
(Google's edge variant). Parameter names are those of lukemelas' `efficientnet_pytorch`
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`,
`_conv_head`, `_bn1`), so the converted ImageNet weights load as they are; the ImageNet
`_fc` is dropped for a new `classifier` over the data's labels.

A model folder (tools/prepare_assets.py builds assets/models/efficientnet-lite0/):
  config.json        {"model_type": "efficientnet-lite", "blocks": [...], "preprocess": {...}, ...}
  model.safetensors  the weights, fp32

A merged model (`edgeft import --merge`, `save_merged`) is such a folder too: every weight fp32 with
the adapter folded in (LoRA added, layers trained whole replaced), the BatchNorm tensors as the base
had them, and the trained head as `classifier.weight/bias` with its labels in config.json
(`"labels"`). It is a base like any other: `--model` of a new run, whose head starts from the
merged one for every label it shares with it (by name; the others start fresh).

The frozen base (`load_vision_base`):
- BatchNorm runs with its frozen ImageNet statistics, as the device runs it: each BN becomes
  `FrozenBatchNorm`, y = x * scale + shift with scale = gamma / sqrt(var + eps) and
  shift = beta - mean * scale precomputed (two elementwise ops in every graph).
- Every convolution and linear weight but the new head is rounded to the scheme (int8: one
  scale per output channel over in * kh * kw) with quantize.quantize, the same codes the bundle
  packs, and held at those exact values (the base is 18 MB in fp32, so no packed twin is needed).
  scheme None keeps the folder's fp32 values (a merged model as it was saved).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelError

MODEL_TYPE = "efficientnet-lite"
# (repeats, kernel, stride, expand, in, out) per stage: EfficientNet-B0's, which Lite0 keeps
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
DEFAULT_TARGETS = ("_expand_conv", "_project_conv", "_conv_head")  # every pointwise conv (PEFT's LoRA cannot take depthwise)


def lite_config(stages=LITE0_STAGES, stem: int = 32, head: int = 1280, eps: float = 1e-3, preprocess: dict | None = None) -> dict:
    return {"model_type": MODEL_TYPE, "stem": stem, "head": head, "bn_eps": eps, "dropout": 0.2,
            "blocks": [[k, s if i == 0 else 1, e, cin if i == 0 else cout, cout] for (r, k, s, e, cin, cout) in stages for i in range(r)],
            "preprocess": preprocess or {"size": 224, "resize": 256, "mean": [0.498, 0.498, 0.498], "std": [0.502, 0.502, 0.502]}}


class FrozenBatchNorm(torch.nn.Module):
    """Inference-mode BatchNorm as one scale and shift per channel (buffers: never trained)."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def load_bn(self, weight, bias, mean, var) -> None:
        scale = weight / torch.sqrt(var + self.eps)
        self.scale.copy_(scale)
        self.shift.copy_(bias - mean * scale)

    def forward(self, x):  # (B, C, H, W)
        return x * self.scale[:, None, None] + self.shift[:, None, None]


def _conv(cin, cout, k, stride=1, groups=1):
    return torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)


class MBConv(torch.nn.Module):
    def __init__(self, k, stride, expand, cin, cout, eps):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv(cin, mid, 1), FrozenBatchNorm(mid, eps)
        self._depthwise_conv, self._bn1 = _conv(mid, mid, k, stride, groups=mid), FrozenBatchNorm(mid, eps)
        self._project_conv, self._bn2 = _conv(mid, cout, 1), FrozenBatchNorm(cout, eps)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite(torch.nn.Module):
    """(B, 3, H, W) normalized pixels -> (B, num_labels) logits."""

    def __init__(self, config: dict, num_labels: int):
        super().__init__()
        self.config = config
        eps = config.get("bn_eps", 1e-3)
        stem, head = config["stem"], config["head"]
        self._conv_stem, self._bn0 = _conv(3, stem, 3, 2), FrozenBatchNorm(stem, eps)
        self._blocks = torch.nn.ModuleList(MBConv(*b, eps) for b in config["blocks"])
        last = config["blocks"][-1][-1]
        self._conv_head, self._bn1 = _conv(last, head, 1), FrozenBatchNorm(head, eps)
        self.dropout = torch.nn.Dropout(config.get("dropout", 0.2))
        self.classifier = torch.nn.Linear(head, num_labels)

    def features(self, x):
        h = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, H/32, W/32)
        return h.mean(dim=(2, 3))  # (B, 1280)

    def forward(self, pixel_values):
        return self.classifier(self.dropout(self.features(pixel_values)))


def read_config(path: Path) -> dict:
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read config.json ({e})") from None
    if config.get("model_type") != MODEL_TYPE:
        raise ModelError(f"{path}: model_type {config.get('model_type')!r} is not an image backbone edgeft knows",
                         f"--task image-classify takes a {MODEL_TYPE} folder (tools/prepare_assets builds assets/models/efficientnet-lite0)")
    return config


def adapter_preprocess(meta: dict, base_path):
    """The preprocessing an adapter was trained with (its edgeft.json's, a device's included), else its base folder's."""
    from ..images import Preprocess

    return Preprocess.from_dict(meta.get("preprocess") or read_config(base_path).get("preprocess", {}))


def quantized_names(model: EfficientNetLite) -> list[str]:
    """Every conv and linear of the backbone: all but the new head."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and n != "classifier"]


def load_vision_base(path, scheme, labels: list[str], keep_codes: dict | None = None, seed: int = 0) -> EfficientNetLite:
    """The frozen backbone quantized as the device holds it (scheme None: as stored), with a head over
    `labels`: fresh, or a merged model's rows for the labels it knows."""
    from safetensors.torch import load_file

    from .quantize import dequantize, fake_quantize, quantize

    path = Path(path)
    config = read_config(path)
    torch.manual_seed(seed)
    model = EfficientNetLite(config, len(labels))
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a bad or missing file)
        raise ModelError(f"{path}: cannot read model.safetensors ({str(e).splitlines()[0]})") from None
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in modules.items():
            if isinstance(module, FrozenBatchNorm):
                try:
                    module.load_bn(*(state[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")))
                except KeyError as e:
                    raise ModelError(f"{path}: weight {e} missing for {name}") from None
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name != "classifier":
                w = state.get(f"{name}.weight")
                if w is None or tuple(w.shape) != tuple(module.weight.shape):
                    raise ModelError(f"{path}: {name}.weight is {None if w is None else tuple(w.shape)}, the config makes {tuple(module.weight.shape)}")
                flat = w.reshape(w.shape[0], -1)  # (out, in/groups * kh * kw): one int8 scale per output channel
                if scheme is None:
                    module.weight.copy_(w)
                elif scheme.kind == "int":
                    codes = quantize(flat, scheme)
                    codes.view = tuple(w.shape)  # export packs (out, in/groups * kh * kw) and reshapes back
                    if keep_codes is not None:
                        keep_codes[name] = codes
                    module.weight.copy_(dequantize(codes).reshape(w.shape))
                else:
                    module.weight.copy_(fake_quantize(flat, scheme).reshape(w.shape))
        _keep_head(model.classifier, config.get("labels") or [], labels, state)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    return model


def _keep_head(head: torch.nn.Linear, known: list[str], labels: list[str], state: dict) -> None:
    """A merged model's head rows (and biases) for the labels it shares with `labels`, by name."""
    if "classifier.weight" not in state or tuple(state["classifier.weight"].shape) != (len(known), head.in_features):
        return
    for i, label in enumerate(labels):
        if label in known:
            head.weight[i] = state["classifier.weight"][known.index(label)]
            head.bias[i] = state["classifier.bias"][known.index(label)]


def save_merged(model: EfficientNetLite, base_path, labels: list[str], folder: Path) -> None:
    """A merged model as a model folder (module docstring): the base's config with the head's labels,
    its BatchNorm tensors unchanged (FrozenBatchNorm keeps only their scale and shift), every conv and
    linear weight and the head from `model`."""
    from safetensors.torch import load_file, save_file

    base_path, folder = Path(base_path), Path(folder)
    norms = {n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm)}
    bn = {k: v for k, v in load_file(str(base_path / "model.safetensors")).items() if k.rpartition(".")[0] in norms}
    weights = {f"{n}.{k}": p.detach().float().contiguous() for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for k, p in m.named_parameters(recurse=False)}
    save_file({**bn, **weights}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**read_config(base_path), "labels": list(labels)}, indent=2) + "\n", encoding="utf-8")


def unfreeze_names(model: EfficientNetLite, last_blocks: int) -> list[str]:
    """Module names trained whole (PEFT modules_to_save) when the last `last_blocks` blocks are unfrozen."""
    if last_blocks <= 0:
        return []
    n = len(model._blocks)
    names = [f"_blocks.{i}.{c}" for i in range(max(0, n - last_blocks), n) for c in ("_expand_conv", "_depthwise_conv", "_project_conv")
             if hasattr(model._blocks[i], c)]
    return names + ["_conv_head"]
