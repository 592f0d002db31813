"""`edgeft export --update-for OLD_BUNDLE`: a new adapter for a bundle a device already holds.

No ONNX export and no ONNX Runtime artifacts: the bundle's graphs already compute any adapter of
the same shapes, so the update is the trainable tensors under the bundle's ONNX names plus a
manifest (edgeft/update.py). Seconds, not minutes, and a few MB.

Order: everything that can refuse is checked before anything is written. The old bundle's hashes,
then what the run says about itself (base fingerprint, task, labels, scheme, LoRA configuration,
tensor names and shapes) against the bundle's manifest, then the base folder against its
fingerprint. Last, the proof that the device will compute what the workstation does: the adapter
on the quantized base in torch (device_model.py, as export validation builds it) against the
bundle's own inference graph in ONNX Runtime with the update's weights swapped in (the device's
Predictor), on a sample batch, within export validation's tolerance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import ExportError, ModelError, UsageError


def make_update(source, old_bundle, out: Path, overwrite: bool = False, base_model: str | None = None,
                labels: list[str] | None = None, target: str | None = None, log=print) -> dict:
    from ..basemodel import BaseId
    from ..bundle import verify_bundle
    from ..datasets import LABELLED_TASKS
    from ..fsutil import check_output
    from ..update import bundle_shapes, mismatches, read_lora_signature, tensor_shapes, write_update
    from .adapters import check_adapter_file, read_adapter_meta, resolve_base

    t0 = time.perf_counter()
    out, old_bundle = Path(out), Path(old_bundle)
    check_output(out, overwrite)
    manifest = verify_bundle(old_bundle)  # its graphs are what the device runs: they must be the ones it was shipped
    if target is not None:
        from ..targets import load_target

        profile = load_target(target)
        if profile.name != manifest.target_name or profile.scheme.name != manifest.scheme:
            raise UsageError(f"--target {profile.name} ({profile.scheme.name}) is not the target of {old_bundle} "
                             f"({manifest.target_name}, {manifest.scheme})", "leave out --target: an update is for the bundle's target")
    meta = read_adapter_meta(source)
    adapter_dir = Path(meta["adapter_dir"])
    check_adapter_file(adapter_dir)
    task = meta["task"]
    labels = labels or meta.get("labels") or (manifest.labels if task in LABELLED_TASKS else [])  # other tools record none
    bundle_lora = read_lora_signature(old_bundle / "adapter")
    peft_shapes = tensor_shapes(adapter_dir / "adapter_model.safetensors")
    key_to_onnx = {key: name for name, key in manifest.trainable.items()}
    shapes = {key_to_onnx.get(k, k): s for k, s in peft_shapes.items()}  # by ONNX name where the bundle has one
    want = bundle_shapes(old_bundle, manifest)
    base_id = BaseId.from_dict(meta.get("base"))
    reasons = mismatches(base=base_id, task=task, labels=labels, scheme=meta.get("scheme"), lora=read_lora_signature(adapter_dir),
                         shapes=shapes, manifest=manifest, bundle_shapes=want, bundle_lora=bundle_lora)
    if reasons:
        raise ModelError(f"{source} cannot update {old_bundle}: " + "; ".join(reasons),
                         f"train against the bundle's base ({manifest.base.name}) and target ({manifest.target_name}) with the same "
                         "LoRA options, or export a new bundle with --target")
    from ..device.tokenizer import read_tokenizer_json

    theirs, ours = adapter_dir / "tokenizer.json", old_bundle / "tokenizer"
    # compared as JSON: the bundle's is written gzipped, without indentation
    if theirs.is_file() and any(ours.glob("tokenizer.json*")) and json.loads(theirs.read_bytes()) != json.loads(read_tokenizer_json(ours)):
        log(f"warning: {source}'s tokenizer.json differs from the bundle's; the device tokenizes with the bundle's")
    if not meta.get("scheme"):
        log(f"note: {source} does not say which base quantization it was trained against; the device's base is {manifest.scheme}")
    base_path, base_id = resolve_base(meta, base_model)  # the folder, checked against the adapter's fingerprint
    if base_id.fingerprint != manifest.base.fingerprint:  # an adapter from another tool records no base: its folder decides
        raise ModelError(f"{source} cannot update {old_bundle}: its base {base_path} is {base_id.short()}, "
                         f"the bundle holds base {manifest.base.short()}", "pass --model with the bundle's base model folder")

    from safetensors.numpy import load_file

    peft = load_file(str(adapter_dir / "adapter_model.safetensors"))
    weights = {name: np.ascontiguousarray(peft[key], dtype=np.float32) for name, key in manifest.trainable.items()}
    if not all(np.isfinite(w).all() for w in weights.values()):
        raise ModelError(f"{source}: the adapter holds NaN or infinite values", "retrain it (lower --lr)")
    parity = check_parity(source, old_bundle, manifest, weights, str(base_path), labels)
    check_seconds = parity.pop("seconds")

    source_meta = {"name": (Path(meta["run_dir"]) if meta.get("run_dir") else adapter_dir).name, "step": meta.get("step"),
                   "metrics": meta.get("metrics") or {}}
    record = {k: v for k, v in meta.items() if k not in ("adapter_dir", "run_dir", "peft_base", "legacy_base_path")}
    record["base"] = manifest.base.to_dict()  # the name + fingerprint, never the workstation's path hint
    written, size = write_update(out, old_bundle, manifest, weights, adapter_dir / "adapter_config.json", record, bundle_lora,
                                 source_meta, parity)
    bundle_size = sum(e["bytes"] for e in manifest.files.values())
    return {"update": str(out), "bundle": str(old_bundle), "base": manifest.base.to_dict(), "target": manifest.target_name,
            "scheme": manifest.scheme, "task": task, "tensors": len(weights), "trainable_params": int(sum(w.size for w in weights.values())),
            "update_bytes": size, "bundle_bytes": bundle_size, "ratio": round(size / max(bundle_size, 1), 5),
            "files": written.files, "parity": parity, "check_seconds": round(check_seconds, 2), "seconds": round(time.perf_counter() - t0, 2)}


def check_parity(source, bundle: Path, manifest, weights: dict, base_model: str, labels: list[str]) -> dict:
    """The workstation model (adapter on the quantized base, fp32 torch) against the bundle's inference
    graph with the update's weights, on export validation's sample batch and tolerance (an image
    bundle: within it of torch in float64 or fp32, the nearer, as vision_export.vision_reference)."""
    from ..device.infer import Predictor
    from ..schemes import parse_scheme
    from .validate import TOLERANCE, _rel

    t0 = time.perf_counter()
    scheme = parse_scheme(manifest.scheme)
    ref = (_image_reference if manifest.task == "image-classify" else _text_reference)(source, manifest, scheme, base_model, labels)
    names = set(ref["params"])
    if names != set(manifest.trainable):  # what the graph names its parameters, independently of the PEFT file
        odd = sorted(names ^ set(manifest.trainable))
        raise ModelError(f"{source}: the model's trainable parameters are not the bundle's ({len(odd)} differ, first: {odd[0]})",
                         "train with the LoRA options the bundle was exported with")
    loaded = max(float(np.abs(ref["params"][n] - w).max()) for n, w in weights.items())
    predictor = Predictor(bundle, manifest, weights, tokenizer=None, want_cuda=False)
    got = predictor.session.run(None, ref["feeds"])[0]
    del predictor
    want = min(ref["logits"], key=lambda w: _rel(got, w))
    result = {"logits_rel": _rel(got, want), "logits_max_abs": float(np.abs(got - want).max()), "weights_max_abs": loaded,
              "batch": ref["batch"], "seq": ref["seq"], "tolerance": TOLERANCE}
    if not result["logits_rel"] <= TOLERANCE or loaded != 0.0:
        raise ExportError(f"the bundle's inference graph with this adapter does not compute what torch does: logits rel "
                          f"{result['logits_rel']:.2e} (tolerance {TOLERANCE:g}), weights max abs {loaded:.2e}; nothing was written",
                          "export a new bundle with --target instead, and report this with the run and the bundle")
    result["seconds"] = time.perf_counter() - t0
    return result


def _text_reference(source, manifest, scheme, base_model: str, labels: list[str]) -> dict:
    """torch's logits on a token sample, the trainable tensors by ONNX name, the feeds (device_model.py)."""
    import torch

    from .device_model import LogitsGraph, LossGraph, device_model, sample_batch

    model, tokenizer, _ = device_model(source, scheme, {}, base_model, labels or None)
    batch, seq = min(manifest.train_shape.batch, 4), min(manifest.max_seq_len, 64)
    s = sample_batch(tokenizer, manifest.task, manifest.labels, batch, seq, seed=1)
    with torch.no_grad():
        logits = LogitsGraph(model)(s["input_ids"], s["attention_mask"]).numpy()
    params = {n: p.detach().numpy() for n, p in LossGraph(model, manifest.task).named_parameters() if p.requires_grad}
    return {"params": params, "logits": [logits], "feeds": {k: s[k].numpy() for k in ("input_ids", "attention_mask")}, "batch": batch, "seq": seq}


def _image_reference(source, manifest, scheme, base_model: str, labels: list[str]) -> dict:
    """The same for an image bundle (vision_export.py's model and sample), logits in float64 and fp32."""
    from .adapters import read_adapter_meta
    from .vision_export import VisionGraphs, reference_logits, sample, vision_device_model

    meta = read_adapter_meta(source)
    model = vision_device_model({**meta, "labels": labels or meta.get("labels")}, scheme, {}, Path(base_model))
    batch, size = min(manifest.train_shape.batch, 4), manifest.train_shape.seq  # an image bundle's seq is its image size
    pixels = sample(batch, size, len(manifest.labels), seed=1)["pixel_values"]
    params = {n: p.detach().numpy() for n, p in VisionGraphs(model).named_parameters() if p.requires_grad}
    return {"params": params, "logits": reference_logits(model, pixels), "feeds": {"pixel_values": pixels.numpy()}, "batch": batch, "seq": size}
