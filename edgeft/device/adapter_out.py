"""Adapters back to the workstation: a generation's weights as a PEFT adapter folder."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from ..basemodel import set_peft_base_name
from ..fsutil import atomic_dir, check_output
from .state import DeviceState


def export_adapter(state: DeviceState, out: Path, gen: int | None = None, overwrite: bool = False) -> dict:
    """PEFT's own file layout and key names, plus edgeft.json so `edgeft eval/export/import` know the task."""
    from safetensors.numpy import save_file

    out = Path(out)
    check_output(out, overwrite)
    gen = state.current if gen is None else gen
    params = state.params(gen)
    m = state.manifest
    tensors = {key: params[name] for name, key in m.trainable.items()}
    src = state.bundle / "adapter"
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(src / "adapter_config.json", tmp / "adapter_config.json")
        set_peft_base_name(tmp, m.base.name)
        for f in m.tokenizer:
            if f.endswith(".json.gz"):  # the bundle's gzipped tokenizer.json: transformers reads the plain file
                (tmp / Path(f).name.removesuffix(".gz")).write_bytes(gzip.decompress((state.bundle / f).read_bytes()))
            else:
                shutil.copy2(state.bundle / f, tmp / Path(f).name)
        record = state.generation(gen)
        # the base by name and fingerprint (the manifest's): the workstation checks the folder it is given against it
        meta = {"task": m.task, "labels": m.labels, "scheme": m.scheme, "base": m.base.to_dict(),
                "max_seq_len": m.max_seq_len, "target": m.target_name, "edgeft_version": m.edgeft_version,
                "source": {"device_generation": gen, "status": record["status"], "metrics": record.get("metrics", {})},
                **({"preprocess": m.extra["preprocess"]} if "preprocess" in m.extra else {})}  # an image bundle's: the size trained at
        (tmp / "edgeft.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return {"adapter": str(out), "generation": gen, "tensors": len(tensors)}
