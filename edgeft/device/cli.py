"""`edgeft device ...`: the commands a Raspberry Pi or Jetson runs. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli_errors import EdgeftGroup
from ..cli_output import emit


def bundle_options(f):
    f = click.option("--state", "state_dir", type=click.Path(path_type=Path), help="Device state folder (default: BUNDLE/state).")(f)
    f = click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle folder from `edgeft export`.")(f)
    return f


def open_state(bundle: Path, state_dir: Path | None, verify: bool = True):
    from ..bundle import read_manifest, verify_bundle
    from .state import DeviceState, default_state_dir

    manifest = verify_bundle(bundle) if verify else read_manifest(bundle)
    return DeviceState(state_dir or default_state_dir(bundle), bundle, manifest)


def predictor(state, generation: int | None):
    from .data import task_encoder
    from .infer import Predictor

    tokenizer = task_encoder(state.bundle, state.manifest)
    return Predictor(state.bundle, state.manifest, state.params(generation), tokenizer), tokenizer


@click.group(cls=EdgeftGroup)
def device():
    """On-device training and inference (ONNX Runtime, numpy, tokenizers; no torch)."""


@device.command()
@bundle_options
@click.option("--data", required=True, type=click.Path(path_type=Path), help="New data: .jsonl or .csv, same row shapes as train.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Held-out rows that decide promotion (default: 10% of --data).")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, help="Optimizer steps; overrides --epochs.")
@click.option("--lr", type=float, help="Peak learning rate (default 5e-4 classify, 1e-4 causal-lm).")
@click.option("--replay-ratio", type=float, default=None,
              help="Share of each batch replayed from the bundle's reference rows and earlier generations' data (default 0.5; 0: none).")
@click.option("--l2-previous", type=float, default=None,
              help="Pull toward the previous generation's adapter: adds L*(w - w_prev) to the gradient (default 0).")
@click.option("--freeze-head/--no-freeze-head", default=None,
              help="Keep a fully trained classifier head at the previous generation's values, train only the LoRA matrices (default: the device default).")
@click.option("--blend", type=float, default=None,
              help="Promote the previous adapter + B x (trained - previous), a weight-space average that keeps what was known "
                   "(default 0.5; 1: the trained adapter as is).")
@click.option("--blend-backoff", type=int, default=None,
              help="A candidate that regressed on the bundle's reference rows only is checked again at half the blend, "
                   "up to this many times (default 2; 0: promote or reject at --blend).")
@click.option("--reference-loss-rise", type=float, default=None,
              help="Classifiers: how far the loss on the bundle's reference rows may rise against the workstation's adapter, "
                   "as a share (default 0.05; more for a device moving to a visibly new domain whose old one is judged on accuracy).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--checkpoint-every", type=int, default=20, show_default=True, help="Steps between crash-safe checkpoints.")
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Allowed regression: accuracy points (classify) or relative loss (causal-lm).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--check-rows", type=int, default=None,
              help="Promotion check: a seeded sample of at most N rows from each of the held-out, reference and earlier sets "
                   "(default: a third of the rows the generation trains on, as a power of two from 16 to 128).")
@click.option("--refuse-long", is_flag=True, help="Fail on rows longer than the bundle's sequence length instead of truncating.")
@click.option("--restart", is_flag=True, help="Discard an interrupted generation instead of resuming it.")
@click.option("--force", is_flag=True, help="Train even when the memory plan exceeds the target's budget.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime-training", "portable"]), default="auto", show_default=True,
              help="Training engine: auto uses the bundle's portable step (any onnxruntime); onnxruntime-training needs that build (x86-64).")
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary.")
def train(bundle, state_dir, data, eval_data, epochs, max_steps, lr, replay_ratio, l2_previous, freeze_head, blend, blend_backoff, reference_loss_rise,
          grad_accum, checkpoint_every, tolerance, seed, refuse_long, restart, force, backend, quiet, as_json, check_rows=None):
    """Train a new generation on new data; promote it only if it does not regress.

    \b
    edgeft device train --bundle bundle --data new.jsonl --eval-data held.jsonl
    Killed midway, the same command resumes from the last checkpoint.
    """
    from .learner import Learner
    from .guard import REFERENCE_LOSS
    from .trainer import BLEND, BLEND_BACKOFF, FREEZE_HEAD, L2_PREVIOUS, REPLAY_RATIO

    log = lambda m: click.echo(m, err=True)  # noqa: E731
    learner = Learner(bundle, state_dir, verify=False, log=log)  # the trainer verifies the bundle
    s = learner.train(data, eval_data, progress=not quiet, max_steps=max_steps, epochs=epochs, lr=lr,
                      replay_ratio=REPLAY_RATIO if replay_ratio is None else replay_ratio,
                      l2_previous=L2_PREVIOUS if l2_previous is None else l2_previous,
                      freeze_head=FREEZE_HEAD if freeze_head is None else freeze_head,
                      blend=BLEND if blend is None else blend, blend_backoff=BLEND_BACKOFF if blend_backoff is None else blend_backoff,
                      reference_loss_rise=REFERENCE_LOSS if reference_loss_rise is None else reference_loss_rise,
                      grad_accum=grad_accum, checkpoint_every=checkpoint_every, tolerance=tolerance, seed=seed,
                      refuse_long=refuse_long, restart=restart, force=force, backend=backend,
                      **({} if check_rows is None else {"check_rows": check_rows}))
    lines = [f"generation {s['generation']}: {'PROMOTED' if s['promoted'] else 'not promoted'} ({s['reason']}); current is {s['current']}",
             f"steps: {s['steps']} in {s['seconds']} s on {s['backend']}" + (f" (resumed at step {s['resumed_at_step']})" if s["resumed_at_step"] is not None else "")
             + (f", loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}" if s["first_loss"] is not None else "")]
    m = s["metrics"]
    against = [(split, "", m["baseline"][split]) for split in m["candidate"]]
    against += [(split, f" against generation {s['check']['origin']}", old) for split, old in m.get("origin", {}).items()]
    for split, note, old in against:
        new = m["candidate"][split]
        lines.append(f"{split}{note}: " + ", ".join(f"{k} {old[k]:.4f} -> {new[k]:.4f}" for k in ("accuracy", "eval_loss") if k in new))
    lines.append(peak_line(s))
    if s.get("check"):
        c = s["check"]
        drawn = ", ".join(f"{n} {k} of {c['of'][n]}" for n, k in c["drawn"].items())
        lines.append(f"promotion check: {drawn} rows, {c['seconds']} s ({c['engine']})")
    emit(s, as_json, "\n".join(lines))


@device.command()
@bundle_options
@click.option("--json", "as_json", is_flag=True)
def status(bundle, state_dir, as_json):
    """Generations, their metrics and the data each one saw."""
    state = open_state(bundle, state_dir, verify=False)
    data = state.data
    pending = state.job_dir / "job.json"
    out = {"current": data["current"], "generations": data["generations"],
           "interrupted": json.loads(pending.read_text()) if pending.is_file() else None}
    rows = [f"{'gen':>4} {'status':<9} {'parent':>6} {'steps':>6} {'heldout':>9} {'reference':>9}  data"]
    key = "eval_loss" if state.manifest.task == "causal-lm" else "accuracy"
    for g in data["generations"]:
        m = g.get("metrics", {}).get("candidate", {})
        fmt = lambda split: f"{m[split][key]:.4f}" if split in m else "-"  # noqa: E731
        mark = "*" if g["id"] == data["current"] else " "
        seen = f"{g['data']['file']} ({g['data']['rows']} rows)" if g.get("data") else \
            f"update {g['update']['folder']} (run {g['update']['source'].get('name', '?')})" if g.get("update") else g.get("source", "")
        rows.append(f"{mark}{g['id']:>3} {g['status']:<9} {g['parent'] if g['parent'] is not None else '-':>6} {g.get('steps', '-'):>6} "
                    f"{fmt('heldout'):>9} {fmt('reference'):>9}  {seen}")
    if out["interrupted"]:
        j = out["interrupted"]
        rows.append(f"interrupted: generation {j['generation']} on {j['data']['file']} (rerun the same `edgeft device train` to resume)")
    from .pending import PendingStore

    store = PendingStore(state.folder / "learner")  # rows an app or `device watch` added for the next generation
    if store.folder.is_dir():
        c = out["learner"] = store.counts()
        rows.append(f"learner: {c['pending_rows']} rows pending" + (f"; round {c['round']['id']} ({c['round']['rows']} rows) in progress" if c["round"] else ""))
    rows.append(f"metric: {key}; * = current")
    emit(out, as_json, "\n".join(rows))


@device.command()
@click.argument("generation", type=int)
@bundle_options
@click.option("--json", "as_json", is_flag=True)
def rollback(generation, bundle, state_dir, as_json):
    """Make GENERATION the current adapter again."""
    state = open_state(bundle, state_dir, verify=False)
    with state.lock():
        previous = state.current
        record = state.rollback(generation)
    emit({"current": generation, "previous": previous, "status": record["status"]}, as_json,
         f"current generation: {generation} (was {previous})")


def peak_line(s: dict) -> str:
    """The process's measured peak beside its memory plan (plan.plan_process)."""
    plan = s.get("plan")
    if not plan:
        return f"peak RSS {s['peak_rss_mib']:.0f} MiB (the bundle has no memory plan)"
    return (f"peak RSS {s['peak_rss_mib']:.0f} MiB, plan {plan['total_mib']:.0f} MiB ({s['peak_rss_mib'] / plan['total_mib']:.0%}), "
            f"budget {plan['budget_mib']} MiB")


