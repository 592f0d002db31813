"""Load a PEFT adapter onto a base quantized with any scheme.

This is how the quantization-aware claim is checked: the same adapter evaluated
on the base it was trained against, and on a base quantized another way.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """edgeft.json beside a PEFT adapter; for adapters from other tools, what adapter_config.json says."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter" / "adapter_config.json").is_file():
        adapter_dir = adapter_dir / "adapter"  # a run directory
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise ModelError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)", "pass a run directory or a folder written by save_pretrained")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelError(f"{adapter_dir} has no adapter_model.safetensors", "edgeft only reads safetensors adapters")
    meta_file = adapter_dir / "edgeft.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta["adapter_dir"] = str(adapter_dir)
    peft_cfg = json.loads(config.read_text())
    meta.setdefault("base_model", peft_cfg.get("base_model_name_or_path"))
    meta.setdefault("task", "classify" if peft_cfg.get("task_type") == "SEQ_CLS" else "causal-lm")
    return meta


def check_adapter_file(adapter_dir) -> None:
    """Read the safetensors header and every tensor once: a truncated or corrupt file fails here, by name."""
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"adapter file {path} is corrupt ({e})", "re-run edgeft train, or copy the adapter again") from None


def load_adapter_weights(peft_model, adapter_dir) -> None:
    """Copy an adapter's tensors into a freshly attached PEFT model; every key must land."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    meta = read_adapter_meta(adapter_dir)
    check_adapter_file(meta["adapter_dir"])
    state = load_file(str(Path(meta["adapter_dir"]) / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as e:  # shape mismatch: another base model or rank
        raise ModelError(f"cannot load {adapter_dir} onto this model: {str(e).splitlines()[0]}", "continue from an adapter made for the same base model") from None
    if result.unexpected_keys:
        raise ModelError(f"{adapter_dir} has weights this model does not: {result.unexpected_keys[0]}", "continue from an adapter made for the same base model")


def load_adapted(adapter_dir, scheme, device: str = "cpu", base_model: str | None = None, labels: list[str] | None = None,
                 keep_codes: dict | None = None, trainable: bool = False):
    """(peft model, tokenizer, meta) with the base quantized by `scheme`."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .load import inspect_model_dir, load_base

    meta = read_adapter_meta(adapter_dir)
    base_path = base_model or meta.get("base_model")
    task = meta["task"]
    labels = labels or meta.get("labels") or None
    if task == "classify" and not labels:
        raise ModelError(f"{adapter_dir}: label names unknown", "adapters from other tools need --labels a,b,c")
    info = inspect_model_dir(base_path, task)
    base = load_base(info, task, scheme, device, labels, keep_codes=keep_codes)
    try:
        model = PeftModel.from_pretrained(base, meta["adapter_dir"], is_trainable=trainable)
    except (ValueError, RuntimeError, OSError) as e:
        raise ModelError(f"cannot load adapter {meta['adapter_dir']}: {e}".splitlines()[0], "is the adapter corrupt, or made for another base model?") from None
    model.eval()
    tok_dir = meta["adapter_dir"] if (Path(meta["adapter_dir"]) / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    meta.update(task=task, labels=labels or [], base_model=base_path)
    return model, tokenizer, meta


def evaluate_adapter(adapter_dir, data: str, scheme, device: str = "cpu", max_seq_len: int | None = None, batch_size: int = 32,
                     text_field: str = "text", label_field: str = "label") -> dict:
    """Validation metrics of an adapter on `data`, over a base quantized by `scheme`."""
    from .. import datasets
    from ..errors import DataError
    from ..encode import collate, encode_causal, encode_classify
    from .objective import evaluate, make_objective

    model, tokenizer, meta = load_adapted(adapter_dir, scheme, device)
    max_len = max_seq_len or meta.get("max_seq_len") or 256
    if meta["task"] == "classify":
        texts, labels = datasets.load_classify(data, text_field, label_field)
        unknown = sorted(set(labels) - set(meta["labels"]))
        if unknown:
            raise DataError(f"{data} has labels the adapter does not know: {', '.join(unknown[:5])}", f"known labels: {', '.join(meta['labels'])}")
        encoded = encode_classify(tokenizer, texts, labels, meta["labels"], max_len)
    else:
        encoded, _ = encode_causal(tokenizer, datasets.load_causal(data), max_len)
    batches = (collate(encoded[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(encoded), batch_size))
    metrics = evaluate(make_objective(meta["task"], model), batches, meta["task"], len(meta["labels"]))
    return {"rows": len(encoded), "scheme": scheme.name, **metrics}
