"""edgeft command line. Heavy libraries are imported inside commands, so
`edgeft --help` and `--version` stay instant and the device side stays torch-free."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .cli_errors import EdgeftGroup
from .cli_output import emit


@click.group(cls=EdgeftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeft")
def main():
    """Fine-tune models for small devices: quantization-aware QLoRA on the
    workstation, incremental training on the device with ONNX Runtime."""


# -- doctor ------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(as_json):
    """What this machine can run, and what to install for the rest."""
    from .doctor import diagnose, render

    report = diagnose()
    emit(report, as_json, render(report))


# -- targets -----------------------------------------------------------------
@main.group()
def targets():
    """Device profiles: memory budget, threads, providers, quantization scheme."""


@targets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets_list(as_json):
    """List the built-in target profiles."""
    from .targets import list_targets

    profiles = list_targets()
    rows = [f"{'name':<24} {'arch':<8} {'ram':>7} {'budget':>7} {'scheme':<10} {'batch x seq':<11} providers"]
    for t in profiles:
        rows.append(f"{t.name:<24} {t.arch:<8} {t.ram_mb:>5}MB {t.budget_mb:>5}MB {t.scheme.name:<10} "
                    f"{t.batch_size:>3} x {t.max_seq_len:<5} {','.join(p.replace('ExecutionProvider', '') for p in t.execution_providers)}")
    emit([t.to_dict() for t in profiles], as_json, "\n".join(rows))


@targets.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets_show(name, as_json):
    """Show one profile (a built-in NAME or a path to a .toml)."""
    from .targets import load_target

    t = load_target(name)
    d = t.to_dict()
    d["bytes_per_base_param"] = round(t.scheme.bytes_per_param, 4)
    emit(d, as_json, "\n".join(f"{k:<22} {v}" for k, v in d.items()))


# -- train -------------------------------------------------------------------
@main.command()
@click.option("--model", type=click.Path(path_type=Path), help="Local Hugging Face model folder.")
@click.option("--data", type=click.Path(path_type=Path), help="Training data: .jsonl, .csv or .parquet.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Validation data (default: a seeded split of --data).")
@click.option("--val-fraction", default=0.1, show_default=True, help="Validation share when --eval-data is absent.")
@click.option("--task", type=click.Choice(["classify", "causal-lm", "image-classify"]),
              help="classify: {text,label} rows; causal-lm: messages, prompt/completion or text rows; image-classify: class folders or {image,label} rows.")
@click.option("--target", help="Target profile name or .toml path: sets the base quantization, batch and sequence length.")
@click.option("--quant", help="Base quantization scheme (nf4, int8, int4-g128, int3-g32...); overrides the target's.")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Continue the run in this directory from its last checkpoint (from any working directory); "
                   "after an interrupted --overwrite, continue the new run.")
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it exists. The new run trains in .NAME.new beside it and replaces it only when training "
                   "ends; if it fails, the old run stays.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, help="Optimizer steps; overrides --epochs.")
@click.option("--batch-size", type=int, help="Per-process batch (default: the target's, else 8).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-seq-len", type=int, help="Tokens per row (default: the target's, else 256).")
@click.option("--lr", type=float, help="Peak learning rate (default 1e-3 classify, 2e-4 causal-lm).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.06, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Clip gradients to this norm (0: off).")
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=float, default=32.0, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option("--target-modules", help="Comma-separated module names for LoRA (default: per architecture).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--eval-every", type=int, help="Evaluate every N steps (default: about 5 times per run).")
@click.option("--checkpoint-every", type=int,
              help="Save resume state every N steps, and at each evaluation (default: every 50 steps or every tenth of the run, "
                   "whichever is more often).")
@click.option("--no-eval-before", is_flag=True, help="Skip the validation pass before training.")
@click.option("--patience", type=int, help="Stop after N evaluations without improvement.")
@click.option("--metric", type=click.Choice(["accuracy", "macro_f1", "eval_loss"]), help="Metric that picks the best adapter.")
@click.option("--reference-data", type=click.Path(path_type=Path), help="Forgetting check (causal-lm): loss on these rows before and after.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True, help="Autocast on CUDA; fp32 on CPU.")
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for activation memory.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder (off by default).")
@click.option("--init-adapter", type=click.Path(path_type=Path), help="Start from this adapter's weights (e.g. one exported from a device).")
@click.option("--image-size", type=int, help="image-classify: the square the model sees (default: the model folder's, 224).")
@click.option("--augment/--no-augment", default=True, show_default=True, help="image-classify: random crop, flip and brightness/contrast in training.")
@click.option("--unfreeze-blocks", type=int, default=0, show_default=True, help="image-classify: also train the last N blocks whole.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout at the end.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(model, data, eval_data, val_fraction, task, target, quant, out, resume_dir, overwrite, epochs, max_steps, batch_size,
          grad_accum, max_seq_len, lr, weight_decay, warmup_ratio, schedule, max_grad_norm, lora_r, lora_alpha, lora_dropout,
          target_modules, text_field, label_field, eval_every, checkpoint_every, no_eval_before, patience, metric, reference_data, seed, device,
          precision, gradient_checkpointing, trust_remote_code, init_adapter, image_size, augment, unfreeze_blocks, as_json, quiet):
    """Fine-tune a local model with quantization-aware QLoRA.

    \b
    edgeft train --model assets/models/all-MiniLM-L6-v2 --task classify \\
        --data assets/data/sentiment/train.jsonl --target raspberry-pi-5-8gb --out runs/sentiment
    """
    from .errors import UsageError
    from .workstation.train import Trainer, TrainConfig

    if resume_dir:
        from .workstation.rundir import read_run_config, resume_folder

        folder = resume_folder(resume_dir)
        if folder is None:
            raise UsageError(f"{resume_dir} is not a run directory (no config.json)", "pass the --out folder of an earlier edgeft train")
        cfg = TrainConfig(**read_run_config(resume_dir, folder))
        if max_steps:
            cfg.max_steps = max_steps
        if checkpoint_every:
            cfg.checkpoint_every = checkpoint_every  # saving more or less often does not change the trajectory
    else:
        missing = [n for n, v in (("--model", model), ("--data", data), ("--task", task), ("--out", out)) if not v]
        if missing:
            raise UsageError(f"missing {', '.join(missing)}", "see `edgeft train --help`, or use --resume RUN")
        profile = None
        if target:
            from .targets import load_target

            profile = load_target(target).for_task(task)
        from .schemes import default_scheme, parse_scheme

        scheme = parse_scheme(quant) if quant else (profile.scheme if profile else default_scheme(task))
        cfg = TrainConfig(
            model=str(model), data=str(data), task=task, out=str(out), eval_data=str(eval_data) if eval_data else None,
            val_fraction=val_fraction, target=profile.name if profile else None, scheme=scheme.name, text_field=text_field,
            label_field=label_field, max_seq_len=max_seq_len or (profile.max_seq_len if profile else 256),
            batch_size=batch_size or (profile.batch_size if profile else 8), grad_accum=grad_accum, epochs=epochs,
            max_steps=max_steps, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, schedule=schedule,
            max_grad_norm=max_grad_norm, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=[m.strip() for m in target_modules.split(",")] if target_modules else None, eval_every=eval_every,
            checkpoint_every=checkpoint_every, eval_before=not no_eval_before, patience=patience, metric=metric,
            reference_data=str(reference_data) if reference_data else None, seed=seed, device=device, precision=precision,
            gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
            init_adapter=str(init_adapter) if init_adapter else None, image_size=image_size, augment=augment,
            unfreeze_blocks=unfreeze_blocks,
        )
    quiet_libraries()
    trainer = Trainer(cfg, resume=bool(resume_dir), overwrite=overwrite, progress=not quiet, log=lambda m: click.echo(m, err=True))
    trainer.setup()
    if not as_json and trainer.main:
        click.echo(f"training {cfg.task} on {cfg.model}: base {cfg.scheme}, {trainer.trainable:,} trainable of {trainer.total_params:,} "
                   f"params, {trainer.total_steps} steps on {trainer.device}", err=True)
    summary = trainer.run()
    if trainer.main:
        emit(summary, as_json, human_summary(summary))


@main.command("eval")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="A run directory or a PEFT adapter folder.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Evaluation data (same row shapes as train).")
@click.option("--quant", help="Quantize the base with this scheme (default: the scheme the adapter was trained against).")
@click.option("--target", help="Quantize the base as this target's profile does.")
@click.option("--model", type=click.Path(path_type=Path),
              help="Base model folder (default: the run's, or one the adapter points to); must match the base the adapter was made for.")
@click.option("--max-seq-len", type=int, help="Default: the length used in training.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_command(adapter, data, quant, target, model, max_seq_len, batch_size, device, as_json):
    """Evaluate an adapter over a base quantized with a given scheme.

    Use it to see what a device with another scheme would score: the gap between
    the adapter's own scheme and another is what quantization-aware training buys.
    """
    from .schemes import parse_scheme
    from .targets import load_target
    from .workstation.adapters import adapter_scheme, evaluate_adapter, read_adapter_meta
    from .workstation.load import resolve_device

    quiet_libraries()
    meta = read_adapter_meta(adapter)
    scheme = parse_scheme(quant) if quant else load_target(target).for_task(meta["task"]).scheme if target else adapter_scheme(meta)
    metrics = evaluate_adapter(adapter, str(data), scheme, resolve_device(device), max_seq_len, batch_size, base_model=model)
    emit(metrics, as_json, "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))


def _export_source(run, model, adapter):
    """A run directory, or a base model folder plus a PEFT adapter folder from any tool."""
    from .errors import UsageError

    if bool(run) == bool(adapter):
        raise UsageError("pass either --run RUN or --adapter DIR (with --model BASE)", "see `edgeft export --help`")
    return run or adapter, str(model) if model else None


@main.command()
@click.option("--run", type=click.Path(path_type=Path), help="A run directory from edgeft train.")
@click.option("--adapter", type=click.Path(path_type=Path), help="A PEFT adapter folder made by any tool (with --model).")
@click.option("--model", type=click.Path(path_type=Path), help="Base model folder (default: the run's, or one the adapter points to); must match the base the adapter was made for.")
@click.option("--labels", help="Comma-separated label names, for classify adapters made outside edgeft.")
@click.option("--target", help="Target profile name or .toml path (with --update-for: the bundle's, so not needed).")
@click.option("--update-for", "update_for", type=click.Path(path_type=Path),
              help="A bundle a device already holds: write only an adapter update for it (a few MB, seconds), not a bundle.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to create (with --update-for: the update folder).")
@click.option("--batch", type=int, help="Device training batch (default: the target's).")
@click.option("--seq", type=int, help="Device sequence length (default: the target's, capped by training's).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--force", is_flag=True, help="Export even when the memory plan exceeds the target's budget.")
@click.option("--reference-data", type=click.Path(path_type=Path),
              help="Rows the device keeps to check updates for forgetting (default: the run's validation data; 256 at most).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary.")
def export(run, adapter, model, labels, target, update_for, out, batch, seq, overwrite, force, reference_data, as_json):
    """Write a device bundle: ONNX Runtime training artifacts, inference model, adapters, manifest.

    \b
    edgeft export --run runs/sentiment --target raspberry-pi-5-8gb --out bundles/sentiment
    edgeft export --run runs/sentiment-v2 --update-for bundles/sentiment --out updates/v2   # adapter only
    """
    from .errors import UsageError
    from .targets import load_target
    from .workstation.export import export_bundle

    source, base = _export_source(run, model, adapter)
    if update_for:
        given = [n for n, v in (("--batch", batch), ("--seq", seq), ("--force", force), ("--reference-data", reference_data)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} do not apply to --update-for: an update keeps everything of the bundle but the adapter",
                             "leave them out, or export a new bundle with --target")
        return _export_update(source, update_for, out, overwrite, base, labels, target, as_json)
    if not target:
        raise UsageError("missing --target", "name a target profile (`edgeft targets list`), or pass --update-for BUNDLE for an adapter update")
    profile = load_target(target)
    quiet_libraries()
    if reference_data is None and run and (Path(run) / "config.json").is_file():
        from .workstation.rundir import read_run_config

        reference_data = read_run_config(Path(run)).get("eval_data")  # config.json paths are relative to the run
        if reference_data and not Path(reference_data).exists():  # a file, or a folder of class folders (images)
            click.echo(f"note: the run's validation data {reference_data} is not here; the bundle carries no reference rows", err=True)
            reference_data = None
    s = export_bundle(source, profile, out, overwrite=overwrite, force=force, batch=batch, seq=seq, base_model=base,
                      labels=labels.split(",") if labels else None, reference=Path(reference_data) if reference_data else None,
                      log=lambda m: click.echo(m, err=True))
    p = s["parity"]
    emit(s, as_json, "\n".join([
        f"bundle: {s['bundle']} ({s['bundle_bytes'] / 2**20:.1f} MiB) for {s['target']}, base {s['scheme']}",
        f"base: {s['base_params']:,} params in {s['base_bytes'] / 2**20:.1f} MiB ({s['base_bytes_per_param']} bytes/param)",
        f"parity vs torch: logits rel {p['logits_rel']:.1e}, loss rel {p['loss_rel']:.1e}, grad rel {p['grad_rel']:.1e}, "
        f"AdamW step max abs {p['step_max_abs']:.1e} (tolerance {p['tolerance']:g})",
        f"device memory plan: {s['memory_plan']['total_mib']:.0f} MiB of {s['memory_plan']['budget_mib']} MiB budget",
        f"exported in {s['export_seconds']} s",
    ]))


def _export_update(source, bundle, out, overwrite, base, labels, target, as_json):
    from .workstation.update import make_update

    quiet_libraries()
    s = make_update(source, bundle, out, overwrite=overwrite, base_model=base, labels=labels.split(",") if labels else None,
                    target=target, log=lambda m: click.echo(m, err=True))
    p = s["parity"]
    emit(s, as_json, "\n".join([
        f"update: {s['update']} ({s['update_bytes'] / 2**20:.2f} MiB, {s['tensors']} tensors, {s['trainable_params']:,} params) "
        f"for {s['bundle']} ({s['bundle_bytes'] / 2**20:.1f} MiB)",
        f"base: {s['base']['name']} ({s['base']['fingerprint'].removeprefix('sha256:')[:12]}), {s['scheme']}, target {s['target']}",
        f"bundle's inference graph with the update vs torch: logits rel {p['logits_rel']:.1e} (tolerance {p['tolerance']:g})",
        f"made in {s['seconds']} s; on the device: edgeft device apply-update --bundle BUNDLE {s['update']}",
    ]))


@main.command("import")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged model folder (--merge), or the new run directory.")
@click.option("--merge", is_flag=True, help="Fold the adapter into its base and save a plain model folder.")
@click.option("--data", type=click.Path(path_type=Path), help="Continue training on this data (without --merge).")
@click.option("--eval-data", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help="Base model folder (default: the run's, or one the adapter points to); must match the base the adapter was made for.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int)
@click.option("--lr", type=float)
@click.option("--batch-size", type=int)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def import_command(adapter, out, merge, data, eval_data, model, epochs, max_steps, lr, batch_size, overwrite, as_json):
    """Bring adapters back from a device: merge them into the base, or continue training from them.

    \b
    edgeft device export-adapter --bundle bundle --out gen3        # on the device
    edgeft import gen3 --merge --out models/sentiment-merged       # a plain HF model
    edgeft import gen3 --data more.jsonl --out runs/continued      # train on from gen3

    The merge folds the adapter into the quantized base the device runs, in fp32, so the folder
    computes the device's logits. Text: a Hugging Face model folder (config, safetensors,
    tokenizer). Images: config.json + model.safetensors of the image backbone with the trained head
    and its labels kept; `edgeft train --model MERGED --task image-classify` takes it as a new base
    (quantized again, its head kept for the labels it knows). Continuing (--data) keeps the
    adapter's rank, modules and labels, and for images its size and unfrozen blocks.
    """
    from .errors import UsageError
    from .workstation.adapters import adapter_scheme, read_adapter_meta, resolve_base

    quiet_libraries()
    if merge:
        if data:
            raise UsageError("--merge and --data do not go together", "merge, or continue training, one at a time")
        from .workstation.merge import merge_adapter

        s = merge_adapter(adapter, out, overwrite, str(model) if model else None)
        emit(s, as_json, f"merged {adapter} into its {s['scheme']} base: {s['model']} (logits match the adapter to {s['logits_rel']:.1e})")
        return
    if not data:
        raise UsageError("nothing to do: pass --merge, or --data to continue training", "see `edgeft import --help`")
    from .workstation.train import Trainer, TrainConfig

    meta = read_adapter_meta(adapter)
    # the adapter fixes the rest (rank, modules, labels; for images the size and the unfrozen blocks): adopt_adapter
    cfg = TrainConfig(model=str(resolve_base(meta, model)[0]), data=str(data), eval_data=str(eval_data) if eval_data else None,
                      task=meta["task"], out=str(out), target=meta.get("target"), scheme=adapter_scheme(meta).name,
                      max_seq_len=meta.get("max_seq_len") or 256, batch_size=batch_size or 8, epochs=epochs, max_steps=max_steps,
                      lr=lr, init_adapter=str(adapter))
    trainer = Trainer(cfg, overwrite=overwrite, progress=not as_json, log=lambda m: click.echo(m, err=True))
    trainer.setup()
    summary = trainer.run()
    emit(summary, as_json, human_summary(summary))


@main.command()
@click.option("--run", type=click.Path(path_type=Path), help="A run directory from edgeft train.")
@click.option("--adapter", type=click.Path(path_type=Path), help="A PEFT adapter folder (with --model).")
@click.option("--model", type=click.Path(path_type=Path), help="Base model folder.")
@click.option("--target", required=True, help="Target profile name or .toml path.")
@click.option("--batch", type=int)
@click.option("--seq", type=int)
@click.option("--json", "as_json", is_flag=True)
def plan(run, adapter, model, target, batch, seq, as_json):
    """Estimate device memory for on-device training, without exporting."""
    from .plan import device_shape, plan_memory
    from .targets import load_target
    from .workstation.adapters import read_adapter_meta, resolve_base

    source, base = _export_source(run, model, adapter)
    meta = read_adapter_meta(source)
    profile = load_target(target).for_task(meta["task"])
    if meta["task"] == "image-classify":  # activations by image size (the run's), batch from the profile's [vision]
        from .plan import plan_image_memory

        p = plan_image_memory(resolve_base(meta, base)[0], Path(meta["adapter_dir"]), profile, batch or profile.batch_size,
                              seq or (meta.get("preprocess") or {}).get("size", 224), len(meta.get("labels") or []))
    else:
        p = plan_memory(resolve_base(meta, base)[0], Path(meta["adapter_dir"]), profile, meta["task"],
                        *device_shape(profile, meta.get("max_seq_len"), batch, seq))
    emit(p.to_dict(), as_json, p.render())
    if not p.fits:
        from .errors import PlanError

        sys.exit(PlanError.exit_code)


def human_summary(s: dict) -> str:
    lines = [f"run: {s['run']}", f"adapter: {s['adapter']}", f"steps: {s['steps']} in {s['train_seconds']} s ({s['seconds_per_step']} s/step)"]
    before, after = s.get("before") or {}, s.get("after") or {}
    for k, v in after.items():
        lines.append(f"{k}: {before[k]:.4f} -> {v:.4f}" if k in before else f"{k}: {v:.4f}")
    lines.append(f"best {s['metric']}: {s['best']:.4f} (step {s['best_step']})")
    if s.get("forgetting"):
        f = s["forgetting"]
        lines.append(f"reference loss: {f['reference_loss_before']:.4f} -> {f['reference_loss_after']:.4f}")
    return "\n".join(lines)


def quiet_libraries() -> None:
    """Silence load-time chatter that is not the user's concern (weight-loading bars, bnb kernel probes)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


from .device.cli import device  # noqa: E402  (the device group is torch-free; it lives with the device code)

main.add_command(device)

from .fleet.cli import fleet  # noqa: E402  (torch-free; Flower is imported only when a fleet command runs)

main.add_command(fleet)
