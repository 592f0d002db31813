"""`edgeft export` of an image-classify run: export.py's bundle, for a convolutional model.

The same stages and the same parts as for text (export.py): the model rebuilt in fp32 torch
with the exact quantized base values, one trace split into the loss graph and the inference
graph, the base packed (a convolution's int8 codes as (out, in/groups * kh * kw) rows with one
scale each, reshaped back to the kernel by the rebuilding subgraph), ONNX Runtime's training
artifacts, the portable step (its ConvGrad rewritten into standard ops: portable_ops.py),
validation against torch, the manifest with every file's hash. What differs: the inputs are
`pixel_values` (batch, 3, size, size) and `labels`, there is no tokenizer, the manifest carries
the preprocessing (edgeft.images.Preprocess) the device applies, and the memory plan counts
image activations (edgeft.plan.plan_image_memory).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class VisionGraphs(torch.nn.Module):
    """(pixel_values, labels) -> (loss, logits): one trace for the loss graph and the inference graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels):
        logits = self.model(pixel_values).float()
        return F.cross_entropy(logits, labels), logits


def vision_device_model(meta: dict, scheme, keep: dict, base_path: Path):
    """The adapted model as the device runs it: fp32, the quantized base's exact values, dropout off."""
    from peft import PeftModel

    from ..errors import ModelError
    from .vision_model import load_vision_base

    base = load_vision_base(base_path, scheme, meta["labels"], keep_codes=keep)
    try:
        model = PeftModel.from_pretrained(base, meta["adapter_dir"], is_trainable=True)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise ModelError(f"cannot load adapter {meta['adapter_dir']}: {e}".splitlines()[0], "is it made for another base model?") from None
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.eval()


def sample(batch: int, size: int, n_labels: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g), "labels": torch.randint(0, n_labels, (batch,), generator=g)}


def reference_logits(model, pixel_values) -> list[np.ndarray]:
    """torch's logits in float64 and in fp32: an inference graph must be within tolerance of the nearer
    (ReLU6's bounds, as for the gradients in vision_reference). What an update is checked against."""
    import copy

    with torch.no_grad():
        exact = copy.deepcopy(model).double()(pixel_values.double()).float().numpy()
        return [exact, model(pixel_values).float().numpy()]


def vision_reference(model, labels, trainable: list[str], batch: int, size: int) -> dict:
    """validate.torch_reference for images: logits, loss, one step's gradients, the start.

    Two references for the gradients, torch in float64 and in fp32: the bundle must be within the
    tolerance of one of them, or no farther from float64 than torch fp32 is (validate.py). ReLU6 is not smooth: an activation within rounding of 0 or 6 lands on
    either side of the bound depending on the precision and the order of the sums, and its whole
    gradient flips with it. On EfficientNet-Lite0 (batch 4) torch's own fp32 gradients were 0.9e-4,
    1.9e-4 and 3.6e-4 (relative) from its float64 ones on three adapters, while ONNX Runtime's
    were 1e-6 from the float64 ones on the first two and as far as torch fp32 on the third.
    `torch_fp32_vs_float64_grad` in the parity record is torch's own distance."""
    import copy

    s = sample(batch, size, len(labels), seed=1)
    exact = VisionGraphs(copy.deepcopy(model).double())
    feeds64 = {"pixel_values": s["pixel_values"].double(), "labels": s["labels"]}
    with torch.no_grad():
        logits = exact(**feeds64)[1].numpy().astype(np.float32)
    params = dict(exact.named_parameters())
    loss = exact(**feeds64)[0]
    loss.backward()
    grads = np.concatenate([params[n].grad.numpy().ravel() for n in trainable])
    del exact, params
    graph = VisionGraphs(model)
    params32 = dict(graph.named_parameters())
    graph(**s)[0].backward()
    grads32 = np.concatenate([params32[n].grad.double().numpy().ravel() for n in trainable])
    for n in trainable:
        params32[n].grad = None
    return {"feeds": {k: v.numpy() for k, v in s.items()}, "logits": logits, "loss": float(loss.item()), "grads": grads, "grads_alt": [grads32],
            "start": {n: params32[n].detach().numpy().copy() for n in trainable},
            "torch_fp32_grad_rel": float(np.linalg.norm(grads32 - grads) / max(np.linalg.norm(grads), 1e-30))}


