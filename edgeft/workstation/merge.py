"""`edgeft import --merge`: fold an adapter (e.g. one a device trained) into its base model.

The base is the one the adapter was trained against, as the device runs it: quantized
weights rebuilt in fp32. The merged folder therefore reproduces the device's logits.
A text model loads anywhere with plain transformers; an image model is an edgeft image
backbone folder (config.json + model.safetensors, vision_model.py) with the head kept,
which `edgeft train --model` takes as a base.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeftError


def merge_adapter(adapter_dir, out: Path, overwrite: bool = False, base_model: str | None = None) -> dict:
    import json

    import torch

    from ..fsutil import atomic_dir, check_output
    from .adapters import adapter_scheme, check_adapter_file, read_adapter_meta

    out = Path(out)
    check_output(out, overwrite)
    meta = read_adapter_meta(adapter_dir)
    check_adapter_file(meta["adapter_dir"])
    scheme = adapter_scheme(meta)
    model, meta, logits, save = (_image_parts if meta["task"] == "image-classify" else _text_parts)(adapter_dir, meta, scheme, base_model)
    with torch.no_grad():
        before = logits(model)
        merged = model.merge_and_unload()
        after = logits(merged)
    rel = float(np.linalg.norm(after - before) / max(np.linalg.norm(before), 1e-30))
    if not rel < 1e-4:
        raise EdgeftError(f"internal: the merged model's logits differ from the adapter's (rel {rel:.1e})", "please report this")
    with atomic_dir(out) as tmp:
        save(merged, tmp)
        # the adapter by folder name and the base by name + fingerprint: no workstation path
        merged_from = {"adapter": Path(adapter_dir).resolve().name, "source": meta.get("source")}
        (tmp / "edgeft.json").write_text(json.dumps({"merged_from": merged_from, "base": meta["base"], "scheme": scheme.name,
                                                     "task": meta["task"], "labels": meta["labels"]}, indent=2) + "\n")
    return {"model": str(out), "scheme": scheme.name, "task": meta["task"], "logits_rel": rel}


def _text_parts(adapter_dir, meta: dict, scheme, base_model):
    """(model, meta, logits on a token sample, save) for a text adapter: device_model.py's model."""
    from .device_model import device_model, sample_batch

    model, tokenizer, meta = device_model(adapter_dir, scheme, {}, base_model)
    s = sample_batch(tokenizer, meta["task"], meta["labels"], 2, 16)

    def save(merged, folder: Path) -> None:
        merged.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))

    return model, meta, lambda m: m(input_ids=s["input_ids"], attention_mask=s["attention_mask"]).logits.numpy(), save


def _image_parts(adapter_dir, meta: dict, scheme, base_model):
    """The same for an image adapter: vision_export.py's device model, a pixel sample, save_merged."""
    from .adapters import resolve_base
    from .vision_export import sample, vision_device_model
    from .vision_model import adapter_preprocess, save_merged

    base_path, base_id = resolve_base(meta, base_model)
    model = vision_device_model(meta, scheme, {}, base_path)
    meta = {**meta, "base": base_id.to_dict()}
    pixels = sample(2, adapter_preprocess(meta, base_path).size, len(meta["labels"]))["pixel_values"]
    return model, meta, lambda m: m(pixels).float().numpy(), lambda merged, folder: save_merged(merged, base_path, meta["labels"], folder)
