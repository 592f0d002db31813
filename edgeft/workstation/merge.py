"""`edgeft import --merge`: fold an adapter (e.g. one a device trained) into its base model.

The base is the one the adapter was trained against, as the device runs it: quantized
weights rebuilt in fp32. The merged folder therefore reproduces the device's logits,
and loads anywhere with plain transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeftError


def merge_adapter(adapter_dir, out: Path, overwrite: bool = False, base_model: str | None = None) -> dict:
    import json

    import torch

    from ..fsutil import atomic_dir, check_output
    from ..schemes import parse_scheme
    from .adapters import check_adapter_file, read_adapter_meta
    from .device_model import device_model, sample_batch

    out = Path(out)
    check_output(out, overwrite)
    meta = read_adapter_meta(adapter_dir)
    check_adapter_file(meta["adapter_dir"])
    scheme = parse_scheme(meta.get("scheme") or "nf4")
    model, tokenizer, meta = device_model(adapter_dir, scheme, {}, base_model)
    sample = sample_batch(tokenizer, meta["task"], meta["labels"], 2, 16)
    with torch.no_grad():
        before = model(input_ids=sample["input_ids"], attention_mask=sample["attention_mask"]).logits.numpy()
        merged = model.merge_and_unload()
        after = merged(input_ids=sample["input_ids"], attention_mask=sample["attention_mask"]).logits.numpy()
    rel = float(np.linalg.norm(after - before) / max(np.linalg.norm(before), 1e-30))
    if not rel < 1e-4:
        raise EdgeftError(f"internal: the merged model's logits differ from the adapter's (rel {rel:.1e})", "please report this")
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        # the adapter by folder name and the base by name + fingerprint: no workstation path
        merged_from = {"adapter": Path(adapter_dir).resolve().name, "source": meta.get("source")}
        (tmp / "edgeft.json").write_text(json.dumps({"merged_from": merged_from, "base": meta["base"], "scheme": scheme.name,
                                                     "task": meta["task"], "labels": meta["labels"]}, indent=2) + "\n")
    return {"model": str(out), "scheme": scheme.name, "task": meta["task"], "logits_rel": rel}
