#!/usr/bin/env python
"""Benchmark: quantization-aware training vs the naive path, per base scheme.

For each scheme S, on the same data and seeds:
  aware  - LoRA trained by edgeft against the S-quantized base, evaluated on the S base
  naive  - LoRA trained on the usual QLoRA base (NF4), then evaluated on the S base
           (what a user gets who fine-tunes with plain QLoRA and quantizes for the device)
The gap (aware - naive) is what training against the device's own base buys.

    .venv/bin/python tools/bench_qat.py                 # MiniLM sentiment, 6 schemes, 2 seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ["int8", "int4-g128", "int4-g32", "nf4", "int3-g32", "int2-g32"]


def train(args, scheme: str, seed: int, out: Path) -> Path:
    from edgeft.workstation.train import Trainer, TrainConfig

    cfg = TrainConfig(model=args.model, data=args.train, eval_data=args.val, task="classify", out=str(out), scheme=scheme,
                      max_seq_len=64, batch_size=32, epochs=args.epochs, seed=seed, eval_before=False, device="cpu")
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    trainer.setup()
    trainer.run()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = ROOT / "assets/data/sentiment"
    ap.add_argument("--model", default=str(ROOT / "assets/models/all-MiniLM-L6-v2"))
    ap.add_argument("--train", default=str(data / "train.jsonl"))
    ap.add_argument("--val", default=str(data / "val.jsonl"))
    ap.add_argument("--test", default=str(data / "test.jsonl"))
    ap.add_argument("--schemes", nargs="+", default=SCHEMES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "bench-results/qat.json"))
    args = ap.parse_args()

    from edgeft.cli import quiet_libraries
    from edgeft.schemes import parse_scheme
    from edgeft.workstation.adapters import evaluate_adapter

    quiet_libraries()
    rows = {s: {"aware": [], "naive": []} for s in args.schemes}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            naive = train(args, "nf4", seed, Path(work) / f"nf4-{seed}")
            for s in args.schemes:
                aware = naive if s == "nf4" else train(args, s, seed, Path(work) / f"{s}-{seed}")
                scheme = parse_scheme(s)
                rows[s]["aware"].append(evaluate_adapter(aware, args.test, scheme)["accuracy"])
                rows[s]["naive"].append(evaluate_adapter(naive, args.test, scheme)["accuracy"])
                print(f"seed {seed} {s:<10} aware {rows[s]['aware'][-1]:.4f}  naive {rows[s]['naive'][-1]:.4f}", flush=True)
    print(f"\nall-MiniLM-L6-v2, 3-class sentiment, test accuracy (mean of seeds {args.seeds})")
    print(f"{'scheme':<12}{'aware':>8}{'naive':>8}{'gap (pts)':>11}")
    summary = {}
    for s, r in rows.items():
        a, n = statistics.mean(r["aware"]), statistics.mean(r["naive"])
        summary[s] = {"aware": a, "naive": n, "gap_points": 100 * (a - n), "per_seed": r}
        print(f"{s:<12}{a:>8.4f}{n:>8.4f}{100 * (a - n):>+11.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "test": args.test, "seeds": args.seeds, "epochs": args.epochs, "schemes": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
