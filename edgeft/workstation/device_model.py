"""The workstation model as the device sees it, and the torch graphs the device runs.

export, validate and merge all need the same torch model: the quantized base rebuilt in fp32
(packed and bitsandbytes layers swapped for their dequantized weights), the adapter on top, dropout off,
GELU-tanh in plain ops. Export traces `LossGraph` and `LogitsGraph` of it into ONNX, validate
runs them again as the reference the bundle must match, merge folds the adapter into it. They
live here, in one place, so the three can never drift apart; `peft_key` and `PREFIX` are how
the ONNX names of its parameters map back to PEFT's.
"""

from __future__ import annotations

import torch

from .objective import causal_lm_loss

PREFIX = "model."  # the export wrappers hold the PEFT model as `.model`


class LossGraph(torch.nn.Module):
    """(input_ids, attention_mask, labels) -> mean loss: what the device trains on."""

    def __init__(self, model, task: str, head_dtype=torch.float32):
        super().__init__()
        self.model, self.task, self.head_dtype = model, task, head_dtype  # head_dtype: the log-softmax's (causal LM)

    def forward(self, input_ids, attention_mask, labels):
        if self.task != "classify":  # the vocabulary projection only where a label is, as in training
            return causal_lm_loss(self.model.get_base_model(), input_ids, attention_mask, labels, self.head_dtype)[0]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return torch.nn.functional.cross_entropy(logits, labels)


class LogitsGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def peft_key(onnx_name: str) -> str:
    """ONNX initializer name -> key in adapter_model.safetensors (PEFT drops the adapter name)."""
    name = onnx_name.removeprefix(PREFIX)
    return name.replace(".modules_to_save.default.", ".").replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def device_model(adapter_dir, scheme, keep: dict, base_model: str | None = None, labels: list[str] | None = None):
    """The workstation model as the device will run it: fp32 torch, packed and bnb layers replaced
    by plain ones holding their dequantized values (the same values, bit for bit), dropout off
    (the device graph is deterministic). `keep` receives each quantized tensor's codes."""
    from .adapters import load_adapted
    from .packed import unpack_model

    model, tokenizer, meta = load_adapted(adapter_dir, scheme, "cpu", base_model, labels, keep_codes=keep, trainable=True)
    unpack_model(model)  # ONNX export traces plain nn.Linear / nn.Embedding; merge writes into .weight
    hf = model.get_base_model()
    hf.set_attn_implementation("eager")  # plain ops the legacy exporter and ORT's gradient builder know
    bnb_linear = _bnb_linear4bit()
    for name, module in list(model.named_modules()):
        if bnb_linear is not None and isinstance(module, bnb_linear):  # not PEFT's LoRA wrapper of the same name
            from .quantize import bnb_dequantized_weight

            keep[name.removeprefix("base_model.model.").removesuffix(".base_layer")] = (module.weight.data.clone(), module.weight.quant_state)
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(bnb_dequantized_weight(module))
                if module.bias is not None:
                    plain.bias.copy_(module.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain.requires_grad_(False))
        elif isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif hasattr(module, "_gelu_tanh_python"):
            # transformers' GELUTanh calls F.gelu(approximate="tanh"); its opset-17 export trips ONNX Runtime's
            # pre-training graph optimizer ("Graph::RemoveEdge ... Argument mismatch", Gemma 1-3). The same
            # formula written out in plain ops exports cleanly.
            module.act = module._gelu_tanh_python
    return model.eval(), tokenizer, meta


def _bnb_linear4bit():
    try:
        import bitsandbytes

        return bitsandbytes.nn.Linear4bit
    except ImportError:
        return None


def sample_batch(tokenizer, task: str, labels: list[str], batch: int, seq: int, seed: int = 0) -> dict:
    """Deterministic token batch for export and validation (real tokenizer, real vocab range)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(len(tokenizer), 30000), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # one padded row keeps masking on the checked path
    if task == "classify":
        y = torch.randint(0, len(labels), (batch,), generator=g)
    else:
        y = ids.clone()
        y[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": y}
