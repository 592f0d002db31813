"""`edgeft export`: a device bundle that trains exactly as the workstation model did.

Steps: rebuild the workstation model (quantized base + adapter) in fp32 torch
(device_model.py), export a loss graph and a logits graph with the legacy exporter
(parameter names kept, no weights), compute the torch reference validation compares with,
pack the base, then let the torch model go: what follows holds the base packed. Every graph
takes the frozen base as inputs, rebuilt by a small subgraph per weight, and reads it from
ONE file, `base.safetensors`; ONNX Runtime training artifacts (AdamW patched to torch
semantics, a nominal checkpoint: the trainable tensors' names and shapes) are generated from
the small graph, rewritten into standard ops (portable.py), and the bundle is validated
against the reference (validate.py), one ONNX Runtime session at a time.

Memory therefore follows the fp32 model (loading, tracing) and then the packed base plus the
largest session, never the model several times over.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeftError
from .device_model import PREFIX, LossGraph, device_model, peft_key, sample_batch
from .export_graphs import IR_VERSION, OPSET, BundleGraphs, base_as_inputs, export_graph, shorten_names, split_graphs  # noqa: F401
from .onnx_base import PackedWeight, pack_int, pack_nf4, packed_tensors
from .packed_rows import Layout

OPTIMIZER = {"name": "AdamW", "semantics": "torch.optim.AdamW", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
REFERENCE, REFERENCE_ROWS = "reference.jsonl", 256
FROZEN = "base.safetensors"  # the frozen base (packed codes, scales, zero points; fp32 norms and biases)


def pack_base(graph_names: set[str], keep: dict, scheme, weights: dict | None = None, tied: dict | None = None) -> list[PackedWeight]:
    """Packed codes for every quantized tensor that appears in the exported graph. Each entry of
    `keep` is dropped once packed; with `weights` (graph name -> the torch tensor) each packed
    tensor is proven to decode to the workstation's weight bit for bit. `tied`: parameter name ->
    every name of that same tensor (a tied embedding and lm_head): the graph names it once, by
    whichever name the exporter met first, and the codes may be kept under the other."""
    packed = []
    for module_name in list(keep):
        codes = keep.pop(module_name)
        candidates = [f"{PREFIX}base_model.model.{module_name}.{suffix}" for suffix in ("base_layer.weight", "weight")]
        candidates += [alias for c in candidates for alias in (tied or {}).get(c, [])]
        name = next((c for c in candidates if c in graph_names), None)
        if name is None:
            continue  # not in the graphs (a classification head's original_module)
        if isinstance(codes, tuple):  # nf4: (packed bytes, bnb QuantState)
            p = _pack_bnb(name, *codes)
        else:
            p = pack_int(name, codes.codes, codes.scale, codes.zero, codes.group_size, scheme.bits, scheme.symmetric)
        p.view = getattr(codes, "view", None)  # a convolution's weight, quantized as (out, in/groups * kh * kw)
        del codes
        if weights is not None and not p.matches(weights[name].numpy().reshape(p.shape)):
            raise EdgeftError(f"internal: packed {name} does not decode to the workstation weight", "please report this")
        packed.append(p)
    return packed


def _pack_bnb(name: str, data: torch.Tensor, state) -> PackedWeight:
    import bitsandbytes.functional as bnbf

    raw = data.reshape(-1).numpy()
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    hi_first = np.stack([raw >> 4, raw & 15], axis=1).reshape(-1)  # bitsandbytes puts element 2i in the high nibble
    n = int(np.prod(state.shape))
    return pack_nf4(name, tuple(state.shape), hi_first[:n], absmax.float().numpy(), state.code.float().numpy(), state.blocksize)


@contextlib.contextmanager
def quiet_native_stderr():
    """ORT's gradient-graph builder logs every transformer pass at INFO from C++, whatever
    the Python-side severity. Capture fd 2 while it runs; on failure its tail goes with the
    exception (`.native_stderr`) into the log file edgeft.stages writes."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException as e:
            os.dup2(saved, 2)
            sink.seek(0)
            lines = [line for line in sink.read().decode(errors="replace").splitlines() if "[I:onnxruntime" not in line]
            e.native_stderr = "\n".join(lines[-40:])  # for the log edgeft.stages writes; the user sees one message
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generate(loss_path: Path, out: Path, trainable: list[str], weight_decay: float) -> None:
    """ORT training artifacts; AdamW patched to torch.optim.AdamW semantics (adam_mode 0, eps 1e-8).

    The frozen base is none of ORT's parameters: the loss graph takes it as inputs (user inputs of
    the training and eval graphs, fed by the device from the bundle's one base file; as inputs ORT's
    training transformers cannot constant-fold them into fp32 weights either). The checkpoint is
    ORT's nominal one: the trainable tensors' names and shapes, no values (a device fills them
    from the adapter, see edgeft.device.backends)."""
    import onnx
    from onnxruntime.training import artifacts

    with quiet_native_stderr():
        artifacts.generate_artifacts(str(loss_path), requires_grad=trainable, frozen_params=[], loss=None,
                                     optimizer=artifacts.OptimType.AdamW, artifact_directory=str(out), nominal_checkpoint=True)
    (out / "nominal_checkpoint").replace(out / "checkpoint")
    opt_path = out / "optimizer_model.onnx"
    opt = onnx.load(str(opt_path))
    for node in opt.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode":
                    attr.i = 0
                elif attr.name == "epsilon":
                    attr.f = 1e-8
                elif attr.name == "weight_decay":
                    attr.f = weight_decay
    opt.ir_version = min(opt.ir_version, IR_VERSION + 1)
    onnx.save(opt, str(opt_path))


