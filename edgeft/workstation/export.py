"""`edgeft export`: a device bundle that trains exactly as the workstation model did.

Steps: rebuild the workstation model (quantized base + adapter) in fp32 torch
(device_model.py), export a loss graph and a logits graph with the legacy exporter
(parameter names kept), swap every frozen base weight for packed codes + a rebuilding
subgraph, generate ONNX Runtime training artifacts (AdamW patched to torch semantics),
rewrite them into standard ops (portable.py), then validate the bundle against torch
(validate.py).
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
from .device_model import PREFIX, LogitsGraph, LossGraph, device_model, peft_key, sample_batch
from .onnx_base import PackedWeight, base_initializer_names, pack_int, pack_nf4, replace_initializers

OPSET = 17  # ORT 1.19 reads <= 21; 17 is what the legacy exporter handles best
IR_VERSION = 9
OPTIMIZER = {"name": "AdamW", "semantics": "torch.optim.AdamW", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
REFERENCE, REFERENCE_ROWS = "reference.jsonl", 256


def pack_base(graph_names: set[str], keep: dict, scheme) -> list[PackedWeight]:
    """Packed codes for every quantized tensor that appears in the exported graph."""
    packed = []
    for module_name, codes in keep.items():
        candidates = [f"{PREFIX}base_model.model.{module_name}.{suffix}" for suffix in ("base_layer.weight", "weight")]
        name = next((c for c in candidates if c in graph_names), None)
        if name is None:
            continue  # a tied weight exported under its other name
        if isinstance(codes, tuple):  # nf4: (packed bytes, bnb QuantState)
            packed.append(_pack_bnb(name, *codes))
        else:
            packed.append(pack_int(name, codes.codes, codes.scale, codes.zero, codes.group_size, scheme.bits, scheme.symmetric))
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


def export_graph(module, args, path: Path, inputs: list[str], outputs: list[str], dynamic: dict, training: bool) -> None:
    """The graph only: parameters come out as named inputs, and `attach_weights` supplies
    them, so the fp32 base is never serialized just to be replaced by packed codes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=False, export_params=False,
                          training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic)


def add_layernorm_stats(model) -> None:
    """ORT's LayerNormalization gradient needs the saved mean and inv-std outputs."""
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "LayerNormalization"):
        while len(node.output) < 3:
            node.output.append(f"{node.output[0]}::stat{len(node.output)}_{i}")


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