@device.command("eval")
@bundle_options
@click.option("--data", required=True, type=click.Path(path_type=Path))
@click.option("--generation", type=int, help="Default: the current one.")
@click.option("--force", is_flag=True, help="Evaluate even when the memory plan exceeds the target's budget.")
@click.option("--json", "as_json", is_flag=True)
def eval_(bundle, state_dir, data, generation, as_json, force=False):
    """Metrics of the current adapter on DATA, with stock ONNX Runtime inference."""
    from ..bundle import read_manifest
    from ..plan import file_bytes, plan_process, refuse_over_budget
    from .runtime import peak_rss_mib

    plan = plan_process(read_manifest(bundle), bundle, "device eval", file_bytes(data))
    refuse_over_budget(plan, force, lambda m: click.echo(m, err=True))
    from .learner import Learner

    out = Learner(bundle, state_dir).evaluate(data, generation, warn=lambda s: click.echo(s, err=True))
    text = "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in out.items())
    out.update(peak_rss_mib=round(peak_rss_mib(), 1), plan_mib=plan.total_mib if plan else None, plan=plan.to_dict() if plan else None)
    emit(out, as_json, text + "\n" + peak_line(out))


@device.command()
@bundle_options
@click.option("--text", "texts", multiple=True, help="Text to classify (repeatable).")
@click.option("--data", type=click.Path(path_type=Path), help="A .jsonl/.csv with a 'text' field, one prediction per row.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="image-classify: an image file, or a folder of images (repeatable).")
@click.option("--generation", type=int)
@click.option("--json", "as_json", is_flag=True)
def predict(bundle, state_dir, texts, data, images, generation, as_json):
    """Labels with probabilities (classify and image-classify bundles)."""
    from ..datasets import read_records
    from ..errors import DataError, UsageError
    from .learner import Learner

    learner = Learner(bundle, state_dir)
    if learner.task == "image-classify" or images:
        if learner.task != "image-classify" or texts or data:
            raise UsageError("--image is for image-classify bundles, --text and --data for classify ones")
        from ..images import image_files

        preds = learner.predict([str(p) for p in image_files(images)], generation) if images else []
        if not preds:
            raise UsageError("nothing to classify", "pass --image FILE (or a folder of images)")
        emit(preds, as_json, "\n".join(f"{p['label']:<12} {p['probability']:.3f}  {p['image']}" for p in preds))
        return
    if learner.task != "classify":
        raise UsageError("predict is for classify bundles", "use `edgeft device generate` for causal-lm bundles")
    texts = list(texts)
    if data:
        if not Path(data).is_file():
            raise DataError(f"data file {data} does not exist", "check the path")
        for i, r in enumerate(read_records(data), 1):
            if not isinstance(r.get("text"), str) or not r["text"].strip():
                raise DataError(f"{data} row {i}: no non-empty 'text' field", "give every row a 'text' string")
            texts.append(r["text"])
    if not texts:
        raise UsageError("nothing to classify", "pass --text '...' or --data file.jsonl")
    preds = learner.predict(texts, generation)
    emit(preds, as_json, "\n".join(f"{p['label']:<12} {p['probability']:.3f}  {p['text'][:70]}" for p in preds))


@device.command()
@bundle_options
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no top-k cut.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--raw", is_flag=True, help="Do not wrap the prompt in the chat template.")
@click.option("--generation", type=int)
@click.option("--json", "as_json", is_flag=True)
def generate(bundle, state_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed, raw, generation, as_json):
    """Generate text (causal-lm bundles), greedily or with top-k / top-p sampling."""
    from ..errors import UsageError
    from .learner import Learner

    learner = Learner(bundle, state_dir)
    if learner.task != "causal-lm":
        raise UsageError("generate is for causal-lm bundles", "use `edgeft device predict` for classify bundles")
    out = learner.generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat=not raw, generation=generation)
    emit(out, as_json, out["completion"])


