"""The training loop: AdamW (torch semantics), warmup + decay, accumulation, clipping,
periodic eval, early stopping on the best adapter, resume, and DDP under torchrun.

Run directory layout:
  config.json       resolved configuration (what --resume reads back)
  adapter/          best adapter, PEFT format, + tokenizer + edgeft.json
  checkpoint/       resume state (safetensors + JSON), replaced atomically every
                    --checkpoint-every steps and at each evaluation
  metrics.jsonl     one JSON line per logged step and per evaluation
  report.md, *.png  written at the end
  summary.json      the final summary
How the folder survives crashes and --overwrite: rundir.py.

Resume is bit-exact: the checkpoint holds the trainable tensors, AdamW state, RNG states, the
GradScaler state and the counters; batches and the learning rate follow from the step alone.
The checkpoint at an evaluation step is written before the adapter it may publish, so the
adapter is never ahead of a checkpoint; a crash between the two is repaired on resume.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import DataError, TrainingDiverged, UsageError
from ..fsutil import append_jsonl, atomic_dir, atomic_write_json, read_jsonl, swap_in
from .rundir import config_for_disk, plan_run_dir, start_run_dir, truncate_metrics


from .train_config import TrainConfig, adopt_adapter, default_checkpoint_every, load_data, lr_at  # noqa: F401  (re-exported)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True, log=None):
        self.cfg, self.resume, self.overwrite, self.progress = cfg, resume, overwrite, progress
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.final = Path(cfg.out)  # the run folder the user named
        self.out = self.final  # where this run writes: `final`, or its staging twin under --overwrite (rundir.py)

    # -- setup ---------------------------------------------------------------
    def setup(self) -> None:
        self.prepare_data()
        self.build_model()

    def prepare_data(self) -> None:
        """Everything that can fail on user input happens here, before any weights load."""
        import torch

        from .load import inspect_model_dir, resolve_device

        cfg = self.cfg
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.run_dir = plan_run_dir(self.final, self.resume, self.overwrite, main=self.main, log=self.log)
        self.out = self.run_dir.work
        info = inspect_model_dir(cfg.model, cfg.task)
        train_rows, val_rows, names = load_data(cfg)
        cfg.labels = adopt_adapter(cfg, names) if cfg.init_adapter else names
        device = resolve_device(cfg.device)
        if self.world > 1:
            import torch.distributed as dist

            local = int(os.environ.get("LOCAL_RANK", 0))
            if device == "cuda":
                device = f"cuda:{local}"
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        self.device = device
        torch.manual_seed(cfg.seed)
        self.images = None
        if cfg.task == "image-classify":
            self._prepare_images(train_rows, val_rows)
        else:
            self._prepare_text(train_rows, val_rows)
        from ..encode import batches_per_epoch
        from ..schedule import total_steps

        self.batches_per_epoch = batches_per_epoch(len(self.train_set), cfg.batch_size, self.world)  # shared with the device
        if self.batches_per_epoch < 1:
            raise DataError(f"{cfg.data} has {len(self.train_set)} training rows, fewer than one batch of {cfg.batch_size} per process", "lower --batch-size or add data")
        steps_per_epoch = max(1, self.batches_per_epoch // cfg.grad_accum)
        self.total_steps = total_steps(self.batches_per_epoch, cfg.grad_accum, cfg.epochs, cfg.max_steps)
        self.eval_every = cfg.eval_every or max(1, min(steps_per_epoch, math.ceil(self.total_steps / 5)))
        self.checkpoint_every = cfg.checkpoint_every or default_checkpoint_every(self.total_steps)
        self.info = info

    def _prepare_images(self, train_rows, val_rows) -> None:
        """Image rows (vision_train.py), every image decoded once up front so a bad file fails here."""
        from ..images import Preprocess
        from .vision_model import read_config
        from .vision_train import ImageRows

        cfg = self.cfg
        self.preprocess = Preprocess.from_dict(read_config(cfg.model).get("preprocess", {}), cfg.image_size)
        cfg.image_size = self.preprocess.size
        self.train_set = ImageRows(*zip(*train_rows), cfg.labels, self.preprocess)
        self.val_set = ImageRows(*zip(*val_rows), cfg.labels, self.preprocess)
        self.train_set.check()
        self.val_set.check()
        self.images, self.tokenizer, self.truncated, self.reference_set = True, None, 0, None

    def _prepare_text(self, train_rows, val_rows) -> None:
        from ..datasets import load_causal
        from ..encode import encode_causal, encode_classify, require_answers

        cfg, names = self.cfg, self.cfg.labels
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if cfg.task == "classify":
            self.train_set = encode_classify(self.tokenizer, *zip(*train_rows), names, cfg.max_seq_len)
            self.val_set = encode_classify(self.tokenizer, *zip(*val_rows), names, cfg.max_seq_len)
            self.truncated, self.reference_set = 0, None
        else:
            self.train_set, self.truncated = encode_causal(self.tokenizer, train_rows, cfg.max_seq_len)
            self.val_set, _ = encode_causal(self.tokenizer, val_rows, cfg.max_seq_len)
            hint = f"raise --max-seq-len (now {cfg.max_seq_len}), or shorten the prompts"
            require_answers(self.train_set, "training data", cfg.max_seq_len, hint, self.log)
            require_answers(self.val_set, "validation data", cfg.max_seq_len, hint, self.log)
            self.reference_set = encode_causal(self.tokenizer, load_causal(cfg.reference_data), cfg.max_seq_len)[0] if cfg.reference_data else None

    def build_model(self) -> None:
        import torch

        from ..schemes import parse_scheme
        from .lora import count_parameters

        cfg, info, device, names = self.cfg, self.info, self.device, self.cfg.labels
        if self.images:
            from .vision_train import ImageObjective, attach_vision_lora
            from .vision_model import load_vision_base, unfreeze_names

            base = load_vision_base(cfg.model, parse_scheme(cfg.scheme), names, seed=cfg.seed)
            self.model = attach_vision_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                            unfreeze_names(base, cfg.unfreeze_blocks))
            self.objective = ImageObjective(self.model)
        else:
            self._build_text_model(info, device, names)
        if cfg.init_adapter and not self.resume:
            from .adapters import load_adapter_weights

            load_adapter_weights(self.model, cfg.init_adapter)
        self.model.to(device)
        self.trainable, self.total_params = count_parameters(self.model)
        self.train_module = self.objective
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: the packed base (codes, scales) is buffers, frozen and equal on every rank
            self.train_module = DistributedDataParallel(self.objective, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None,
                                                        broadcast_buffers=False)
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable_params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        self.autocast, self.scaler = self._precision(torch)

    def _build_text_model(self, info, device, names) -> None:
        from ..schemes import parse_scheme
        from .load import load_base
        from .lora import attach_lora
        from .objective import make_objective

        cfg = self.cfg
        base = load_base(info, cfg.task, parse_scheme(cfg.scheme), device, names, cfg.trust_remote_code)
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self.model = attach_lora(base, info, cfg.task, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.target_modules) if cfg.target_modules else None)
        self.objective = make_objective(cfg.task, self.model)

    def _precision(self, torch):
        p = self.cfg.precision
        if p == "auto":
            p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if self.device.startswith("cuda") else "fp32"
        if p == "fp32":
            return None, None
        if not self.device.startswith("cuda"):
            raise UsageError(f"--precision {p} needs CUDA", "use --precision fp32 on the CPU")
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        scaler = torch.amp.GradScaler("cuda") if p == "fp16" else None
        return (lambda: torch.autocast("cuda", dtype=dtype)), scaler

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- data ----------------------------------------------------------------
    def micro_batch(self, index: int) -> dict:
        """Global micro-batch `index` for this rank; deterministic, so resume needs only the step."""
        from ..encode import collate, micro_batch_ids

        ids = micro_batch_ids(len(self.train_set), self.cfg.batch_size, self.cfg.seed, index, self.world, self.rank)
        if self.images:
            import numpy as np

            return self.train_set.batch(ids, np.random.default_rng([self.cfg.seed, index]) if self.cfg.augment else None)
        return collate([self.train_set[i] for i in ids], self.tokenizer.pad_token_id)

    def eval_batches(self, dataset, batch_size: int | None = None):
        from ..encode import collate

        bs = batch_size or max(self.cfg.batch_size, 16)
        if self.images:
            yield from dataset.eval_batches(bs, self.rank, self.world)
            return
        mine = list(range(len(dataset)))[self.rank :: self.world]
        for i in range(0, len(mine), bs):
            yield collate([dataset[j] for j in mine[i : i + bs]], self.tokenizer.pad_token_id)

    def evaluate(self, dataset=None) -> dict:
        from .objective import evaluate

        task = "classify" if self.cfg.classifier else self.cfg.task
        return evaluate(self.objective, self.eval_batches(dataset or self.val_set), task, len(self.cfg.labels), self.autocast)

    # -- outputs -------------------------------------------------------------
    def save_adapter(self, metrics: dict, step: int) -> None:
        from .. import __version__
        from ..basemodel import identify, path_hint, set_peft_base_name

        base = identify(self.cfg.model)  # by name and fingerprint; the path only as a hint relative to the adapter
        with atomic_dir(self.out / "adapter") as tmp:
            self.model.save_pretrained(str(tmp))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            set_peft_base_name(tmp, base.name)
            atomic_write_json(
                tmp / "edgeft.json",
                {"edgeft_version": __version__, "task": self.cfg.task, "labels": self.cfg.labels, "scheme": self.cfg.scheme,
                 "target": self.cfg.target, "base": {**base.to_dict(), "path_hint": path_hint(self.cfg.model, self.out / "adapter")},
                 "step": step, "metrics": metrics, "max_seq_len": self.cfg.max_seq_len,
                 **({"preprocess": self.preprocess.to_dict(), "unfreeze_blocks": self.cfg.unfreeze_blocks} if self.images else {})},
            )

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.cfg.higher_is_better else value < best)

    # -- the loop ------------------------------------------------------------
    def run(self) -> dict:
        import torch

        cfg = self.cfg
        created = False
        if self.main:
            if not self.resume:
                start_run_dir(self.run_dir, log=self.log)  # only now that input has been validated
                created = True
            # paths relative to the run folder (rundir.py); rewritten on resume, whose --max-steps may differ
            atomic_write_json(self.out / "config.json", config_for_disk(asdict(cfg), self.out))
        counters = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "elapsed": 0.0, "initial": None, "reference_before": None,
                    "stopped_early": False}
        try:
            if self.resume:
                counters = self._resume_counters(counters)
            elif cfg.eval_before:
                counters["initial"] = self.evaluate()
                self._record({"step": 0, **counters["initial"]})
            if self.reference_set is not None and counters["reference_before"] is None:
                counters["reference_before"] = self.evaluate(self.reference_set)["eval_loss"]
            result = self._loop(counters)
        except BaseException as exc:
            if created and self.main:
                self._abandon(exc)
            raise
        finally:
            if self.world > 1 and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return result

    def _abandon(self, exc: BaseException) -> None:
        """A new run that failed. Nothing worth keeping before its first checkpoint: no half-made run
        is left behind. Under --overwrite the previous run stays; the new one is deleted unless it
        was interrupted (Ctrl-C) after a checkpoint, when --resume can finish it."""
        if self.run_dir.staged:
            if isinstance(exc, KeyboardInterrupt) and (self.out / "checkpoint").exists():
                self.log(f"interrupted: {self.final} is unchanged; `edgeft train --resume {self.final}` finishes the new run kept in {self.out}")
                return
            shutil.rmtree(self.out, ignore_errors=True)
            self.log(f"{self.final} is unchanged: the failed new run was removed")
        elif not (self.out / "checkpoint").exists():
            shutil.rmtree(self.out, ignore_errors=True)

    def _resume_counters(self, counters: dict) -> dict:
        from .checkpoint import load_checkpoint

        loaded = load_checkpoint(self.out / "checkpoint", self.model, self.optimizer, self.scaler)
        counters = {**counters, **loaded}
        if self.main:
            dropped = truncate_metrics(self.out / "metrics.jsonl", counters["step"])
            if dropped:
                self.log(f"dropped {dropped} metrics.jsonl rows written after the checkpoint; they are trained again")
            self._republish_best(counters)
        self.log(f"resuming {self.final} at step {counters['step']}/{self.total_steps}")
        return counters

    def _republish_best(self, counters: dict) -> None:
        """adapter/ must hold the checkpoint's best. It can lag only when the run died between the
        checkpoint of a new best and publishing it; then the best is the checkpoint's own weights."""
        import json

        best_step = counters.get("best_step")
        if best_step is None or best_step != counters["step"]:
            return
        try:
            published = json.loads((self.out / "adapter" / "edgeft.json").read_text()).get("step")
        except (OSError, ValueError):
            published = None
        if published != best_step:
            self.save_adapter(counters["last_eval"], best_step)
            self.log(f"adapter/ brought up to the checkpoint's best (step {best_step})")

    def _record(self, row: dict) -> None:
        """Main process only: one metrics line."""
        if self.main:
            append_jsonl(self.out / "metrics.jsonl", row)

    def train_step(self, step: int) -> tuple[float, float, float, int]:
        """One optimizer step over `grad_accum` micro-batches: (loss, grad norm, lr, tokens)."""
        import torch

        cfg = self.cfg
        lr = lr_at(step, self.total_steps, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_total, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = {k: torch.as_tensor(v).to(self.device) for k, v in self.micro_batch(step * cfg.grad_accum + micro).items()}
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"])
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            with (contextlib.nullcontext() if sync else self.train_module.no_sync()), (self.autocast() if self.autocast else contextlib.nullcontext()):
                loss, _ = self.train_module(**batch)
                loss = loss / cfg.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += loss.item()
        if not math.isfinite(loss_total):
            raise TrainingDiverged(f"the loss became {loss_total} at step {step + 1}; training stopped (the last checkpoint, if any, is kept)",
                                   "lower --lr, or use --precision fp32")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else 0.0
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, grad_norm, lr, tokens

    def _loop(self, counters: dict) -> dict:
        from tqdm.auto import tqdm

        from .checkpoint import save_checkpoint

        cfg = self.cfg
        start = counters["step"]
        # On a terminal a live bar; in a log file (CI) one line every 30 s instead of thousands.
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", disable=not (self.progress and self.main),
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
        session_start = time.perf_counter()
        t0 = session_start - counters["elapsed"]
        tokens = 0
        self.train_module.train()
        for step in range(start, start if counters["stopped_early"] else self.total_steps):
            loss_total, grad_norm, lr, n_tokens = self.train_step(step)
            tokens += n_tokens
            done = step + 1
            elapsed = time.perf_counter() - t0
            self._record({"step": done, "train_loss": loss_total, "lr": lr, "grad_norm": grad_norm, "elapsed": round(elapsed, 3),
                          "epoch": round(done * cfg.grad_accum / self.batches_per_epoch, 4)})
            bar.set_postfix(loss=f"{loss_total:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            evaluated = done % self.eval_every == 0 or done == self.total_steps
            new_best = False
            if evaluated:
                metrics = self.evaluate()
                self._record({"step": done, **metrics})
                value = metrics[cfg.metric]
                new_best = self.better(value, counters["best"])
                if new_best:
                    counters.update(best=value, best_step=done, bad_evals=0)
                else:
                    counters["bad_evals"] += 1
                counters.update(last_eval=metrics, stopped_early=bool(cfg.patience and counters["bad_evals"] >= cfg.patience))
            counters.update(step=done, elapsed=elapsed)
            if self.main and (evaluated or done % self.checkpoint_every == 0):
                save_checkpoint(self.out / "checkpoint", self.model, self.optimizer, counters, self.scaler)
            if self.main and new_best:
                self.save_adapter(metrics, done)  # after the checkpoint: the adapter is never ahead of one
            if evaluated:
                self.log(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if counters["stopped_early"]:
                self.log(f"early stop: no {cfg.metric} improvement in {cfg.patience} evaluations")
                break
        bar.close()
        now = time.perf_counter()
        elapsed, session = now - t0, now - session_start
        steps_run = counters["step"] - start
        summary = {
            "run": str(self.final), "task": cfg.task, "model": cfg.model, "target": cfg.target, "scheme": cfg.scheme,
            "device": self.device, "world_size": self.world, "steps": counters["step"], "total_steps": self.total_steps,
            "stopped_early": counters["stopped_early"], "train_seconds": round(elapsed, 2),
            "seconds_per_step": round(session / steps_run, 4) if steps_run else None,
            "tokens_per_second": round(tokens * self.world / session, 1) if steps_run else None,
            "trainable_params": self.trainable, "total_params": self.total_params,
            "metric": cfg.metric, "best": counters["best"], "best_step": counters["best_step"],
            "before": counters.get("initial"), "after": counters.get("last_eval"), "truncated_rows": self.truncated,
            "adapter": str(self.final / "adapter"),  # paths as the user gave them, never made absolute here
        }
        if self.reference_set is not None:
            after = self.evaluate(self.reference_set)["eval_loss"]
            summary["forgetting"] = {"reference_loss_before": counters["reference_before"], "reference_loss_after": after,
                                     "delta": after - counters["reference_before"]}
        if self.main:
            from ..report import write_report

            if self.run_dir.staged:  # training has ended: the new run replaces the old one (rundir.py)
                swap_in(self.out, self.final)
                self.out = self.run_dir.work = self.final
            write_report(self.out, read_jsonl(self.out / "metrics.jsonl"), summary)
            atomic_write_json(self.out / "summary.json", summary)
        return summary
