"""Load a local Hugging Face model folder with its base quantized as the device will run it.

nf4 goes through bitsandbytes `Linear4bit` (the QLoRA recipe). The int schemes
replace each frozen linear weight by its dequantized device value, so training
sees exactly what `DequantizeLinear` on the device will compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, ResourceError
from ..schemes import QuantScheme

# model_type -> (default LoRA target modules, classification head name)
ARCHITECTURES: dict[str, tuple[tuple[str, ...], str]] = {
    **{
        t: (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "score")
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2")
    },
    **{t: (("query", "key", "value", "dense"), "classifier") for t in ("bert", "roberta", "xlm-roberta")},
    "distilbert": (("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"), "classifier"),
}
CAUSAL_HEAD = "lm_head"


@dataclass
class ModelInfo:
    path: Path
    model_type: str
    architectures: list[str]
    target_modules: tuple[str, ...]
    head: str  # classification head name (classify) or lm_head


def inspect_model_dir(path: str | Path, task: str) -> ModelInfo:
    """Fail early, with a plain message, before any heavy import."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model folder not found: {path}", "pass a local Hugging Face model folder (config.json + *.safetensors)")
    if not path.is_dir():
        raise ModelError(f"{path} is a file, not a model folder", "pass the folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)", "use a folder written by save_pretrained; see tools/prepare_assets")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{config_file}: not valid JSON ({e})") from None
    if not any(path.glob("*.safetensors")):
        hint = "convert it with save_pretrained(..., safe_serialization=True)" if any(path.glob("*.bin")) else "the folder needs model.safetensors"
        raise ModelError(f"{path} has no .safetensors weights (edgeft never loads pickled .bin files)", hint)
    model_type = config.get("model_type", "")
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"unsupported architecture {model_type or '(none)'!r} in {config_file}",
            f"supported: {', '.join(sorted(ARCHITECTURES))}",
        )
    modules, cls_head = ARCHITECTURES[model_type]
    return ModelInfo(path, model_type, config.get("architectures") or [], modules, cls_head if task == "classify" else CAUSAL_HEAD)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ResourceError("CUDA was requested but no CUDA device is available", "use --device cpu, or install a CUDA build of torch")
    return requested


def load_base(info: ModelInfo, task: str, scheme: QuantScheme, device: str, labels: list[str] | None = None, trust_remote_code: bool = False,
              keep_codes: dict | None = None):
    """The frozen, quantized base: everything but the task head is frozen here; LoRA comes after.

    `keep_codes`, when given, receives each rounded tensor's codes (export needs them;
    training does not pay for them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected for classify
    kwargs: dict = {"trust_remote_code": trust_remote_code, "use_safetensors": True, "dtype": torch.float32}
    if task == "classify":
        auto = AutoModelForSequenceClassification
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    else:
        auto = AutoModelForCausalLM
    if scheme.kind == "nf4":
        compute = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=[info.head],
        )
        kwargs["device_map"] = {"": device}
    try:
        model = auto.from_pretrained(str(info.path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not load {info.path}: {e}".splitlines()[0], "check the folder is a complete save_pretrained output") from None
    if scheme.kind == "nf4":
        keep_bnb_trainable(model)
    quantize_frozen(model, scheme, skip=info.head, keep_codes=keep_codes)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def keep_bnb_trainable(model) -> None:
    """bitsandbytes 0.50 repacks a Linear4bit weight into an inference-only CPU layout
    the first time it runs in eval mode (on AVX512-BF16 CPUs); training afterwards
    fails ("a view of a leaf Variable ... in-place"), and eval would compute with a
    different kernel than training. Keep the one, trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantized_weight_names(model, skip: str) -> list[str]:
    """Modules whose frozen weight the device holds quantized: every linear layer but the
    task head, and the token embedding table (tied to lm_head in most causal LMs, and
    over half of a small encoder's parameters, so it must not stay fp32 on the device)."""
    import torch

    vocab = getattr(model.config, "vocab_size", None)
    names = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == skip and module is not model.get_output_embeddings():
            continue  # a trainable classification head stays fp32
        if isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Embedding) and module.num_embeddings == vocab):
            names.append(name)
    return names


def quantize_frozen(model, scheme: QuantScheme, skip: str, keep_codes: dict | None = None) -> None:
    """Replace each frozen weight by the exact values the device graph will compute.

    bitsandbytes already holds its Linear4bit layers in NF4; everything else (the
    embedding table, an untied lm_head, and every linear for the int schemes) is
    rounded here, in place, and keeps fp32 storage. Tied weights are rounded once.
    """
    import torch

    from .quantize import dequantize, nf4_dequantize, nf4_quantize, quantize

    modules = dict(model.named_modules())
    seen = set()
    with torch.no_grad():
        for name in quantized_weight_names(model, skip):
            w = modules[name].weight
            if type(modules[name]) not in (torch.nn.Linear, torch.nn.Embedding) or id(w) in seen:
                continue  # bnb Linear4bit, or a weight tied to one already rounded
            seen.add(id(w))
            codes = nf4_quantize(w) if scheme.kind == "nf4" else quantize(w, scheme)
            if keep_codes is not None:
                keep_codes[name] = codes
            w.copy_(nf4_dequantize(codes) if scheme.kind == "nf4" else dequantize(codes))