@device.command("apply-update")
@click.argument("update", type=click.Path(path_type=Path))
@bundle_options
@click.option("--check", is_flag=True, help="Promote only if it does not regress on the reference and replay rows (as device train does).")
@click.option("--eval-data", type=click.Path(path_type=Path), help="With --check: held-out rows to compare on as well.")
@click.option("--tolerance", type=float, default=0.01, show_default=True, help="With --check: allowed regression, as for device train.")
@click.option("--discard-interrupted", is_flag=True, help="Drop an interrupted `device train` generation instead of refusing.")
@click.option("--dry-run", is_flag=True, help="Check the update against this bundle and say what would happen; change nothing.")
@click.option("--json", "as_json", is_flag=True)
def apply_update_cmd(update, bundle, state_dir, check, eval_data, tolerance, discard_interrupted, dry_run, as_json):
    """Apply an adapter update (`edgeft export --update-for`) as a new generation.

    \b
    edgeft device apply-update --bundle bundles/sentiment updates/v2
    Every file is checked against its sha256, and the update against this bundle's base
    fingerprint, task, labels, scheme and tensor shapes, before anything changes. The update
    becomes current (its parent stays one `edgeft device rollback` away); --check gates it on
    the device's reference rows as `device train` is.
    """
    from .apply import apply_update

    state = open_state(bundle, state_dir, verify=False)  # the update's files are hashed; the bundle's are when it is used
    s = apply_update(state, update, check=check, eval_data=eval_data, tolerance=tolerance, discard_interrupted=discard_interrupted,
                     dry_run=dry_run, log=lambda m: click.echo(m, err=True))
    if s["already_applied"]:
        text = f"{update} is already generation {s['generation']} ({s['status']}); current is {s['current']}; nothing changed"
    elif s.get("dry_run"):
        text = f"{update} fits this bundle: it would become generation {s['generation']}, {'promoted' if s['promoted'] else 'not promoted'} ({s['reason']}); nothing changed"
    else:
        text = (f"generation {s['generation']}: {'PROMOTED' if s['promoted'] else 'not promoted'} ({s['reason']}); current is {s['current']}"
                f"\nupdate {s['bytes'] / 2**20:.2f} MiB, {s['tensors']} tensors, applied in {s['seconds']} s; "
                f"`edgeft device rollback {s['previous']}` undoes it")
    emit(s, as_json, text)


@device.command("export-adapter")
@bundle_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write (PEFT layout).")
@click.option("--generation", type=int, help="Default: the current one.")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def export_adapter_cmd(bundle, state_dir, out, generation, overwrite, as_json):
    """Write a generation's adapter as a PEFT folder for the workstation (`edgeft import`)."""
    from .adapter_out import export_adapter

    state = open_state(bundle, state_dir)
    s = export_adapter(state, out, generation, overwrite)
    emit(s, as_json, f"adapter of generation {s['generation']} written to {s['adapter']} ({s['tensors']} tensors, PEFT format)")


@device.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def verify(bundle, as_json):
    """Check every bundle file against its sha256 in the manifest."""
    from ..bundle import verify_bundle

    m = verify_bundle(bundle)
    emit({"bundle": str(bundle), "files": len(m.files), "ok": True}, as_json, f"{bundle}: all {len(m.files)} files match the manifest")


from .watch_cli import install_service, watch  # noqa: E402  (the service commands live in their own module)

device.add_command(watch)
device.add_command(install_service)

from ..fleet.cli import fleet_join  # noqa: E402  (a device joins a fleet: Flower is imported only when it runs)

device.add_command(fleet_join)
