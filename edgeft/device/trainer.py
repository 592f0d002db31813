"""`edgeft device train`: one new generation of the adapter, trained with ONNX Runtime.

The job survives kills: its definition (job.json) is written before the first step, a
checkpoint (the flat parameters and AdamW moments, plus the progress) is renamed into place
every N steps, and the batches are a pure function of (generation, step). The checkpoint is
the same on both training engines (see backends.py), so a job may resume on the other one. A rerun with the
same data resumes at the last checkpoint. A new generation becomes current only if
it does not regress on the held-out data and on the check rows (rehearsal.py: the bundle's
reference rows are split into rows rehearsed and rows checked, never both; earlier generations'
training rows are rehearsed, their held-out rows checked).
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..bundle import sha256, verify_bundle
from ..encode import batches_per_epoch, collate, micro_batch_ids
from ..errors import TrainingDiverged, UsageError  # defined in errors.py (the one exit-code table)
from ..fsutil import atomic_write_json, make_dirs
from ..schedule import DEFAULT as SCHEDULE_DEFAULT, lr_at, total_steps
from ..datasets import load_task_rows, split
from .data import encode_rows, task_encoder
from .check import CHECK_ROWS, PromotionCheck, auto_check_rows
from .progress import ProgressLine
from .rehearsal import blend, disjoint, head_slices, mixed_batch_ids, mixed_micro_batches, pull_to_previous, split_reference
from .backends import AdamW, Layout, choose_backend
from .runtime import MEMORY_MODES, peak_rss_mib, rss_mib, set_memory_mode, trim_heap
from .tokenizer import DeviceTokenizer, PadOnly
from .guard import REFERENCE_LOSS, regressions
from .state import DeviceState, StateError, load_arrays, load_checkpoint, save_arrays, writing

BEST_EVAL_ROWS = 64  # rows of held-out loss at each checkpoint, to pick the best weights cheaply
# Device defaults, measured on the domain-shift story (BENCHMARKS.md section 10, tools/bench_domain.py)
LR = {"classify": 5e-4, "image-classify": 5e-4, "causal-lm": 1e-4}
REPLAY_RATIO = 0.5  # share of each batch taken from replay rows (first generation on reviews: tweets -2.7 points; 0.25: -4.4, 0.75: -5.5)
L2_PREVIOUS = 0.0  # pull toward the previous generation's adapter (1.0 measured: less gained, no less lost)
FREEZE_HEAD = False  # keep a fully trained head (modules_to_save) at the previous generation's values (measured: no effect)
BLEND = 0.5  # promote previous + BLEND x (trained - previous) (first review generation: tweets +0.7 points, where 1.0 lost 2.9)
BLEND_BACKOFF = 2  # a candidate that regressed on the reference rows only is checked again at blend/2, then blend/4


@dataclass
class DeviceTrainConfig:
    data: str
    eval_data: str | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float | None = None
    replay_ratio: float = REPLAY_RATIO
    l2_previous: float = L2_PREVIOUS
    freeze_head: bool = FREEZE_HEAD
    blend: float = BLEND
    blend_backoff: int = BLEND_BACKOFF
    reference_loss_rise: float = REFERENCE_LOSS
    grad_accum: int = 1
    checkpoint_every: int = 20
    tolerance: float = 0.01
    holdout_fraction: float = 0.1
    seed: int = 0
    refuse_long: bool = False
    force: bool = False
    restart: bool = False
    backend: str = "auto"
    check_rows: int | None = None  # rows per check set in the promotion check; None: by the generation's size (check.py)
    # One learning-rate schedule over several generations (a fleet's rounds, fleet/local.py): this generation
    # takes steps schedule_offset .. schedule_offset + its steps of a schedule schedule_total steps long
    # (warmup only at its start, one decay over all of it). Default: the generation's own schedule.
    schedule_offset: int = 0
    schedule_total: int | None = None
    # AdamW's moments carried between generations (a fleet's rounds): start from the moments in
    # moments_in (exp_avg, exp_avg_sq and the step count, as moments_out wrote them) and write the final
    # ones to moments_out. None: fresh moments, nothing written.
    moments_in: str | None = None
    moments_out: str | None = None
    # the generation's weights: those of the checkpoint with the lowest held-out loss (True), or of its last
    # step (False: a fleet round, one stretch of the run's schedule, whose moments are the last step's)
    keep_best: bool = True

    def job_key(self) -> dict:
        """What must match for a rerun to resume the interrupted job rather than start another."""
        decision_only = ("check_rows", "blend_backoff", "reference_loss_rise")  # how the check decides, not what is trained
        return {k: v for k, v in asdict(self).items() if k not in ("force", "restart", "refuse_long", "backend") + decision_only}


def file_info(path: str | Path, rows: int) -> dict:
    return {"file": str(path), "sha256": data_sha256(Path(path)), "rows": rows}


def data_sha256(path: Path) -> str:
    """A data file's sha256; for a folder of images, over every file's relative path and sha256."""
    if not path.is_dir():
        return sha256(path)
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256(f)}\n".encode())
    return h.hexdigest()


class DeviceTrainer:
    def __init__(self, bundle: Path, state_dir: Path, cfg: DeviceTrainConfig, log=print, progress: bool = True):
        self.bundle, self.cfg, self.log, self.show_progress = Path(bundle), cfg, log, progress
        self.state_dir = Path(state_dir)
        self.blends_tried = [{"blend": cfg.blend}]  # the promotion check's tries (backoff)
        if cfg.check_rows is not None and cfg.check_rows < 1:
            raise UsageError("--check-rows must be at least 1", f"e.g. --check-rows {CHECK_ROWS}")
        self.manifest = verify_bundle(self.bundle)
        self.engine = choose_backend(self.manifest, cfg.backend)
        self.check_plan()
        self.task, self.labels = self.manifest.task, self.manifest.labels
        self.batch, self.seq = self.manifest.train_shape.batch, self.manifest.train_shape.seq
        self.tokenizer = task_encoder(self.bundle, self.manifest)  # a tokenizer, or an image bundle's preprocessing
        self.state = DeviceState(state_dir, self.bundle, self.manifest)
        if cfg.grad_accum < 1 or cfg.checkpoint_every < 1 or (cfg.max_steps is not None and cfg.max_steps < 1) or cfg.epochs <= 0:
            raise UsageError("--grad-accum, --checkpoint-every, --max-steps and --epochs must be positive", "e.g. --max-steps 50")
        if cfg.schedule_offset < 0 or (cfg.schedule_total is not None and cfg.schedule_total < 1):
            raise UsageError("the schedule's offset must be at least 0 and its total positive", "e.g. schedule_offset=30, schedule_total=150")
        if (not 0 <= cfg.replay_ratio <= 0.9 or cfg.l2_previous < 0 or not 0 < cfg.blend <= 1 or cfg.blend_backoff < 0
                or cfg.reference_loss_rise < 0):
            raise UsageError("--replay-ratio must be between 0 and 0.9, --l2-previous, --blend-backoff and --reference-loss-rise at least 0, "
                             "--blend in (0, 1]",
                             f"e.g. --replay-ratio {REPLAY_RATIO} --blend {BLEND}")

    def check_plan(self) -> None:
        """The whole process's memory plan (plan.plan_process: the step, the promotion check, the
        tokenizer, the rows), refused over the target's budget before anything is read, unless --force."""
        from ..plan import file_bytes, plan_process, refuse_over_budget

        rows = file_bytes(self.cfg.data, self.cfg.eval_data, self.bundle / "reference.jsonl",
                          self.state_dir / "replay.jsonl", self.state_dir / "replay-check.jsonl")
        asked = os.environ.get("EDGEFT_MEMORY")
        self.plan = plan_process(self.manifest, self.bundle, "device train", rows, asked if asked in MEMORY_MODES else None)
        refuse_over_budget(self.plan, self.cfg.force, self.log)
        if self.plan is not None:
            set_memory_mode(self.plan.memory)  # before any session: lean when the arena would not fit the budget
        self.plan_mib = self.plan.total_mib if self.plan else None

    # -- data ----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Everything is read and checked before the state is touched, so bad data changes nothing."""
        cfg = self.cfg
        enc = lambda rs, where: encode_rows(rs, self.task, self.tokenizer, self.labels, self.seq, cfg.refuse_long, where, self.log)  # noqa: E731
        rows = load_task_rows(cfg.data, self.task, self.labels)
        pairs = list(zip(rows, enc(rows, str(cfg.data))))  # encoded before any split, so messages name file rows
        if cfg.eval_data:
            held_rows = load_task_rows(cfg.eval_data, self.task, self.labels)
            train_pairs, self.held_set = pairs, enc(held_rows, str(cfg.eval_data))
        else:
            # tiny shards keep every row for training (and rely on the reference rows)
            train_pairs, held_pairs = split(pairs, cfg.holdout_fraction, cfg.seed) if len(pairs) >= 10 else (pairs, [])
            held_rows, self.held_set = [r for r, _ in held_pairs], [e for _, e in held_pairs]
        self.train_rows, self.train_set = [r for r, _ in train_pairs], [e for _, e in train_pairs]
        self.held_rows = held_rows
        self.set_replay(self.replay_sources())
        self.data_info = file_info(cfg.data, len(rows))
        self.eval_info = file_info(cfg.eval_data, len(held_rows)) if cfg.eval_data else {"split_from_data": len(held_rows)}
        if self.mixing:
            self.total_steps = cfg.max_steps or max(1, math.ceil(mixed_micro_batches(len(self.train_set), self.batch, cfg.replay_ratio, cfg.epochs) / cfg.grad_accum))
        else:
            self.per_epoch = batches_per_epoch(len(self.train_set), self.batch)  # the workstation's rules (edgeft.schedule)
            self.total_steps = total_steps(self.per_epoch, cfg.grad_accum, cfg.epochs, cfg.max_steps)
        if cfg.schedule_total is not None and cfg.schedule_offset + self.total_steps > cfg.schedule_total:
            raise UsageError(f"this generation's {self.total_steps} steps from step {cfg.schedule_offset} run past the schedule's "
                             f"{cfg.schedule_total} steps", "lengthen the schedule or take fewer steps")

    def replay_sources(self) -> dict:
        """The rows rehearsed and the rows checked, as rows (rehearsal.py): the bundle's reference rows
        split in two, earlier generations' training rows (rehearsed) and held-out rows (checked)."""
        reference = []
        if (self.bundle / "reference.jsonl").is_file():
            reference = load_task_rows(self.bundle / "reference.jsonl", self.task, self.labels)
        ref_rehearse, ref_check = split_reference(reference)
        earlier_check = self.state.replay_check_rows()
        # earlier generations' rows that are this generation's own data (a fleet's rounds, a rerun on the same
        # file) are not rehearsal: they would only crowd the replay share with what the new share already trains on
        earlier = disjoint(self.state.replay_rows(), self.train_rows, self.held_rows)
        rehearse = disjoint(ref_rehearse + earlier, ref_check, earlier_check)
        return {"rehearsal": rehearse, "reference": ref_check, "earlier": earlier_check}

    def set_replay(self, sources: dict) -> None:
        enc = lambda rs, where: encode_rows(rs, self.task, self.tokenizer, self.labels, self.seq, self.cfg.refuse_long, where, self.log)  # noqa: E731
        self.replay_rows = sources
        self.replay_set = enc(sources["rehearsal"], "replay rows") if sources["rehearsal"] else []
        self.check_sets = {name: enc(sources[name], f"{name} rows") for name in ("reference", "earlier") if sources[name]}
        self.mixing = bool(self.replay_set) and self.cfg.replay_ratio > 0

    def micro_batch(self, index: int, seed: int) -> dict:
        if self.mixing:
            new, replay = mixed_batch_ids(len(self.train_set), len(self.replay_set), self.batch, self.cfg.replay_ratio, seed, index)
            items = [self.train_set[i] for i in new] + [self.replay_set[i] for i in replay]
        else:
            items = [self.train_set[i] for i in micro_batch_ids(len(self.train_set), self.batch, seed, index)]
        return collate(items, self.tokenizer.pad_token_id)

    # -- the job -------------------------------------------------------------
    def open_job(self) -> tuple[dict, bool]:
        """(job, resumed). An interrupted job resumes only with the same data and options."""
        path = self.state.job_dir / "job.json"
        if path.is_file():
            job = json.loads(path.read_text(encoding="utf-8"))
            same = job["key"] == self.cfg.job_key() and job["data"]["sha256"] == self.data_info["sha256"] and job["eval"] == self.eval_info
            if any(g["id"] == job["generation"] for g in self.state.data["generations"]):
                self.state.clear_job()  # killed after the generation was recorded: nothing left to do
            elif same:
                snapshot = self.state.job_dir / "replay.json"
                if snapshot.is_file():  # the replay store may have changed since (killed after retaining)
                    sources = json.loads(snapshot.read_text(encoding="utf-8"))
                    if sources != self.replay_rows:
                        self.set_replay(sources)
                return job, True
            elif self.cfg.restart:
                self.log(f"discarding interrupted generation {job['generation']} (trained on {job['data']['file']})")
                self.state.clear_job()
            else:
                raise StateError(f"generation {job['generation']} was interrupted while training on {job['data']['file']} with other options",
                                 "rerun that exact command to resume it, or pass --restart to discard it")
        gen = self.state.next_id()
        job = {"generation": gen, "parent": self.state.current, "key": self.cfg.job_key(), "data": self.data_info, "eval": self.eval_info,
               "total_steps": self.total_steps, "seed": gen * 1000 + self.cfg.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with writing("the job file"):
            make_dirs(self.state.job_dir)
            atomic_write_json(self.state.job_dir / "replay.json", self.replay_rows)  # before job.json: a job always has its snapshot
            atomic_write_json(path, job)
        return job, False

    def save_checkpoint(self, optimizer: AdamW, progress: dict) -> None:
        with writing("a checkpoint"):
            save_arrays(self.state.job_dir / "last.safetensors", optimizer.arrays(), {"edgeft": json.dumps(progress)})

    def train(self, job: dict, resumed: bool) -> dict:
        cfg, job_dir = self.cfg, self.state.job_dir
        parent = self.state.params(job["parent"])
        layout = Layout({n: parent[n].shape for n in self.manifest.trainable})
        optimizer = AdamW(self.bundle, self.manifest, layout, parent)
        anchor = layout.flatten(parent) if cfg.l2_previous or cfg.freeze_head else None
        frozen = head_slices(layout.offsets, self.manifest.trainable) if cfg.freeze_head else []
        last = job_dir / "last.safetensors"
        if resumed and last.is_file():
            arrays, meta = load_checkpoint(last)
            progress = json.loads(meta["edgeft"])
            optimizer.restore(arrays, progress["step"], progress.get("adam_step"))
        else:
            progress = {"step": 0, "best_loss": None, "best_step": None, "losses": []}
            if cfg.moments_in:
                moments, meta = load_checkpoint(Path(cfg.moments_in), "delete it to start the moments afresh")
                optimizer.load_moments(moments, int(meta["step"]))
            progress["adam_step"] = optimizer.step  # AdamW's own count (bias correction): moments_in's steps plus this generation's
        engine = self.engine(self.bundle, self.manifest)
        engine.set_params(layout.views(optimizer.params))
        lr = cfg.lr or LR[self.task]
        schedule = {**SCHEDULE_DEFAULT, **(self.manifest.schedule or {})}  # the run's, recorded at export
        start = progress["step"]
        if resumed:
            self.log(f"resuming generation {job['generation']} at step {start} of {job['total_steps']}")
        bar = ProgressLine(job["total_steps"], start, enabled=self.show_progress)
        t0 = time.perf_counter()
        span = cfg.schedule_total or job["total_steps"]  # one schedule over several generations, or this one's own
        for step in range(start, job["total_steps"]):
            step_lr = lr_at(cfg.schedule_offset + step, span, lr, schedule["name"], schedule["warmup_ratio"])
            loss = 0.0
            for micro in range(cfg.grad_accum):
                batch = self.micro_batch(step * cfg.grad_accum + micro, job["seed"])
                loss += engine.forward_backward(batch) / cfg.grad_accum
            grads = engine.take_grads()
            if not math.isfinite(loss):
                raise TrainingDiverged(f"the loss became {loss} at step {step + 1} of generation {job['generation']}; "
                                       f"training stopped and the device stays on generation {self.state.current}",
                                       "lower --lr, or check the new data for broken rows")
            grads = grads / cfg.grad_accum if cfg.grad_accum > 1 else grads
            for a, b in frozen:
                grads[a:b] = 0.0
            optimizer.update(pull_to_previous(grads, optimizer.params, anchor, cfg.l2_previous), step_lr)
            if frozen:
                optimizer.params = np.array(optimizer.params, np.float32)  # ORT's output may be read-only
                for a, b in frozen:
                    optimizer.params[a:b] = anchor[a:b]  # AdamW's weight decay moves even a zero-gradient weight
            engine.set_params(layout.views(optimizer.params))
            if step + 1 == job["total_steps"] and hasattr(engine, "drop_step"):
                engine.drop_step()  # the last step is taken: what follows (best weights, the check) needs the eval step only
            progress["losses"].append(round(loss, 6))
            progress["step"], progress["adam_step"] = step + 1, optimizer.step
            bar.update(step + 1, loss=loss, lr=step_lr, rss_mib=round(rss_mib()))
            if progress["step"] % cfg.checkpoint_every == 0 or progress["step"] == job["total_steps"]:
                optimizer.release_arena()  # the eval step (best weights, then the check) runs beside what the step freed
                if cfg.keep_best:
                    self.track_best(engine, layout.views(optimizer.params), progress)
                self.save_checkpoint(optimizer, progress)
        bar.close()
        seconds = time.perf_counter() - t0
        if cfg.moments_out:
            with writing("the optimizer's moments"):
                save_arrays(Path(cfg.moments_out), {"exp_avg": optimizer.exp_avg, "exp_avg_sq": optimizer.exp_avg_sq},
                            {"step": optimizer.step, "generation": job["generation"]})
        best = job_dir / "best.safetensors"
        params = load_arrays(best) if best.is_file() else {n: v.copy() for n, v in layout.views(optimizer.params).items()}
        del optimizer
        # a causal LM's promotion check runs on this engine's eval step (check.py); a classifier's needs logits
        self.check_engine = engine if self.task == "causal-lm" else None
        del engine
        gc.collect()
        ran = progress["step"] - start
        return {"params": params, "steps": progress["step"], "resumed_at": start if resumed else None, "seconds": round(seconds, 2),
                "steps_per_s": round(ran / seconds, 4) if ran and seconds else None, "losses": progress["losses"],
                "best_step": progress["best_step"], "backend": self.engine.name}

    def track_best(self, engine, params: dict, progress: dict) -> None:
        """Held-out loss on a few rows at each checkpoint; the best weights are kept beside the last."""
        rows = self.held_set[:BEST_EVAL_ROWS]
        if not rows:
            return
        total = 0.0
        for i in range(0, len(rows), self.batch):
            b = collate(rows[i : i + self.batch], self.tokenizer.pad_token_id)
            total += engine.eval_loss(b) * len(b["labels"])
        loss = total / len(rows)
        if math.isfinite(loss) and (progress["best_loss"] is None or loss < progress["best_loss"]):
            progress["best_loss"], progress["best_step"] = loss, progress["step"]
            with writing("the best weights"):
                save_arrays(self.state.job_dir / "best.safetensors", params, {"step": progress["step"]})

    # -- decide --------------------------------------------------------------
    def compare(self, base_params: dict, new_params: dict, parent: int | None = None, retry=None) -> tuple[dict, dict]:
        """Both adapters on the same sample of the held-out and check rows (check.py: the training
        engine's eval step for a causal LM, one inference session for a classifier). Returns
        (metrics, per-row correctness) so the decision can pair the rows; what was drawn, and the
        check's seconds, are in self.check_info. `parent`: the baseline's generation, whose earlier check
        results on the same rows are reused (check.py). `retry(metrics, rows)`: another candidate to check
        instead on the same rows, or None to stop (run: a smaller blend); the last result is returned.
        apply.py's checker calls this with itself as self."""
        cfg = getattr(self, "cfg", None)
        n = getattr(cfg, "check_rows", None) or auto_check_rows(getattr(self, "trained_rows", None))
        check = PromotionCheck(self, n, getattr(cfg, "seed", 0) or 0, engine=getattr(self, "check_engine", None))
        check.info["auto"] = getattr(cfg, "check_rows", None) is None
        try:
            state = getattr(self, "state", None)
            generations = state.data["generations"] if state is not None and parent is not None else None
            origin = state.origin(parent) if generations else None
            out, rows = check.compare(base_params, new_params, parent, generations, origin if origin != parent else None,
                                      lambda: state.params(origin))
            while retry is not None and (params := retry(out, rows)) is not None:
                out, rows = check.rescore(params)
        finally:
            self.check_engine = None  # the engine's sessions go with it
            gc.collect()
        self.check_info = check.info
        return out, rows

    def decide(self, metrics: dict, rows: dict) -> tuple[bool, str]:
        """Promote unless the candidate regressed (regressions)."""
        if not metrics["candidate"]:
            return False, "no held-out or reference rows to check it on (pass --eval-data); kept, not promoted"
        worse = regressions(self.task, self.cfg.tolerance, metrics, rows, self.cfg.reference_loss_rise)
        if worse:
            hint = " (--reference-loss-rise sets how far it may rise)" if all(w[:2] == ("reference", "loss") for w in worse) else ""
            return False, "regressed beyond the tolerance ({}): {}{}".format(self.cfg.tolerance, "; ".join(text for _, _, text in worse), hint)
        return True, "no regression on " + " and ".join(metrics["candidate"])

    def backoff(self, previous: dict, trained: dict, tried: list):
        """retry for compare: when the only regression is the loss on the reference rows (the candidate moved
        too far from what the workstation taught), check it again blended at half the weight, up to
        --blend-backoff times. An accuracy loss beyond chance is a wrong candidate, and a regression on the
        device's own rows (held-out, earlier) the data's fault, not the step's size: no retry (measured: a
        flipped-label feed, rejected at 0.5 for reference accuracy, passed at 0.25 and cost 1.5 tweet points)."""
        def retry(metrics, rows):
            worse = regressions(self.task, self.cfg.tolerance, metrics, rows, self.cfg.reference_loss_rise) if metrics["candidate"] else []
            tried[-1]["regressed"] = [text for _, _, text in worse]
            soft = all(name == "reference" and rule == "loss" for name, rule, _ in worse)
            if not worse or not soft or len(tried) > self.cfg.blend_backoff:
                return None
            tried.append({"blend": tried[-1]["blend"] / 2})
            return blend(previous, trained, tried[-1]["blend"])
        return retry

    def release_tokenizer(self) -> None:
        """Every row is encoded once the job is open (open_job may re-encode a resumed job's replay rows):
        from here on only the pad id is read. A parsed tokenizer is large (SmolLM2's 79 MiB, more than the
        packed base), so it is dropped and its pages handed back before the engine is built."""
        if isinstance(self.tokenizer, DeviceTokenizer):
            self.tokenizer = PadOnly(self.tokenizer.pad_token_id)
            gc.collect()
            trim_heap()

    def run(self) -> dict:
        self.prepare_data()
        with self.state.lock():
            job, resumed = self.open_job()
            self.release_tokenizer()
            try:
                result = self.train(job, resumed)
            except TrainingDiverged as e:
                self.state.add_generation({"id": job["generation"], "parent": job["parent"], "status": "failed", "reason": e.message,
                                           "created": job["created"], "data": job["data"], "metrics": {}}, None, promote=False)
                self.state.clear_job()
                raise
            self.trained_rows = job["total_steps"] * self.cfg.grad_accum * self.batch  # sizes the check (check.auto_check_rows)
            previous, trained = self.state.params(job["parent"]), result["params"]
            self.blends_tried = tried = [{"blend": self.cfg.blend}]
            metrics, rows = self.compare(previous, blend(previous, trained, self.cfg.blend), parent=job["parent"],
                                         retry=self.backoff(previous, trained, tried))
            result["params"] = blend(previous, trained, tried[-1]["blend"])
            promote, reason = self.decide(metrics, rows)
            if len(tried) > 1:
                reason += f" (blended at {tried[-1]['blend']:g}: at " + "; at ".join(f"{t['blend']:g}, " + "; ".join(t["regressed"]) for t in tried[:-1]) + ")"
            record = {"id": job["generation"], "parent": job["parent"], "status": "promoted" if promote else "rejected", "reason": reason,
                      "created": job["created"], "data": job["data"], "eval": job["eval"], "steps": result["steps"],
                      "best_step": result["best_step"], "backend": result["backend"], "metrics": metrics, "seconds": result["seconds"],
                      "peak_rss_mib": round(peak_rss_mib(), 1), "plan_mib": self.plan_mib, "rehearsal": self.rehearsal_info(job),
                      "check": self.check_info}
            if promote:
                self.state.retain(self.train_rows, self.held_rows, self.cfg.seed)
            self.state.add_generation(record, result["params"], promote)
            self.state.clear_job()
        return {"generation": job["generation"], "backend": result["backend"], "promoted": promote, "reason": reason, "current": self.state.current,
                "resumed_at_step": result["resumed_at"], "steps": result["steps"], "best_step": result["best_step"], "seconds": result["seconds"],
                "steps_per_s": result["steps_per_s"], "first_loss": (result["losses"] or [None])[0],
                "last_loss": (result["losses"] or [None])[-1], "losses": result["losses"], "metrics": metrics, "peak_rss_mib": record["peak_rss_mib"],
                "plan_mib": self.plan_mib, "plan": self.plan.to_dict() if self.plan else None, "check": self.check_info,
                "check_seconds": self.check_info.get("seconds"), "state": str(self.state.folder), "rehearsal": record["rehearsal"]}

    def rehearsal_info(self, job: dict) -> dict:
        """What this generation replayed and what it was checked on."""
        ratio = self.cfg.replay_ratio if self.mixing else 0.0
        micro = job["total_steps"] * self.cfg.grad_accum
        replayed = math.floor(micro * self.batch * ratio + 1e-9)
        return {"replay_ratio": ratio, "l2_previous": self.cfg.l2_previous, "freeze_head": self.cfg.freeze_head,
                "blend": self.blends_tried[-1]["blend"], "blends_tried": [t["blend"] for t in self.blends_tried],
                "pool_rows": len(self.replay_set),
                "replayed_rows": replayed, "new_rows": micro * self.batch - replayed if self.mixing else None,
                "check_rows": {name: len(rows) for name, rows in self.check_sets.items()}}
