"""Attach LoRA adapters (and a trainable head for classify) in PEFT format."""

from __future__ import annotations

from .load import ModelInfo


def attach_lora(model, info: ModelInfo, task: str, r: int, alpha: float, dropout: float, target_modules: tuple[str, ...] | None):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules or info.target_modules),
        modules_to_save=[info.head] if task == "classify" else None,
        task_type=TaskType.SEQ_CLS if task == "classify" else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the base model
        from ..errors import UsageError

        raise UsageError(f"cannot attach LoRA: {e}".splitlines()[0], f"default modules for this model: {','.join(info.target_modules)}") from None


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
