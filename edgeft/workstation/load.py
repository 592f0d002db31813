"""Load a local Hugging Face model folder with its base quantized as the device will run it.

nf4 goes through bitsandbytes `Linear4bit` (the QLoRA recipe). For the int schemes, and
the embedding table under every scheme, each frozen weight is held packed (codes + scales,
packed.py) and rebuilt as the layer runs, to exactly the values `DequantizeLinear` on the
device will compute.
"""

from __future__ import annotations

import contextlib
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
# image backbones (vision_model.py): model_type -> (default LoRA target modules, head)
VISION_ARCHITECTURES: dict[str, tuple[tuple[str, ...], str]] = {
    "efficientnet-lite": (("_expand_conv", "_project_conv", "_conv_head"), "classifier"),
}


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
    if (task == "image-classify") != (model_type in VISION_ARCHITECTURES):
        if task == "image-classify":
            raise ModelError(f"{path} is a {model_type or 'model'} folder, not an image backbone",
                             f"--task image-classify takes: {', '.join(VISION_ARCHITECTURES)} (tools/prepare_assets builds assets/models/efficientnet-lite0)")
        raise ModelError(f"{path} is an image backbone ({model_type})", "train it with --task image-classify")
    if task == "image-classify":
        modules, head = VISION_ARCHITECTURES[model_type]
        return ModelInfo(path, model_type, [], modules, head)
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
    own_storage(model)
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


def own_storage(model) -> None:
    """transformers maps the safetensors file into memory and the weights left unquantized (norms,
    biases) still point into it: the whole mapping, every page read while quantizing, would stay
    resident for the run. Copies of those few tensors let it go (ties kept: same Parameter)."""
    import ctypes

    import torch

    copied: dict[int, tuple] = {}  # id -> (original, copy); the original kept alive so ids stay unique
    with torch.no_grad():
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and p.device.type == "cpu" and p.is_floating_point() and id(p) not in copied:
                    copied[id(p)] = (p, p)
                    p.data = p.data.clone()
            for key, b in module._buffers.items():
                if b is not None and b.device.type == "cpu" and b.is_floating_point():
                    if id(b) not in copied:
                        copied[id(b)] = (b, b.clone())
                    module._buffers[key] = copied[id(b)][1]
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed quantization temporaries otherwise
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
    """Replace each frozen weight by the exact values the device graph will compute, held packed.

    bitsandbytes already holds its Linear4bit layers in NF4; everything else (the embedding
    table, an untied lm_head, and every linear for the int schemes) is quantized here, one
    tensor at a time, and its layer becomes a packed twin (packed.py: codes + scales, the fp32
    weight rebuilt when the layer runs). Tied weights are quantized once and share one packed copy.
    """
    import torch

    from .packed import PackedWeight, pack_module
    from .quantize import nf4_dequantize, nf4_quantize, quantize

    modules = dict(model.named_modules())
    mapped = _mapped_weight_files()
    # layers PEFT's modules_to_save will make trainable copies of (names ending in `skip`, and what
    # they hold: RoBERTa's classifier.dense, DistilBERT's pre_classifier) keep fp32 storage, rounded
    heads = [n for n, m in modules.items() if n.endswith(skip) and m is not model.get_output_embeddings()]
    seen, output = set(), model.get_output_embeddings()
    with torch.no_grad():
        for name in quantized_weight_names(model, skip):
            w = modules[name]._parameters.get("weight")
            if type(modules[name]) not in (torch.nn.Linear, torch.nn.Embedding) or w is None or id(w) in seen:
                continue  # bnb Linear4bit, or a weight tied to one already quantized
            seen.add(id(w))
            codes = nf4_quantize(w) if scheme.kind == "nf4" else quantize(w, scheme)
            if keep_codes is not None:
                keep_codes[name] = codes
            packed = PackedWeight.from_nf4(codes, tuple(w.shape)) if scheme.kind == "nf4" else PackedWeight.from_int(codes, scheme)
            if packed is None or any(name == h or name.startswith(f"{h}.") for h in heads):  # or nf4 blocks that straddle rows
                w.copy_(packed.dequantize() if packed is not None else nf4_dequantize(codes))
                continue
            for module in modules.values():
                if module._parameters.get("weight") is w:  # the layer and any tied partner (lm_head)
                    packed.keep_for_backward |= module is output
                    pack_module(module, packed)
            _drop_file_pages(w, mapped)
            del w, codes


def _mapped_weight_files() -> list[tuple[int, int]]:
    """Address ranges of the *.safetensors files mapped into this process (Linux; else none)."""
    try:
        with open("/proc/self/maps") as f:
            lines = [line.split() for line in f]
    except OSError:
        return []
    return [tuple(int(x, 16) for x in parts[0].split("-")) for parts in lines if len(parts) >= 6 and parts[5].endswith(".safetensors")]


def _drop_file_pages(t, mapped: list[tuple[int, int]]) -> None:
    """A weight just packed was read from the mapped file: its pages would stay resident (and
    counted) until the whole mapping goes. Hand back the pages that hold only this tensor (clean
    file pages of a read-only weight: reading them again, if anything did, refaults the file)."""
    import ctypes
    import mmap

    if not mapped or t.device.type != "cpu":
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(a <= start and end <= b for a, b in mapped):
        return  # a copy (e.g. converted from bf16): freed with the tensor
    lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)
