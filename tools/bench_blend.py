#!/usr/bin/env python3
"""How far to move toward a trained generation: accuracy of previous + b x (trained - previous).

Trains one generation with `--blend 1` (the trained adapter as is) on the device, then scores the
weight average of it and its parent for each b on two test sets (the device's new domain and the
workstation's). This is what chose `device train`'s default `--blend` (BENCHMARKS.md section 10).
Torch-free: run it with the device environment.

    .venv-device/bin/python tools/bench_blend.py --bundle runs/quickstart-sentiment.bundle \
        --data assets/data/reviews/gen1.jsonl --test reviews=assets/data/reviews/test.jsonl \
        --test tweets=assets/data/sentiment/test.jsonl --blends 0,0.25,0.5,0.75,1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the generation's rows")
    ap.add_argument("--test", action="append", required=True, metavar="NAME=FILE")
    ap.add_argument("--blends", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON")
    a = ap.parse_args(argv)
    from edgeft.device.learner import Learner
    from edgeft.device.rehearsal import blend

    with tempfile.TemporaryDirectory(prefix="bench-blend-") as tmp:
        learner = Learner(a.bundle, Path(tmp) / "state", log=lambda m: None)
        s = learner.train(a.data, blend=1.0, seed=a.seed, tolerance=1.0)  # tolerance 1: kept whatever it scores
        state = learner.state()
        trained, parent = state.params(s["generation"]), state.params(0)
        predictor = learner.model(0)
        tests = dict(t.split("=", 1) for t in a.test)
        from edgeft.datasets import load_task_rows
        from edgeft.device.data import encode_rows

        m = learner.manifest
        sets = {k: encode_rows(load_task_rows(p, m.task, m.labels), m.task, learner.tokenizer, m.labels, m.max_seq_len,
                               where=p, warn=lambda *x, **y: None) for k, p in tests.items()}
        key = "accuracy" if m.task == "classify" else "perplexity"
        rows = []
        for b in (float(x) for x in a.blends.split(",")):
            predictor.set_params(blend(parent, trained, b) if b else parent)
            r = {"blend": b, **{k: round(predictor.evaluate(v)[key], 4) for k, v in sets.items()}}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.out:
        a.out.write_text(json.dumps({"bundle": str(a.bundle), "data": str(a.data), "steps": s["steps"], "metric": key, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
