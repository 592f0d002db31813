"""Loss and evaluation per task, wrapped as one nn.Module so DDP sees a single forward.

Causal LM: the vocabulary projection runs only on positions that carry a label.
For instruction data that skips the prompt, which on a small model is a large
share of the step (SmolLM2-135M: the tied 49k-word head is ~22% of its FLOPs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..encode import IGNORE
from ..metrics import classification_metrics


def causal_lm_loss(hf, input_ids, attention_mask, labels, dtype=torch.float32):
    """(mean loss over labelled tokens, number of labelled tokens) of a Hugging Face causal LM."""
    hidden = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    return causal_lm_loss_on_hidden(hf, hidden, labels, dtype)


def vocab_logits(hf, hidden, dtype=torch.float32):
    """The model's head over hidden states, as its own forward computes it (softcapping included),
    in `dtype` from the head's output on (validate's second reference: float64)."""
    logits = hf.get_output_embeddings()(hidden).to(dtype)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def causal_lm_loss_on_hidden(hf, hidden, labels, dtype=torch.float32):
    """causal_lm_loss from the decoder's last hidden states (B, T, H); the log-softmax in `dtype`.

    Index positions, not a boolean mask: it exports to ONNX as NonZero + Gather, whose
    gradient ONNX Runtime has, so the device graph gets the same saving."""
    target = labels[:, 1:].reshape(-1)  # token t predicts t+1
    keep = target != IGNORE
    where = torch.nonzero(keep).squeeze(1)
    picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, where)  # (N, H)
    logits = vocab_logits(hf, picked, dtype)  # (N, V)
    n = keep.sum()
    # log_softmax + gather rather than F.cross_entropy (the same value): ONNX Runtime's fused
    # SoftmaxCrossEntropyLoss sums exp over the vocabulary less accurately than its LogSoftmax,
    # which on Gemma's 262k words put its gradients 1.3e-4 away from torch's (LogSoftmax: torch's own error).
    picked_logp = F.log_softmax(logits, dim=-1).gather(1, target.index_select(0, where).unsqueeze(1))  # (N, 1)
    return -picked_logp.sum() / n.clamp(min=1), n


class CausalLMObjective(torch.nn.Module):
    def __init__(self, peft_model):
        super().__init__()
        self.model = peft_model

    def forward(self, input_ids, attention_mask, labels):
        return causal_lm_loss(self.model.get_base_model(), input_ids, attention_mask, labels)


class ClassifyObjective(torch.nn.Module):
    def __init__(self, peft_model):
        super().__init__()
        self.model = peft_model

    def forward(self, input_ids, attention_mask, labels):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, C)
        return F.cross_entropy(logits, labels), logits


def make_objective(task: str, peft_model) -> torch.nn.Module:
    return ClassifyObjective(peft_model) if task == "classify" else CausalLMObjective(peft_model)


@torch.no_grad()
def evaluate(objective, batches, task: str, num_labels: int = 0, autocast=None) -> dict:
    """Loss (+ accuracy and macro-F1, or perplexity). Sums are all-reduced under DDP."""
    import contextlib

    objective.eval()
    device = next(p.device for p in objective.parameters())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
        with autocast() if autocast else contextlib.nullcontext():
            loss, extra = objective(**batch)
        if task == "classify":
            n = batch["labels"].numel()
            confusion.index_put_((batch["labels"], extra.argmax(-1)), torch.ones(n, dtype=torch.float64, device=device), accumulate=True)
        else:
            n = extra
        loss_sum += loss.double() * n
        count += n
    if torch.distributed.is_initialized():
        for t in (loss_sum, count, confusion):
            torch.distributed.all_reduce(t)
    objective.train()
    loss = (loss_sum / count.clamp(min=1)).item()
    if task != "classify":
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return {"eval_loss": loss, **classification_metrics(confusion.cpu().numpy())}