def generate(loss_path: Path, out: Path, trainable: list[str], frozen: list[str], weight_decay: float) -> None:
    """ORT training artifacts; AdamW patched to torch.optim.AdamW semantics (adam_mode 0, eps 1e-8)."""
    import onnx
    from onnxruntime.training import artifacts

    with quiet_native_stderr():
        artifacts.generate_artifacts(str(loss_path), requires_grad=trainable, frozen_params=frozen, loss=None,
                                     optimizer=artifacts.OptimType.AdamW, artifact_directory=str(out))
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
    scheme = target.scheme
    if meta.get("scheme") and meta["scheme"] != scheme.name:
        log(f"warning: the adapter was trained against {meta['scheme']}, the device base is {scheme.name}; "
            f"metrics will differ (retrain with --target {target.name} for a quantization-aware adapter)")
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
        export_graph(LossGraph(model, task), (sample["input_ids"], sample["attention_mask"], sample["labels"]), work / "loss.onnx",
                     ["input_ids", "attention_mask", "labels"], ["loss"], {**axes, "labels": label_axes}, training=True)
        profile_mark("  torch.onnx.export: logits graph")
        export_graph(LogitsGraph(model), (sample["input_ids"], sample["attention_mask"]), tmp / "inference_model.onnx",
                     ["input_ids", "attention_mask"], ["logits"], {**axes, "logits": {0: "batch"}}, training=False)
        stage("packing the quantized base", "try a target with another quantization scheme, or report the model with the log")
        packed, base_names = _quantize_graphs([work / "loss.onnx", tmp / "inference_model.onnx"], LossGraph(model, task), keep, scheme)
        import onnx

        profile_mark("  onnx.load of the packed loss graph")
        graph = onnx.load(str(work / "loss.onnx"))
        # Packed base tensors are frozen params, so they live once in the checkpoint (shared by the
        # training and eval graphs) and stay graph inputs: ORT's training transformers would
        # otherwise constant-fold them back into fp32 weights.
        frozen = [i.name for i in graph.graph.initializer if i.name not in set(trainable)]
        from .preflight import explain_generation_error, preflight

        stage("generating the training graph (onnxruntime-training)", "check `edgeft doctor` (export needs onnxruntime-training "
              "1.19.2), train with fewer --target-modules, or report the model with the log")
        preflight(graph, trainable)
        try:
            generate(work / "loss.onnx", tmp, trainable, frozen, weight_decay=OPTIMIZER["weight_decay"])
        except RuntimeError as e:
            raise explain_generation_error(e, graph, trainable) or e
        from .portable import write_portable

        stage("rewriting the training step into standard ops (portable/)", "report the model with the log")
        portable = write_portable(tmp, OPTIMIZER, recompute=not plan.holds_base)
        profile_mark("  adapter, tokenizer, reference rows")
        base_bytes = sum(p.nbytes for p in packed)
        shutil.rmtree(work)
        model.save_pretrained(str(tmp / "adapter"))
        from ..basemodel import set_peft_base_name

        set_peft_base_name(tmp / "adapter", meta["base"]["name"])  # a name, not the workstation's path
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if retained:
            (tmp / REFERENCE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in retained), encoding="utf-8")
        export_seconds = time.perf_counter() - t0
        from .validate import INFERENCE_DISABLED_OPTIMIZERS, validate_bundle

        stage("validating the bundle against torch", "report the model and target with the log")
        parity = validate_bundle(tmp, model, task, tokenizer, labels, trainable, batch=min(batch, 4), seq=min(seq, 64), portable=portable)
        base_params = sum(int(np.prod(p.shape)) for p in packed)
        profile_mark("  manifest (hashing every file)")
        summary = {
            "bundle": str(out), "target": target.name, "scheme": scheme.name, "task": task,
            "export_seconds": round(export_seconds, 1), "base_params": base_params, "base_bytes": base_bytes,
            "base_bytes_per_param": round(base_bytes / max(base_params, 1), 4), "trainable_params": sum(int(np.prod(p.shape)) for n, p in model.named_parameters() if p.requires_grad),
            "parity": parity,
        }
        write_manifest(tmp, {
            "edgeft_version": __version__, "task": task, "labels": labels, "target": target.to_dict(source=False), "scheme": scheme.name,
            "model_type": model.get_base_model().config.model_type, "base": meta["base"],  # name + fingerprint, no path
            "trainable": {n: peft_key(n) for n in trainable},
            "inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"], "labels": ["batch"] if task == "classify" else ["batch", "seq"]},
            "train_shape": {"batch": batch, "seq": seq}, "max_seq_len": seq,
            "tokenizer": sorted(f"tokenizer/{f.name}" for f in (tmp / "tokenizer").iterdir()),
            "optimizer": OPTIMIZER, "portable": portable,
            "schedule": _run_schedule(meta["adapter_dir"]),
            "inference": {"file": "inference_model.onnx", "disabled_optimizers": INFERENCE_DISABLED_OPTIMIZERS},
            "parity": parity, "base_bytes_per_param": summary["base_bytes_per_param"], "memory_plan": plan.to_dict(),
            "reference": {"file": REFERENCE, "rows": len(retained)} if retained else None,
        })
        summary["memory_plan"] = plan.to_dict()
        summary["bundle_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        summary["bundle_bytes_per_base_param"] = round(summary["bundle_bytes"] / max(base_params, 1), 4)
    return summary


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


def _quantize_graphs(paths: list[Path], wrapper: torch.nn.Module, keep: dict, scheme) -> tuple[list[PackedWeight], list[str]]:
    """Give each graph its weights: packed codes for the quantized base (proven to decode to
    the torch weight bit for bit), plain tensors for everything else."""
    import onnx
    from onnx import numpy_helper

    state = {k: v.detach() for k, v in wrapper.state_dict(keep_vars=True).items()}
    packed: list[PackedWeight] = []
    for path in paths:
        model = onnx.load(str(path))
        user_inputs = [i for i in model.graph.input if i.name not in state]
        param_names = [i.name for i in model.graph.input if i.name in state]
        del model.graph.input[:]
        model.graph.input.extend(user_inputs)
        packed = pack_base(set(param_names), keep, scheme)
        for p in packed:
            if not np.array_equal(p.dequantize(), state[p.name].numpy()):
                raise EdgeftError(f"internal: packed {p.name} does not decode to the workstation weight", "please report this")
        plain = set(param_names) - {p.name for p in packed}
        model.graph.initializer.extend(numpy_helper.from_array(state[n].numpy(), n) for n in sorted(plain))
        replace_initializers(model, packed, dequantize_linear=path == paths[0])  # the training graph (see there)
        add_layernorm_stats(model)
        model.ir_version = IR_VERSION
        save_onnx(model, path)
    return packed, base_initializer_names(onnx.load(str(paths[0]), load_external_data=False))


def save_onnx(model, path: Path) -> None:
    """Protobuf caps a file at 2 GB: larger graphs keep their tensors in `<name>.data` beside them."""
    import onnx

    if model.ByteSize() > 1_900_000_000:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))
