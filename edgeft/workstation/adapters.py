"""Load a PEFT adapter onto a base quantized with any scheme.

This is how the quantization-aware claim is checked: the same adapter evaluated
on the base it was trained against, and on a base quantized another way.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..basemodel import BaseId, check_base
from ..errors import ModelError


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """edgeft.json beside a PEFT adapter; for adapters from other tools, what adapter_config.json says.

    The base model is not a path here: `base` is its name and fingerprint (edgeft adapters),
    and `resolve_base` finds and checks the folder."""
    adapter_dir = Path(adapter_dir)
    run_dir = None
    if (adapter_dir / "adapter" / "adapter_config.json").is_file():
        run_dir, adapter_dir = adapter_dir, adapter_dir / "adapter"  # a run directory
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise ModelError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)", "pass a run directory or a folder written by save_pretrained")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelError(f"{adapter_dir} has no adapter_model.safetensors", "edgeft only reads safetensors adapters")
    meta_file = adapter_dir / "edgeft.json"
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        peft_cfg = json.loads(config.read_text())
    except (ValueError, OSError) as e:
        raise ModelError(f"cannot read the adapter's metadata in {adapter_dir} ({e})", "copy the adapter again") from None
    meta["adapter_dir"] = str(adapter_dir)
    meta["run_dir"] = str(run_dir) if run_dir else None
    meta["peft_base"] = peft_cfg.get("base_model_name_or_path")
    if isinstance(meta.get("base_model"), str):  # older edgeft recorded the base by its absolute path
        meta["legacy_base_path"] = meta.pop("base_model")
    meta.setdefault("task", "classify" if peft_cfg.get("task_type") == "SEQ_CLS" else "causal-lm")
    return meta


def adapter_scheme(meta: dict):
    """The base quantization an adapter was trained against; one from another tool records none: the task's default."""
    from ..schemes import default_scheme, parse_scheme

    return parse_scheme(meta["scheme"]) if meta.get("scheme") else default_scheme(meta["task"])


def _base_candidates(meta: dict):
    """Where the base may be, in order: the run's config.json (paths relative to the run, or,
    for older runs, to the working directory), the adapter's path hint, an older edgeft's
    recorded path, and PEFT's base_model_name_or_path when it names a local folder."""
    if meta.get("run_dir") and (Path(meta["run_dir"]) / "config.json").is_file():
        try:
            model = json.loads((Path(meta["run_dir"]) / "config.json").read_text()).get("model")
        except (ValueError, OSError):
            model = None
        if model:
            yield Path(meta["run_dir"]) / model
            yield Path(model)
    hint = (meta.get("base") or {}).get("path_hint") if isinstance(meta.get("base"), dict) else None
    if hint:
        yield Path(meta["adapter_dir"]) / hint
    if meta.get("legacy_base_path"):
        yield Path(meta["legacy_base_path"])
    if meta.get("peft_base"):
        yield Path(meta["peft_base"])


def resolve_base(meta: dict, explicit: str | Path | None = None) -> tuple[Path, BaseId]:
    """The base model folder for an adapter, and its identity. `explicit` (--model) always wins;
    otherwise the first folder found (see _base_candidates) whose fingerprint is the adapter's.
    A folder that is not the adapter's base is a ModelError naming both."""
    expected = BaseId.from_dict(meta.get("base"))
    what = f"the adapter {meta['adapter_dir']}"
    if explicit is not None:
        inspect_folder(explicit)
        return Path(explicit), check_base(explicit, expected, what)
    mismatch = None
    seen = set()
    for folder in _base_candidates(meta):
        key = str(folder.resolve()) if folder.exists() else str(folder)
        if key in seen or not (folder / "config.json").is_file():
            continue
        seen.add(key)
        try:
            return folder, check_base(folder, expected, what)
        except ModelError as e:
            mismatch = mismatch or e
    if mismatch:
        raise mismatch
    name = f"base {expected.short()}" if expected else f"base {meta.get('peft_base') or '(unnamed)'}"
    raise ModelError(f"cannot find the base model of {meta['adapter_dir']}: it was made for {name}",
                     "pass --model with that base model's folder")


def inspect_folder(path: str | Path) -> None:
    """A plain message for a --model that is not a model folder (before any fingerprinting)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder not found: {path}" if not path.exists() else f"{path} is a file, not a model folder",
                         "pass a local Hugging Face model folder (config.json + *.safetensors) with --model")


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
    base_path, base_id = resolve_base(meta, base_model)
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
    for config in model.peft_config.values():  # the adapter names its base; PEFT's own checks want the folder in hand
        config.base_model_name_or_path = str(base_path)
    tok_dir = meta["adapter_dir"] if (Path(meta["adapter_dir"]) / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    meta.update(task=task, labels=labels or [], base_model=str(base_path), base=base_id.to_dict())
    return model, tokenizer, meta


def evaluate_adapter(adapter_dir, data: str, scheme, device: str = "cpu", max_seq_len: int | None = None, batch_size: int = 32,
                     text_field: str = "text", label_field: str = "label", base_model: str | Path | None = None) -> dict:
    """Validation metrics of an adapter on `data`, over a base quantized by `scheme`."""
    from .. import datasets
    from ..errors import DataError
    from ..encode import collate, encode_causal, encode_classify
    from .objective import evaluate, make_objective

    if read_adapter_meta(adapter_dir).get("task") == "image-classify":
        return evaluate_image_adapter(adapter_dir, data, scheme, device, batch_size, label_field, base_model)
    model, tokenizer, meta = load_adapted(adapter_dir, scheme, device, base_model)
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


def evaluate_image_adapter(adapter_dir, data: str, scheme, device: str = "cpu", batch_size: int = 32, label_field: str = "label",
                           base_model: str | Path | None = None) -> dict:
    """evaluate_adapter for an image-classify adapter: the backbone quantized by `scheme`, centre crops."""
    from peft import PeftModel

    from ..datasets import load_task_rows
    from .objective import evaluate
    from .vision_model import adapter_preprocess, load_vision_base
    from .vision_train import ImageObjective, ImageRows

    meta = read_adapter_meta(adapter_dir)
    base_path, _ = resolve_base(meta, base_model)
    labels = meta["labels"]
    rows = load_task_rows(data, "image-classify", labels)
    pre = adapter_preprocess(meta, base_path)
    model = PeftModel.from_pretrained(load_vision_base(base_path, scheme, labels), meta["adapter_dir"]).to(device).eval()
    images = ImageRows([r["image"] for r in rows], [r["label"] for r in rows], labels, pre)
    metrics = evaluate(ImageObjective(model), images.eval_batches(batch_size), "classify", len(labels))
    return {"rows": len(rows), "scheme": scheme.name, **metrics}
