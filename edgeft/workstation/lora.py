"""Attach LoRA adapters (and a trainable head for classify) in PEFT format."""

from __future__ import annotations

import torch

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
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the base model
        from ..errors import UsageError

        raise UsageError(f"cannot attach LoRA: {e}".splitlines()[0], f"default modules for this model: {','.join(info.target_modules)}") from None
    use_fast_dropout(peft_model)
    return peft_model


def use_fast_dropout(peft_model) -> None:
    """Fuse LoRA's input dropout into lora_A, keeping a 1-byte mask instead of a copy.

    PEFT computes lora_B(lora_A(dropout(x))): autograd then holds, for every LoRA
    layer, a fresh fp32 copy of the dropped input (B x T x in) for lora_A's weight
    gradient. On SmolLM2-135M (7 LoRA layers per block) that was ~560 MiB of a
    ~3 GiB step. The fused op keeps x itself (shared by q/k/v and by gate/up) and a
    bool mask, and rebuilds the dropped input in backward. Same math, same
    parameter names, so PEFT saves and loads it unchanged.
    """
    for module in peft_model.modules():
        drops, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(drops, torch.nn.ModuleDict) or not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and type(lora_a[name]) is torch.nn.Linear:
                lora_a[name] = DropoutLinear.wrap(lora_a[name], drop.p)
                drops[name] = torch.nn.Identity()


class _DropoutMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p):
        keep = torch.rand_like(x) >= p  # P(keep) = 1 - p
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(x, keep, weight)
        ctx.scale = scale
        return torch.nn.functional.linear(x * keep * scale, weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad):
        x, keep, weight = ctx.saved_tensors
        grad_x = grad_w = None
        # under autocast (CUDA bf16) grad is bf16 while weight and x may be fp32: compute in grad's
        # dtype, as autocast's linear does; autograd casts grad_x back to x's dtype
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)) * keep * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * ctx.scale).reshape(-1, x.shape[-1]).to(grad.dtype)  # (N, in)
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ dropped).to(weight.dtype)  # (r, in)
        return grad_x, grad_w, None


class DropoutLinear(torch.nn.Linear):
    """lora_A with its dropout inside; a plain Linear in eval mode."""

    @classmethod
    def wrap(cls, linear: torch.nn.Linear, p: float) -> "DropoutLinear":
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.out_features, fused.p = linear.in_features, linear.out_features, p
        fused.weight = linear.weight
        fused.register_parameter("bias", None)
        return fused

    def forward(self, x):
        if not self.training:
            return torch.nn.functional.linear(x, self.weight)
        return _DropoutMatmul.apply(x, self.weight, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def count_parameters(model) -> tuple[int, int]:
    from .packed import packed_stats

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + packed_stats(model)[0]  # a packed base holds codes, not parameters
    return trainable, total
