"""What a run is: its resolved configuration (config.json, what --resume reads back), the data it
names, and what continuing from an earlier adapter fixes. The loop that runs it is train.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, UsageError

TASKS = ("classify", "causal-lm", "image-classify")


@dataclass
class TrainConfig:
    model: str
    data: str
    task: str  # "classify" | "causal-lm" | "image-classify"
    out: str
    eval_data: str | None = None
    val_fraction: float = 0.1
    target: str | None = None
    scheme: str = "nf4"
    text_field: str = "text"
    label_field: str = "label"
    max_seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None  # default: min(50, ceil(total / 10)) steps
    eval_before: bool = True
    patience: int | None = None
    metric: str | None = None
    reference_data: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    init_adapter: str | None = None  # continue from these LoRA (and head) weights, e.g. a device's
    labels: list[str] = field(default_factory=list)
    # image-classify only
    image_size: int | None = None  # default: the model folder's preprocessing (224 for EfficientNet-Lite0)
    augment: bool = True  # random crop, flip, brightness/contrast on the workstation (the device sees plain crops)
    unfreeze_blocks: int = 0  # train the last N blocks (and the head conv) whole, beside LoRA

    def __post_init__(self):
        if self.task not in TASKS:
            raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task != "image-classify" and (self.image_size or self.unfreeze_blocks):
            raise UsageError("--image-size and --unfreeze-blocks apply to --task image-classify only")
        if self.image_size is not None and self.image_size < 32:
            raise UsageError(f"--image-size must be >= 32, got {self.image_size}")
        if self.unfreeze_blocks < 0:
            raise UsageError(f"--unfreeze-blocks must be >= 0, got {self.unfreeze_blocks}")
        for name in ("lora_r", "batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise UsageError(f"--epochs must be > 0, got {self.epochs}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UsageError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.reference_data and self.task != "causal-lm":
            raise UsageError("--reference-data (the forgetting check) applies to --task causal-lm only")
        if self.lr is None:
            self.lr = 1e-3 if self.classifier else 2e-4
        if self.metric is None:
            self.metric = "accuracy" if self.classifier else "eval_loss"

    @property
    def classifier(self) -> bool:
        from ..datasets import LABELLED_TASKS

        return self.task in LABELLED_TASKS

    @property
    def higher_is_better(self) -> bool:
        return self.metric in ("accuracy", "macro_f1")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """The one schedule the device uses too (edgeft.schedule)."""
    from ..schedule import lr_at as schedule_lr

    return schedule_lr(step, total, cfg.lr, cfg.schedule, cfg.warmup_ratio)


def default_checkpoint_every(total_steps: int) -> int:
    """Every 50 steps or every tenth of the run, whichever is more often: a crash costs little
    time, and a LoRA checkpoint (adapter-sized) is cheap to write."""
    return max(1, min(50, math.ceil(total_steps / 10)))


def load_data(cfg: TrainConfig):
    """Parsed rows for train and validation (explicit file or seeded split)."""
    from .. import datasets

    if cfg.task == "image-classify":
        from ..images import load_image_rows

        paths, labels = load_image_rows(cfg.data, cfg.label_field)
        names = datasets.label_names(labels)
        rows = list(zip(paths, labels))
        if cfg.eval_data:
            val = list(zip(*load_image_rows(cfg.eval_data, cfg.label_field)))
            unknown = sorted({label for _, label in val} - set(names))
            if unknown:
                raise DataError(f"{cfg.eval_data} has labels not in the training data: {', '.join(unknown[:5])}", "every label must appear in --data")
        else:
            rows, val = datasets.split(rows, cfg.val_fraction, cfg.seed)
        return rows, val, names
    if cfg.task == "classify":
        texts, labels = datasets.load_classify(cfg.data, cfg.text_field, cfg.label_field)
        names = datasets.label_names(labels)
        rows = list(zip(texts, labels))
        if cfg.eval_data:
            vt, vl = datasets.load_classify(cfg.eval_data, cfg.text_field, cfg.label_field)
            unknown = sorted(set(vl) - set(names))
            if unknown:
                raise DataError(f"{cfg.eval_data} has labels not in the training data: {', '.join(unknown[:5])}", "every label must appear in --data")
            val = list(zip(vt, vl))
        else:
            rows, val = datasets.split(rows, cfg.val_fraction, cfg.seed)
        return rows, val, names
    rows = datasets.load_causal(cfg.data)
    val = datasets.load_causal(cfg.eval_data) if cfg.eval_data else None
    if val is None:
        rows, val = datasets.split(rows, cfg.val_fraction, cfg.seed)
    return rows, val, []


def adopt_adapter(cfg: TrainConfig, names: list[str]) -> list[str]:
    """Continuing from an adapter fixes its shape (rank, alpha, modules), for classifiers its label order,
    and for images the layers it trains whole (--unfreeze-blocks, read from modules_to_save: a device's
    adapter records no option) and the image size it was trained at (unless --image-size says otherwise)."""
    import json

    from .adapters import read_adapter_meta, resolve_base

    meta = read_adapter_meta(cfg.init_adapter)
    if meta["task"] != cfg.task:
        raise UsageError(f"{cfg.init_adapter} is a {meta['task']} adapter, not {cfg.task}", f"pass --task {meta['task']}")
    resolve_base(meta, cfg.model)  # --model must be the base the adapter was made for (fingerprint)
    peft = json.loads((Path(meta["adapter_dir"]) / "adapter_config.json").read_text())
    cfg.lora_r, cfg.lora_alpha = int(peft["r"]), float(peft["lora_alpha"])
    modules = peft.get("target_modules")
    cfg.target_modules = sorted(modules) if isinstance(modules, list) else cfg.target_modules
    if cfg.task == "image-classify":
        cfg.unfreeze_blocks = len({m.split(".")[1] for m in peft.get("modules_to_save") or [] if m.startswith("_blocks.")})
        cfg.image_size = cfg.image_size or (meta.get("preprocess") or {}).get("size")
    if not cfg.classifier:
        return names
    known = meta.get("labels") or []
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise DataError(f"{cfg.data} has labels the adapter was not trained with: {', '.join(unknown[:5])}",
                        f"the adapter knows: {', '.join(known)}; start a fresh run to add classes")
    return list(known)