def export_bundle(adapter_dir, target, out: Path, overwrite: bool = False, force: bool = False, batch: int | None = None,
                  seq: int | None = None, base_model: str | None = None, labels: list[str] | None = None,
                  reference: Path | None = None, log=print) -> dict:
    """Everything is checked (adapter, target fit, writable output) before the slow work,
    and the bundle appears at `out` only once it has passed validation."""
    from .. import __version__
    from ..bundle import write_manifest
    from ..fsutil import atomic_dir, check_output
    from ..plan import check_plan, device_shape, plan_memory
    from .adapters import check_adapter_file, read_adapter_meta, resolve_base

    out = Path(out)
    check_output(out, overwrite)
    meta = read_adapter_meta(adapter_dir)
    check_adapter_file(meta["adapter_dir"])
    base_model = str(resolve_base(meta, base_model)[0])  # --model, else found and fingerprint-checked
    target = target.for_task(meta.get("task", ""))  # an image backbone: the profile's [vision] scheme and batch
    scheme = target.scheme
    if meta.get("scheme") and meta["scheme"] != scheme.name:
        log(f"warning: the adapter was trained against {meta['scheme']}, the device base is {scheme.name}; "
            f"metrics will differ (retrain with --target {target.name} for a quantization-aware adapter)")
    if meta.get("task") == "image-classify":
        return _export_images(meta, target, out, base_model, batch, reference, force, log)
    batch, seq = device_shape(target, meta.get("max_seq_len"), batch, seq)
    retained = _reference_rows(reference, meta, labels)
    plan = plan_memory(Path(base_model), Path(meta["adapter_dir"]), target, meta["task"], batch, seq)
    check_plan(plan, force, log)
    t0 = time.perf_counter()
    from ..stages import LOG_FOLDER, profile_mark, stages

    with atomic_dir(out) as tmp, stages("export", Path(base_model).name, out.parent / LOG_FOLDER) as stage:
        # an unexpected failure in any stage: one message naming it, the details in a log file
        stage("loading the model and adapter", "check that the base model and the adapter load with transformers and peft")
        keep: dict = {}
        model, tokenizer, meta = device_model(adapter_dir, scheme, keep, base_model, labels)
        task, labels = meta["task"], meta["labels"]
        trainable = [n for n, p in LossGraph(model, task).named_parameters() if p.requires_grad]
        sample = sample_batch(tokenizer, task, labels, 2, min(seq, 32))
        work = tmp / ".work"
        work.mkdir()
        label_axes = {0: "batch"} if task == "classify" else {0: "batch", 1: "seq"}
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
        stage("exporting the ONNX graphs (torch.onnx)", "the ONNX exporter could not trace this architecture; "
              "train with fewer --target-modules, or report the model with the log")
        export_graph(BundleGraphs(model, task), (sample["input_ids"], sample["attention_mask"], sample["labels"]), work / "both.onnx",
                     ["input_ids", "attention_mask", "labels"], ["loss", "logits"],
                     {**axes, "labels": label_axes, "logits": {0: "batch"} if task == "classify" else {0: "batch", 1: "seq"}}, training=True)
        split_graphs(work / "both.onnx", work / "loss.onnx", work / "logits.onnx")
        from .validate import BATCH, INFERENCE_DISABLED_OPTIMIZERS, SEQ, release_memory, torch_reference, validate_bundle

        stage("running the workstation model once (the reference for validation)", "report the model with the log")
        expected = torch_reference(model, task, tokenizer, labels, trainable, batch=min(batch, BATCH), seq=min(seq, SEQ))
        release_memory()  # the backward pass's buffers
        model.save_pretrained(str(tmp / "adapter"))
        from ..basemodel import set_peft_base_name

        set_peft_base_name(tmp / "adapter", meta["base"]["name"])  # a name, not the workstation's path
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _pack_tokenizer(tmp / "tokenizer")
        if retained:
            (tmp / REFERENCE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in retained), encoding="utf-8")
        stage("packing the quantized base", "try a target with another quantization scheme, or report the model with the log")
        model_type = model.get_base_model().config.model_type
        trainable_params = sum(int(np.prod(p.shape)) for n, p in model.named_parameters() if p.requires_grad)
        packed, frozen = _pack_and_release(model, task, keep, scheme, trainable, [work / "loss.onnx", work / "logits.onnx"])
        del model  # from here on the base is held packed: never the fp32 model again
        release_memory()
        profile_mark("  graphs: the base as inputs, rebuilt by standard ops")
        base_names = base_as_inputs(work / "loss.onnx", work / "loss.onnx", packed, {n: expected["start"][n] for n in trainable})
        base_as_inputs(work / "logits.onnx", tmp / "inference_model.onnx", packed, {}, short=True, chunk_head=bool(plan.vocab_chunk_rows),
                       gate=not plan.holds_base)
        frozen.update({name: value for p in packed for name, value in packed_tensors(p).items()})
        _save_frozen(frozen, tmp / FROZEN)
        layouts = {p.name: Layout.of(p) for p in packed}  # what the portable step needs to rebuild parts of a weight
        base_bytes = sum(p.nbytes for p in packed)
        base_params = sum(int(np.prod(p.shape)) for p in packed)
        del packed, frozen
        release_memory()
        import onnx

        graph = onnx.load(str(work / "loss.onnx"))  # the graph only: the base is its inputs, the adapter a few MB
        from .preflight import explain_generation_error, preflight

        stage("generating the training graph (onnxruntime-training)", "check `edgeft doctor` (export needs onnxruntime-training "
              "1.19.2), train with fewer --target-modules, or report the model with the log")
        preflight(graph, trainable)
        short = onnx.ModelProto()
        short.CopyFrom(graph)
        shorten_names(short)  # ORT's graphs and the portable step derive their names from these
        onnx.save(short, str(work / "loss-short.onnx"))
        del short
        try:
            generate(work / "loss-short.onnx", tmp, trainable, weight_decay=OPTIMIZER["weight_decay"])
        except RuntimeError as e:
            raise explain_generation_error(e, graph, trainable) or e
        del graph
        from .portable import write_portable

        stage("rewriting the training step into standard ops (portable/)", "report the model with the log")
        portable = write_portable(tmp, OPTIMIZER, base_names, recompute=not plan.holds_base, layouts=layouts)
        if plan.vocab_chunk_rows and "vocab_chunks" not in portable:  # a head this architecture's graph did not let us chunk
            plan = plan_memory(Path(base_model), Path(meta["adapter_dir"]), target, task, batch, seq, vocab_chunked=False)
        shutil.rmtree(work)
        export_seconds = time.perf_counter() - t0

        stage("validating the bundle against torch", "report the model and target with the log")
        parity = validate_bundle(tmp, expected, trainable, portable=portable, frozen=FROZEN)
        profile_mark("  manifest (hashing every file)")
        summary = {
            "bundle": str(out), "target": target.name, "scheme": scheme.name, "task": task,
            "export_seconds": round(export_seconds, 1), "base_params": base_params, "base_bytes": base_bytes,
            "base_bytes_per_param": round(base_bytes / max(base_params, 1), 4), "trainable_params": trainable_params,
            "parity": parity,
        }
        values = {
            "edgeft_version": __version__, "task": task, "labels": labels, "target": target.to_dict(source=False), "scheme": scheme.name,
            "model_type": model_type, "base": meta["base"],  # name + fingerprint, no path
            "trainable": {n: peft_key(n) for n in trainable},
            "inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"], "labels": ["batch"] if task == "classify" else ["batch", "seq"]},
            "train_shape": {"batch": batch, "seq": seq}, "max_seq_len": seq,
            "tokenizer": sorted(f"tokenizer/{f.name}" for f in (tmp / "tokenizer").iterdir()),
            "optimizer": OPTIMIZER, "portable": portable, "frozen": FROZEN,
            "schedule": _run_schedule(meta["adapter_dir"]),
            "inference": {"file": "inference_model.onnx", "disabled_optimizers": INFERENCE_DISABLED_OPTIMIZERS},
            "parity": parity, "base_bytes_per_param": summary["base_bytes_per_param"], "memory_plan": plan.to_dict(),
            "reference": {"file": REFERENCE, "rows": len(retained)} if retained else None,
        }
        first = write_manifest(tmp, values)
        stage("measuring the device's training step (memory)", "report the model and target with the log")
        plan = measured_plan(tmp, plan, force, log)
        write_manifest(tmp, {**values, "memory_plan": plan.to_dict()}, files=first.files)  # the files are as hashed
        summary["memory_plan"] = plan.to_dict()
        summary["bundle_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        summary["bundle_bytes_per_base_param"] = round(summary["bundle_bytes"] / max(base_params, 1), 4)
    return summary


def measured_plan(bundle: Path, plan, force: bool, log):
    """`plan` with the bundle's step measured (edgeft.device.step_probe), checked against the budget again:
    a step that measures over the budget is refused like a planned one, and nothing is left behind."""
    from ..device.step_probe import measure_step
    from ..plan import check_plan

    measured = plan.with_measured(measure_step(bundle))
    if measured.total_mib > plan.total_mib:
        log(f"note: the step measured {measured.total_mib - plan.total_mib:.0f} MiB above its formula; the plan counts the measurement")
    check_plan(measured, force, log)
    return measured


def _export_images(meta: dict, target, out: Path, base_model: str, batch, reference, force: bool, log) -> dict:
    """An image-classify run: the same atomic folder and stages, the graphs of vision_export.py."""
    from ..fsutil import atomic_dir
    from ..stages import LOG_FOLDER, stages
    from .vision_export import export_vision_bundle

    with atomic_dir(out) as tmp, stages("export", Path(base_model).name, out.parent / LOG_FOLDER) as stage:
        return export_vision_bundle(meta, target, out, tmp, stage, base_model, batch, reference, force, log)


def _run_schedule(adapter_dir) -> dict:
    """The learning-rate schedule the device applies to each generation (edgeft.schedule): the
    run's own (its config.json beside adapter/), or edgeft train's default for adapters from elsewhere."""
    from ..schedule import DEFAULT, SCHEDULES

    config = Path(adapter_dir).parent / "config.json"
    try:
        cfg = json.loads(config.read_text(encoding="utf-8")) if (Path(adapter_dir) / "edgeft.json").is_file() else {}
    except (OSError, ValueError):
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    ratio = cfg.get("warmup_ratio")
    if cfg.get("schedule") in SCHEDULES and isinstance(ratio, (int, float)) and 0 <= ratio:
        return {"name": cfg["schedule"], "warmup_ratio": float(ratio)}
    return dict(DEFAULT)


def _reference_rows(path: Path | None, meta: dict, labels: list[str] | None) -> list[dict]:
    """Rows the device keeps as its forgetting check: a seeded sample of held-out workstation data."""
    from ..datasets import load_task_rows, sample_rows

    if path is None:
        return []
    return sample_rows(load_task_rows(path, meta["task"], labels or meta.get("labels")), REFERENCE_ROWS)


def _pack_and_release(model, task: str, keep: dict, scheme, trainable: list[str], graphs: list[Path]) -> tuple[list[PackedWeight], dict]:
    """(packed base tensors, the other frozen tensors as fp32 numpy), for every parameter the
    exported graphs read. Each weight's codes are packed, proven to decode to the torch weight bit
    for bit, and dropped; `keep` is empty afterwards."""
    import onnx

    wrapper = LossGraph(model, task)
    state = {k: v.detach() for k, v in wrapper.state_dict(keep_vars=True).items()}
    names_of: dict[int, list[str]] = {}
    for name, param in wrapper.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    tied = {n: names for names in names_of.values() if len(names) > 1 for n in names}
    used = set()
    for path in graphs:
        used.update(i.name for i in onnx.load(str(path)).graph.input if i.name in state)
    packed = pack_base(used, keep, scheme, state, tied)
    keep.clear()
    done = {p.name for p in packed} | set(trainable)
    frozen = {n: state[n].numpy().copy() for n in sorted(used - done)}
    return packed, frozen


def _pack_tokenizer(folder: Path) -> None:
    """tokenizer.json as tokenizer.json.gz, without indentation: written pretty-printed, a large
    vocabulary's file is mostly whitespace and repeats (Gemma-3: 33.4 MB -> 5.0 MB, an eighth of a
    byte per base parameter of its 270M model); edgeft.device.tokenizer reads it back."""
    import gzip

    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape: keep it escaped
        text = json.dumps(data, separators=(",", ":")).encode("utf-8")
    (folder / "tokenizer.json.gz").write_bytes(gzip.compress(text, 6, mtime=0))
    path.unlink()


def _save_frozen(tensors: dict, path: Path) -> None:
    """The frozen base, once: every graph of the bundle reads its tensors as inputs (by name)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "edgeft-frozen-base"})
