"""The promotion check of a generation, at little cost. Torch-free.

`device train` compares the new adapter with its parent on rows it never trained on (held-out rows
and the check rows of rehearsal.py) before it promotes it. The check used to build an inference
session per adapter and run every row through the full inference graph (logits at every position
over the whole vocabulary); on Qwen2.5-0.5B it took most of a generation's wall time and doubled
the process's peak memory. Now:

- **Rows:** each check set (held-out, reference, earlier) is a seeded sample of at most
  `check_rows` rows (`--check-rows`, default CHECK_ROWS). The sample depends on the set's rows, its
  name and the seed, not on the generation, so a bundle's reference rows are checked on the same
  sample each time. The status record says what was drawn from how many.
- **Sessions:** a causal LM is checked with the training engine's own eval step (the loss graph,
  projecting onto the vocabulary only at labelled positions), at the training batch, its weights
  swapped between the two adapters: no session is built for the check. A classifier needs which
  rows each adapter got right (the paired sign test), so it runs ONE inference session, built once
  the training engine is freed, with the two adapters' weights swapped in turn.

The decision (DeviceTrainer.decide) is unchanged: same metrics, same paired rows.
"""

from __future__ import annotations

import gc
import math
import random
import time

from ..encode import IGNORE, collate

CHECK_ROWS = 128  # rows per check set; see BENCHMARKS.md section 5 for what it costs


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

    def compare(self, base_params: dict, new_params: dict) -> tuple[dict, dict]:
        """(metrics, per-row correctness) as DeviceTrainer.compare returns them."""
        t0 = time.perf_counter()
        if self.engine is not None and self.owner.task == "causal-lm":
            self.info["engine"] = f"training engine's eval step ({self.engine.name}), batch {self.batch}"
            out, rows = self._with_engine(base_params, new_params)
        else:
            self.info["engine"] = "one inference session, weights swapped"
            out, rows = self._with_inference(base_params, new_params)
        self.info["seconds"] = round(time.perf_counter() - t0, 2)
        return out, rows

    def _with_engine(self, base_params: dict, new_params: dict) -> tuple[dict, dict]:
        out, rows = {}, {}
        pad = self.owner.tokenizer.pad_token_id
        for name, params in (("baseline", base_params), ("candidate", new_params)):
            self.engine.set_params(params)
            out[name] = {split: eval_step_metrics(self.engine, data, self.batch, pad) for split, data in self.sets.items()}
            for split in self.sets:
                rows[(name, split)] = None
        return out, rows

    def _with_inference(self, base_params: dict, new_params: dict) -> tuple[dict, dict]:
        from .infer import Predictor

        out, rows = {}, {}
        predictor = None
        try:
            for name, params in (("baseline", base_params), ("candidate", new_params)):
                if predictor is None:
                    predictor = Predictor(self.owner.bundle, self.owner.manifest, params, self.owner.tokenizer)
                else:
                    predictor.set_params(params)
                out[name] = {}
                for split, data in self.sets.items():
                    m = predictor.evaluate(data, per_row=True)
                    rows[(name, split)] = m.pop("correct", None)
                    out[name][split] = m
        finally:
            del predictor
            gc.collect()
        return out, rows