def export_vision_bundle(meta: dict, target, out: Path, tmp: Path, stage, base_model: str, batch: int | None, reference, force: bool,
                         log) -> dict:
    """Fills `tmp` (export_bundle's atomic folder) with an image bundle; returns export's summary."""
    from .. import __version__
    from ..bundle import write_manifest
    from ..plan import check_plan, plan_image_memory
    from ..stages import profile_mark
    from .device_model import peft_key
    from .export import FROZEN, OPTIMIZER, REFERENCE, _pack_and_release, _run_schedule, _save_frozen, generate
    from .export_graphs import base_as_inputs, export_graph, shorten_names, split_graphs
    from .onnx_base import packed_tensors
    from .validate import INFERENCE_DISABLED_OPTIMIZERS, release_memory, validate_bundle
    from .vision_model import adapter_preprocess, read_config

    scheme, labels = target.scheme, meta["labels"]
    pre = adapter_preprocess(meta, base_model)
    batch = batch or target.batch_size
    plan = plan_image_memory(Path(base_model), Path(meta["adapter_dir"]), target, batch, pre.size, len(labels))
    check_plan(plan, force, log)
    t0 = time.perf_counter()
    stage("loading the model and adapter", "check that the adapter was made by edgeft train --task image-classify on this base")
    keep: dict = {}
    model = vision_device_model(meta, scheme, keep, Path(base_model))
    graphs = VisionGraphs(model)
    trainable = [n for n, p in graphs.named_parameters() if p.requires_grad]
    work = tmp / ".work"
    work.mkdir()
    stage("exporting the ONNX graphs (torch.onnx)", "report the model with the log")
    s = sample(2, pre.size, len(labels))
    export_graph(graphs, (s["pixel_values"], s["labels"]), work / "both.onnx", ["pixel_values", "labels"], ["loss", "logits"],
                 {"pixel_values": {0: "batch"}, "labels": {0: "batch"}, "logits": {0: "batch"}}, training=True)
    split_graphs(work / "both.onnx", work / "loss.onnx", work / "logits.onnx")
    stage("running the workstation model once (the reference for validation)", "report the model with the log")
    expected = vision_reference(model, labels, trainable, batch=min(batch, 4), size=pre.size)
    model.save_pretrained(str(tmp / "adapter"))
    from ..basemodel import set_peft_base_name

    set_peft_base_name(tmp / "adapter", meta["base"]["name"])
    retained = _image_reference(reference, labels, tmp)
    stage("packing the quantized base", "report the model with the log")
    trainable_params = sum(int(np.prod(p.shape)) for n, p in graphs.named_parameters() if p.requires_grad)
    packed, frozen = _pack_and_release(model, "classify", keep, scheme, trainable, [work / "loss.onnx", work / "logits.onnx"])
    del model, graphs
    release_memory()
    base_names = base_as_inputs(work / "loss.onnx", work / "loss.onnx", packed, {n: expected["start"][n] for n in trainable})
    base_as_inputs(work / "logits.onnx", tmp / "inference_model.onnx", packed, {}, short=True)
    frozen.update({name: value for p in packed for name, value in packed_tensors(p).items()})
    _save_frozen(frozen, tmp / FROZEN)
    base_bytes = sum(p.nbytes for p in packed)
    base_params = sum(int(np.prod(p.shape)) for p in packed)
    del packed, frozen
    import onnx

    stage("generating the training graph (onnxruntime-training)", "check `edgeft doctor` (export needs onnxruntime-training 1.19.2)")
    short = onnx.load(str(work / "loss.onnx"))
    shorten_names(short)
    onnx.save(short, str(work / "loss-short.onnx"))
    del short
    generate(work / "loss-short.onnx", tmp, trainable, weight_decay=OPTIMIZER["weight_decay"])
    from .portable import write_portable

    stage("rewriting the training step into standard ops (portable/)", "report the model with the log")
    portable = write_portable(tmp, OPTIMIZER, base_names, recompute=not plan.holds_base, constant_base=True)
    shutil.rmtree(work)
    export_seconds = time.perf_counter() - t0
    stage("validating the bundle against torch", "report the model and target with the log")
    parity = validate_bundle(tmp, expected, trainable, portable=portable, frozen=FROZEN)
    parity["reference"], parity["torch_fp32_vs_float64_grad"] = "torch float64 or fp32 (the nearer)", expected["torch_fp32_grad_rel"]
    profile_mark("  manifest (hashing every file)")
    summary = {"bundle": str(out), "target": target.name, "scheme": scheme.name, "task": "image-classify",
               "export_seconds": round(export_seconds, 1), "base_params": base_params, "base_bytes": base_bytes,
               "base_bytes_per_param": round(base_bytes / max(base_params, 1), 4), "trainable_params": trainable_params, "parity": parity}
    write_manifest(tmp, {
        "edgeft_version": __version__, "task": "image-classify", "labels": labels, "target": target.to_dict(source=False),
        "scheme": scheme.name, "model_type": read_config(base_model)["model_type"], "base": meta["base"],
        "trainable": {n: peft_key(n) for n in trainable},
        "inputs": {"pixel_values": ["batch", 3, pre.size, pre.size], "labels": ["batch"]},
        "train_shape": {"batch": batch, "seq": pre.size}, "max_seq_len": pre.size, "tokenizer": [], "preprocess": pre.to_dict(),
        "optimizer": OPTIMIZER, "portable": portable, "frozen": FROZEN, "schedule": _run_schedule(meta["adapter_dir"]),
        "inference": {"file": "inference_model.onnx", "disabled_optimizers": INFERENCE_DISABLED_OPTIMIZERS},
        "parity": parity, "base_bytes_per_param": summary["base_bytes_per_param"], "memory_plan": plan.to_dict(),
        "reference": {"file": REFERENCE, "rows": retained} if retained else None,
    })
    summary["memory_plan"] = plan.to_dict()
    summary["bundle_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    summary["bundle_bytes_per_base_param"] = round(summary["bundle_bytes"] / max(base_params, 1), 4)
    return summary


def _image_reference(path, labels: list[str], tmp: Path, rows: int = 64) -> int:
    """The device's forgetting-check images: a seeded sample of held-out workstation images,
    copied into the bundle (reference/) and listed in reference.jsonl. Returns how many."""
    import json
    import random

    from ..images import load_image_rows

    if path is None:
        return 0
    paths, names = load_image_rows(path)
    picked = [(p, n) for p, n in zip(paths, names) if n in labels]
    random.Random(0).shuffle(picked)
    picked = picked[:rows]
    folder = tmp / "reference"
    folder.mkdir()
    lines = []
    for i, (p, n) in enumerate(picked):
        name = f"{i:04d}{Path(p).suffix.lower()}"
        shutil.copyfile(p, folder / name)
        lines.append(json.dumps({"image": f"reference/{name}", "label": n}))
    from .export import REFERENCE

    (tmp / REFERENCE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)
