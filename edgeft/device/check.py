"""The promotion check of a generation, at little cost. Torch-free.

`device train` compares the new adapter with its parent on rows it never trained on (held-out rows
and the check rows of rehearsal.py) before it promotes it. The check used to build an inference
session per adapter and run every row through the full inference graph (logits at every position
over the whole vocabulary); on Qwen2.5-0.5B it took most of a generation's wall time and doubled
the process's peak memory. Now:

- **Rows:** each check set (held-out, reference, earlier) is a seeded sample of at most N rows
  (`--check-rows N`). By default N follows the generation's size (`auto_check_rows`): a third of
  the rows it trains on, rounded down to a power of two, between MIN_CHECK_ROWS and CHECK_ROWS.
  A forward pass costs about half a training step (the frozen base has no weight gradients), so
  with the held-out rows the check costs at most about a third of the training it guards (Qwen2.5-0.5B,
  100 new rows: 30 steps, 32 reference rows). The sample depends on the set's rows, its name, N and
  the seed, not on the generation, so generations of a similar size check the bundle's reference rows
  on the same sample. The status record says what was drawn from how many.
- **Sessions:** a causal LM is checked with the training engine's own eval step (the loss graph,
  projecting onto the vocabulary only at labelled positions), at the training batch, its weights
  swapped between the two adapters: no session is built for the check. A classifier needs which
  rows each adapter got right (the paired sign test), so it runs ONE inference session, built once
  the training engine is freed, with the two adapters' weights swapped in turn.

- **Reuse:** a generation's parent was itself checked, as a candidate, on the same sample of the
  bundle's reference rows (the sample does not depend on the generation), or was the baseline of a
  sibling. Each record keeps a fingerprint of every set it was checked on (the rows' tokens, the
  batch, the graph) and, for a classifier, which rows each side got right; a set whose fingerprint
  matches is not evaluated for the baseline again. From the second generation on, the reference
  rows cost one adapter's pass, not two.

The decision (DeviceTrainer.decide) is unchanged: same metrics, same paired rows.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import time

from ..encode import IGNORE, collate

CHECK_ROWS = 128  # rows per check set at most, by default; see BENCHMARKS.md section 5 for what it costs
MIN_CHECK_ROWS = 16


def auto_check_rows(trained_rows: int | None) -> int:
    """Rows per check set for a generation that trains on `trained_rows` rows (new + replayed, all steps)."""
    if not trained_rows:
        return CHECK_ROWS
    n = max(1, trained_rows // 3)
    return max(MIN_CHECK_ROWS, min(CHECK_ROWS, 1 << (n.bit_length() - 1)))


def sample_rows(rows: list, limit: int | None, name: str, seed: int) -> list:
    """At most `limit` of `rows`, a seeded sample kept in file order (all of them under the limit)."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    keep = sorted(random.Random(f"check:{name}:{seed}").sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def eval_step_metrics(engine, data: list, batch: int, pad_id: int) -> dict:
    """A causal LM's held-out metrics through the training engine's eval step: its loss is the mean
    over a batch's labelled tokens, so the token-weighted mean over batches is the mean over all
    labelled tokens (what the inference graph's evaluation computes)."""
    loss_sum, count = 0.0, 0
    for i in range(0, len(data), batch):
        b = collate(data[i : i + batch], pad_id)
        n = int((b["labels"][:, 1:] != IGNORE).sum())
        if n:
            loss_sum += engine.eval_loss(b) * n
            count += n
    loss = loss_sum / max(count, 1)
    return {"rows": len(data), "tokens": count, "eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def fingerprint(data: list, batch: int, graph: str) -> str:
    """Identifies what a set's metrics were computed on: the rows' tokens and labels, in order, the batch and the graph."""
    h = hashlib.sha256(json.dumps([graph, batch]).encode())
    for e in data:
        h.update(json.dumps(e.key() if hasattr(e, "key") else [list(e.input_ids), e.labels]).encode())
    return h.hexdigest()[:16]


def bits(correct: list | None) -> str | None:
    return None if correct is None else "".join("1" if c else "0" for c in correct)


def unbits(text: str | None) -> list | None:
    return None if text is None else [c == "1" for c in text]


def earlier_result(generations: list, parent: int, split: str, print_: str) -> tuple[dict, list | None] | None:
    """(metrics, per-row correctness) of generation `parent` on a set with this fingerprint, from any record
    that checked it: the parent's own (as the candidate), a sibling's (as the baseline) or a descendant's (as the origin)."""
    for g in reversed(generations):
        c = g.get("check") or {}
        if (c.get("fingerprints") or {}).get(split) != print_:
            continue
        sides = ["candidate"] if g.get("id") == parent else ["baseline"] if g.get("parent") == parent else []
        sides += ["origin"] if (g.get("check") or {}).get("origin") == parent else []
        for side in sides:
            m = (g.get("metrics") or {}).get(side, {}).get(split)
            if m is not None:
                return dict(m), unbits((c.get("correct") or {}).get(side, {}).get(split))
    return None


class PromotionCheck:
    """Both adapters on the same rows. `owner` is a DeviceTrainer or apply.py's checker: it holds the
    bundle, manifest, tokenizer, task, held_set and check_sets (or reference_set)."""

    def __init__(self, owner, check_rows: int | None = CHECK_ROWS, seed: int = 0, engine=None, batch: int | None = None):
        self.owner, self.engine, self.check_rows, self.seed = owner, engine, check_rows, seed
        self.batch = batch or owner.manifest.train_shape.batch
        checks = getattr(owner, "check_sets", None)
        checks = checks if checks is not None else {"reference": owner.reference_set}
        full = {"heldout": owner.held_set, **checks}
        self.sets = {name: sample_rows(rows, check_rows, name, seed) for name, rows in full.items() if rows}
        self.info = {"rows_per_set": check_rows, "seed": seed, "drawn": {n: len(r) for n, r in self.sets.items()},
                     "of": {n: len(r) for n, r in full.items() if r}}

    def compare(self, base_params: dict, new_params: dict, parent: int | None = None, generations: list | None = None,
                origin: int | None = None, origin_params=None) -> tuple[dict, dict]:
        """(metrics, per-row correctness) as DeviceTrainer.compare returns them. With `parent` (the
        baseline's generation) and the state's `generations`, a set the parent was already checked on is reused.
        With `origin` (a generation other than the parent: the bundle's adapter, or the workstation's last
        update) and `origin_params` (loads its weights, only when no earlier check scored it on the same
        rows), the bundle's reference rows are also scored for it ("origin" in the result): small losses against
        each parent add up over generations, and only the origin sees the sum."""
        t0 = time.perf_counter()
        use_engine = self.engine is not None and self.owner.task == "causal-lm"
        graph = "eval-step" if use_engine else "inference"
        batch = self.batch if use_engine else None
        prints = {split: fingerprint(data, batch or 0, graph) for split, data in self.sets.items()}
        known = {}
        origin_split = [s for s in ("reference",) if s in self.sets] if origin is not None else []
        for side, gen, splits in (("baseline", parent, self.sets), ("origin", origin, origin_split)):
            for split in splits if gen is not None and generations else ():
                hit = earlier_result(generations, gen, split, prints[split])
                if hit is not None:
                    known[(side, split)] = hit
        self.info.update(engine=f"training engine's eval step ({self.engine.name}), batch {self.batch}" if use_engine
                         else "one inference session, weights swapped", fingerprints=prints, origin=origin if origin_split else None,
                         baseline_reused=sorted(s for side, s in known if side == "baseline"))
        self._run = run = self._with_engine if use_engine else self._with_inference
        todo = [s for s in origin_split if ("origin", s) not in known]
        sides = [("origin", origin_params() if todo else None, todo)] if origin_split else []
        sides += [("baseline", base_params, [s for s in self.sets if ("baseline", s) not in known]), ("candidate", new_params, list(self.sets))]
        out, rows = run(*sides)
        for (side, split), (m, correct) in known.items():
            out[side][split], rows[(side, split)] = m, correct
        for side in out:
            out[side] = {split: out[side][split] for split in self.sets if split in out[side]}  # the sets' order
        if not use_engine:
            self.info["correct"] = {side: {split: bits(rows.get((side, split))) for split in out[side]} for side in out}
        self.info["seconds"] = round(time.perf_counter() - t0, 2)
        self._last = out, rows
        return out, rows

    def rescore(self, new_params: dict) -> tuple[dict, dict]:
        """compare()'s result with another candidate: only the candidate's side is evaluated again."""
        t0 = time.perf_counter()
        out, rows = self._last
        got, got_rows = self._run(("candidate", new_params, list(self.sets)))
        out, rows = {**out, "candidate": got["candidate"]}, {**rows, **got_rows}
        if "correct" in self.info:
            self.info["correct"]["candidate"] = {split: bits(got_rows.get(("candidate", split))) for split in got["candidate"]}
        self.info["seconds"] = round(self.info["seconds"] + time.perf_counter() - t0, 2)
        self._last = out, rows
        return out, rows

    def _with_engine(self, *sides) -> tuple[dict, dict]:
        out, rows = {}, {}
        pad = self.owner.tokenizer.pad_token_id
        for name, params, splits in sides:
            out[name] = {}
            if not splits:
                continue
            self.engine.set_params(params)
            for split in splits:
                out[name][split] = eval_step_metrics(self.engine, self.sets[split], self.batch, pad)
                rows[(name, split)] = None
        return out, rows

    def _with_inference(self, *sides) -> tuple[dict, dict]:
        from .infer import Predictor

        out, rows = {}, {}
        predictor = None
        try:
            for name, params, splits in sides:
                out[name] = {}
                if not splits:
                    continue
                if predictor is None:
                    predictor = Predictor(self.owner.bundle, self.owner.manifest, params, self.owner.tokenizer)
                else:
                    predictor.set_params(params)
                for split in splits:
                    m = predictor.evaluate(self.sets[split], per_row=True)
                    rows[(name, split)] = m.pop("correct", None)
                    out[name][split] = m
        finally:
            del predictor
            gc.collect()
        return out, rows
