"""What `edgeft train --task image-classify` adds to the text trainer (train.py): image batches
(with augmentation), LoRA on the backbone's convolutions, and the loss.

Batches are a pure function of the step, as for text: micro-batch i takes the rows
`encode.micro_batch_ids` picks and augments them with a generator seeded by (seed, i), so
--resume is exact. Each image is decoded and resized once (edgeft.images, the device's own
preprocessing) and kept as uint8; augmentation works on that array, before the crop:
a random crop position, a horizontal flip, brightness and contrast jitter. Evaluation uses the
plain centre crop, as the device does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..images import Preprocess, open_image


def augment(resized: np.ndarray, pre: Preprocess, rng: np.random.Generator) -> np.ndarray:
    """uint8 (h, w, 3) resized image -> a randomly cropped, flipped, jittered (size, size, 3) uint8."""
    h, w = resized.shape[:2]
    crop = pre.crop(resized, int(rng.integers(0, h - pre.size + 1)), int(rng.integers(0, w - pre.size + 1)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    x = crop.astype(np.float32)
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1) * 255
    x = (x - x.mean()) * contrast + x.mean() + brightness
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class ImageRows:
    """Image paths and label ids; each image decoded and resized once, on first use."""

    def __init__(self, paths, labels: list[str], names: list[str], pre: Preprocess):
        self.paths, self.pre = list(paths), pre
        self.targets = [names.index(label) for label in labels]
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def resized(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = self.pre.resized(open_image(self.paths[i]))
        return self._cache[i]

    def check(self) -> None:
        """Decode every image up front: a bad file fails before training, named (edgeft.images)."""
        for i in range(len(self)):
            self.resized(i)

    def batch(self, ids, rng: np.random.Generator | None = None) -> dict:
        crops = [augment(self.resized(i), self.pre, rng) if rng is not None else self.pre.crop(self.resized(i)) for i in ids]
        return {"pixel_values": np.stack([self.pre.normalize(c) for c in crops]),
                "labels": np.asarray([self.targets[i] for i in ids], dtype=np.int64)}

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        mine = list(range(len(self)))[rank::world]
        for a in range(0, len(mine), batch_size):
            yield self.batch(mine[a : a + batch_size])


def attach_vision_lora(model, r: int, alpha: float, dropout: float, target_modules, modules_to_save: list[str]):
    """PEFT LoRA on the backbone's convolutions and linears (Conv2d: lora_A a conv of the layer's
    kernel and stride, lora_B 1x1), the new head and any unfrozen layers trained whole."""
    from peft import LoraConfig, get_peft_model

    from ..errors import UsageError
    from .vision_model import DEFAULT_TARGETS

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules or DEFAULT_TARGETS),
                        modules_to_save=["classifier", *modules_to_save])
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot attach LoRA: {e}".splitlines()[0], f"default modules: {','.join(DEFAULT_TARGETS)} (depthwise convolutions "
                         "take no LoRA; unfreeze them with --unfreeze-blocks)") from None
    for name, p in peft_model.named_parameters():  # unfrozen layers: their copy trains (their weights start at the quantized values)
        if ".modules_to_save." in name:
            p.requires_grad_(True)
    return peft_model


class ImageObjective(torch.nn.Module):
    def __init__(self, peft_model):
        super().__init__()
        self.model = peft_model

    def forward(self, pixel_values, labels):
        logits = self.model(pixel_values).float()  # (B, C)
        return F.cross_entropy(logits, labels), logits
