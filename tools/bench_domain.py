#!/usr/bin/env python3
"""The domain-shift story, measured: a tweet-sentiment bundle learns movie reviews on the device.

The workstation trained the bundle on tweets (tools/quickstart). The device then receives Rotten
Tomatoes reviews (assets/data/reviews, from tools/prepare_assets.py) in three generations, one
`edgeft device train` each, for every seed and mode:

  rehearsal   the device defaults: replayed rows mixed into every batch (edgeft/device/rehearsal.py)
  naive       plain fine-tuning on the new rows: --replay-ratio 0 --l2-previous 0 --no-freeze-head --blend 1 --blend-backoff 0

After each generation: accuracy of the candidate (the new generation, promoted or not) and of the
device's current generation on the held-out reviews test set (the device's domain) and on the
tweets test set (forgetting), next to no update, and the guard's decision. `--bad` adds a fourth
generation whose labels are flipped (a broken feed), which the guard must reject.

A candidate "hurts" when it loses more than --hurt points on either test set against its parent;
the goals: >= +5 points on reviews after three generations, <= 1 point lost on tweets, and every
candidate that hurts rejected. The test sets are never seen by the device.

    .venv/bin/python tools/bench_domain.py --bundle runs/quickstart-sentiment.bundle \
        [--seeds 0,1] [--modes rehearsal,naive] [--bad] [--out runs/bench_domain.json]
    # a mode is NAME or NAME="device train options", e.g. --modes 'l2=--l2-previous 0.1'

The same for a causal LM (the bundle's task decides; e.g. SmolLM2 trained on GSM8K, exported with
--reference-data assets/data/reviews-chat/gsm8k_reference.jsonl): the device receives chat rows on
movie reviews (assets/data/reviews-chat: write a positive/negative review of a named movie, or say
whether a review is positive or negative), and the metric is perplexity over the answer tokens of
the held-out reviews-chat test set (the new domain) and of held-out GSM8K rows (forgetting). There a
candidate hurts when its perplexity rises by more than --hurt (relative) on either test set, and the
goals read: lower perplexity on reviews than no update, GSM8K perplexity at most 1% above it.

    .venv/bin/python tools/bench_domain.py --bundle runs/smollm-domain.bundle --seeds 0,1 --bad \
        --out runs/bench_domain_causal.json

Writes the table to stdout and everything (per generation: decision, reason, steps, seconds, the
guard's own metrics) to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"rehearsal": [], "naive": ["--replay-ratio", "0", "--l2-previous", "0", "--no-freeze-head", "--blend", "1",
                                   "--blend-backoff", "0"]}


def edgeft_cmd(spec: str | None) -> list[str]:
    if spec:
        return shlex.split(spec)
    dev = ROOT / ".venv-device" / "bin" / "edgeft"
    return [str(dev)] if dev.is_file() else [sys.executable, "-m", "edgeft"]


def call(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {shlex.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def parse_modes(text: str) -> dict[str, list[str]]:
    modes = {}
    for item in text.split(","):
        name, _, args = item.partition("=")
        name = name.strip()
        modes[name] = shlex.split(args) if args else MODES[name]
    return modes


SWAP = {"positive": "negative", "negative": "positive", "Positive.": "Negative.", "Negative.": "Positive."}


def flip_row(row: dict) -> dict:
    """The row with its sentiment turned around: a classify label, or a chat row's answer
    ("Positive." <-> "Negative.") and the sentiment it asks a review to have."""
    if "messages" not in row:
        return {**row, "label": SWAP.get(row["label"], row["label"])}
    msgs = []
    for m in row["messages"]:
        text = m["content"]
        if m["role"] == "assistant":
            text = SWAP.get(text, text)
        else:
            text = re.sub(r"^Write a short (positive|negative) review", lambda x: f"Write a short {SWAP[x.group(1)]} review", text)
        msgs.append({**m, "content": text})
    return {**row, "messages": msgs}


def flipped(src: Path, dst: Path) -> Path:
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    dst.write_text("".join(json.dumps(flip_row(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return dst


class Metric:
    """accuracy (higher is better, changes in points) or perplexity (lower is better, changes in %)."""

    def __init__(self, task: str):
        self.key = "accuracy" if task == "classify" else "perplexity"
        self.higher = task == "classify"

    def hurts(self, cand: float, parent: float, hurt: float) -> bool:
        return cand < parent - hurt if self.higher else cand > parent * (1 + hurt)

    def delta(self, new: float, old: float) -> float:
        """points (accuracy) or percent change (perplexity)."""
        return round(100 * (new - old), 2) if self.higher else round(100 * (new / old - 1), 2)

    def fmt(self, v: float) -> str:
        return f"{v:.4f}" if self.higher else f"{v:.3f}"


def run_story(edgeft: list[str], bundle: Path, state: Path, shards: list[tuple[str, Path]], tests: dict, seed: int,
              args: list[str], base: dict, metric: Metric, log) -> list[dict]:
    gens, now = [], dict(base)
    key = metric.key
    for i, (name, data) in enumerate(shards, 1):
        t0 = time.time()
        tr = call([*edgeft, "device", "train", "--bundle", str(bundle), "--state", str(state), "--data", str(data),
                   "--seed", str(seed), "--quiet", "--json", *args])
        ev = {k: call([*edgeft, "device", "eval", "--bundle", str(bundle), "--state", str(state), "--data", str(p),
                       "--generation", str(tr["generation"]), "--json"]) for k, p in tests.items()}
        cand = {k: e[key] for k, e in ev.items()}
        parent = dict(now)
        if tr["promoted"]:
            now = dict(cand)
        gens.append({"generation": tr["generation"], "data": name, "promoted": tr["promoted"], "reason": tr["reason"],
                     "steps": tr["steps"], "train_seconds": tr["seconds"], "wall_seconds": round(time.time() - t0, 1),
                     "peak_rss_mib": tr["peak_rss_mib"], "candidate": cand, "parent": parent, "now": dict(now),
                     "candidate_loss": {k: e["eval_loss"] for k, e in ev.items()},
                     "guard": {split: {"baseline": tr["metrics"]["baseline"][split].get(key),
                                       "candidate": tr["metrics"]["candidate"][split].get(key),
                                       "baseline_loss": tr["metrics"]["baseline"][split]["eval_loss"],
                                       "candidate_loss": tr["metrics"]["candidate"][split]["eval_loss"],
                                       "origin_loss": tr["metrics"].get("origin", {}).get(split, {}).get("eval_loss"),
                                       "rows": tr["metrics"]["candidate"][split]["rows"]} for split in tr["metrics"]["candidate"]},
                     "blend": (tr.get("rehearsal") or {}).get("blend"),
                     "rehearsal": tr.get("rehearsal")})
        g = gens[-1]
        log(f"  gen {g['generation']} {name:<14} {'promoted' if g['promoted'] else 'REJECTED':<9} "
            + "  ".join(f"{k} {metric.fmt(cand[k])}" for k in tests) + f"  ({g['steps']} steps, {g['train_seconds']:.0f} s)"
            + ("" if g["promoted"] else f"  [{g['reason']}]"))
    return gens


def summarize(results: list[dict], base: dict, hurt: float, metric: Metric) -> dict:
    domain, original = list(base)
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        runs = [r for r in results if r["mode"] == mode]
        story = [[g for g in r["generations"] if g["data"] != "flipped labels"] for r in runs]
        final = {k: sum(s[-1]["now"][k] for s in story) / len(story) for k in base}
        hurting = [(r["seed"], g["generation"]) for r in runs for g in r["generations"]
                   if any(metric.hurts(g["candidate"][k], g["parent"][k], hurt) for k in base)]
        hurting_promoted = [(r["seed"], g["generation"]) for r in runs for g in r["generations"]
                            if g["promoted"] and any(metric.hurts(g["candidate"][k], g["parent"][k], hurt) for k in base)]
        d = {k: metric.delta(final[k], base[k]) for k in base}
        out[mode] = {"final_now_mean": final, "delta": d, "delta_unit": "points" if metric.higher else "percent",
                     "per_seed_delta": {r["seed"]: {k: metric.delta(s[-1]["now"][k], base[k]) for k in base} for r, s in zip(runs, story)},
                     "hurting_candidates": hurting, "hurting_promoted": hurting_promoted}
        if metric.higher:
            out[mode]["goals"] = {f"{domain}_+5": d[domain] >= 5, f"{original}_-1": d[original] >= -1, "hurting_rejected": not hurting_promoted}
        else:
            out[mode]["goals"] = {f"{domain}_ppl_down": d[domain] < 0, f"{original}_ppl_+1%": d[original] <= 1, "hurting_rejected": not hurting_promoted}
    return out


def table(results: list[dict], base: dict, metric: Metric) -> str:
    domain, original = list(base)
    short = {k: k[:6] for k in base}
    head = (f"{'mode':<10}{'seed':>5} {'gen':>4} {'data':<15}{'steps':>6}{'train s':>8}  {'decision':<9}"
            f"{'cand ' + short[domain]:>13}{'cand ' + short[original]:>13}{'now ' + short[domain]:>13}{'now ' + short[original]:>13}")
    lines = [f"{metric.key} on the test sets ({domain}: the device's new domain, {original}: forgetting)", head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['mode']:<10}{r['seed']:>5} {0:>4} {'(bundle)':<15}{'':>6}{'':>8}  {'':<9}{'':>13}{'':>13}"
                     f"{metric.fmt(base[domain]):>13}{metric.fmt(base[original]):>13}")
        for g in r["generations"]:
            lines.append(f"{'':<10}{'':>5} {g['generation']:>4} {g['data']:<15}{g['steps']:>6}{g['train_seconds']:>8.0f}  "
                         f"{'promoted' if g['promoted'] else 'rejected':<9}{metric.fmt(g['candidate'][domain]):>13}"
                         f"{metric.fmt(g['candidate'][original]):>13}{metric.fmt(g['now'][domain]):>13}{metric.fmt(g['now'][original]):>13}")
    return "\n".join(lines)


def markdown(results: list[dict], base: dict, metric: Metric) -> str:
    """The table as Markdown (BENCHMARKS.md), one row per generation."""
    domain, original = list(base)
    lines = [f"| mode | seed | gen | data | steps | train s | decision | blend | candidate {domain} | candidate {original} | now {domain} | now {original} |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['seed']} | 0 | (bundle) | | | | | | | {metric.fmt(base[domain])} | {metric.fmt(base[original])} |")
        for g in r["generations"]:
            lines.append(f"| | | {g['generation']} | {g['data']} | {g['steps']} | {g['train_seconds']:.0f} | "
                         f"{'promoted' if g['promoted'] else '**rejected**'} | {g.get('blend') or ''} | {metric.fmt(g['candidate'][domain])} | "
                         f"{metric.fmt(g['candidate'][original])} | {metric.fmt(g['now'][domain])} | {metric.fmt(g['now'][original])} |")
    return "\n".join(lines)


def render(path: Path) -> None:
    """Print a finished run's JSON as Markdown tables and its summary."""
    report = json.loads(path.read_text(encoding="utf-8"))
    metric = Metric(report.get("task", "classify"))
    print(markdown(report["results"], report["no_update"], metric))
    print()
    for mode, s in report["summary"].items():
        print(f"- {mode}: {s.get('delta', s.get('delta_points'))} ({s.get('delta_unit', 'points')}), per seed {s.get('per_seed_delta', s.get('per_seed_delta_points'))}, "
              f"hurting {s['hurting_candidates']}, promoted anyway {s['hurting_promoted']}, goals {s['goals']}")
    for r in report["results"]:
        for g in r["generations"]:
            if not g["promoted"]:
                print(f"  {r['mode']} seed {r['seed']} gen {g['generation']}: {g['reason']}")
    if metric.higher:  # classify: what today's earlier-rows loss rule decides on the recorded check (a run made before it)
        from edgeft.device.guard import EARLIER_LOSS

        for r in report["results"]:
            for g in r["generations"]:
                e = g["guard"].get("earlier")
                if e and e["candidate_loss"] > e["baseline_loss"] * (1 + EARLIER_LOSS):
                    print(f"  earlier-rows loss rule rejects {r['mode']} seed {r['seed']} gen {g['generation']} ({'promoted' if g['promoted'] else 'rejected'} "
                          f"in the run): {e['baseline_loss']:.4f} -> {e['candidate_loss']:.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "quickstart-sentiment.bundle")
    ap.add_argument("--reviews", type=Path, help="gen1..3.jsonl and test.jsonl (default: assets/data/reviews, or reviews-chat for a causal LM)")
    ap.add_argument("--original", "--tweets", dest="original", type=Path,
                    help="the forgetting test set (default: assets/data/sentiment/test.jsonl, or reviews-chat/gsm8k_test.jsonl for a causal LM)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--modes", default="rehearsal,naive", help="NAME[=device train options],...")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--bad", action="store_true", help="a last generation on gen1 with flipped labels: must be rejected")
    ap.add_argument("--hurt", type=float, default=0.01,
                    help="a candidate hurts when it loses more than this accuracy, or its perplexity rises by more than this share")
    ap.add_argument("--edgeft", help="the device command (default: .venv-device/bin/edgeft, else this python -m edgeft)")
    ap.add_argument("--workdir", type=Path, help="state folders (default: a temp folder, removed)")
    ap.add_argument("--out", type=Path, help="JSON (default: runs/bench_domain.json, or runs/bench_domain_causal.json)")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="only print that finished run as Markdown tables")
    a = ap.parse_args(argv)
    if a.markdown:
        render(a.markdown)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    edgeft = edgeft_cmd(a.edgeft)
    manifest = a.bundle / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"missing {manifest}: run tools/quickstart (or edgeft export) first")
    task = json.loads(manifest.read_text(encoding="utf-8"))["task"]
    metric = Metric(task)
    data = ROOT / "assets" / "data"
    if task == "classify":
        reviews, original, orig_name = a.reviews or data / "reviews", a.original or data / "sentiment" / "test.jsonl", "tweets"
    else:
        reviews = a.reviews or data / "reviews-chat"
        original, orig_name = a.original or reviews / "gsm8k_test.jsonl", "gsm8k"
    out_path = a.out or ROOT / "runs" / ("bench_domain.json" if task == "classify" else "bench_domain_causal.json")
    tests = {"reviews": reviews / "test.jsonl", orig_name: original}
    for p in [*tests.values(), *(reviews / f"gen{i}.jsonl" for i in range(1, a.generations + 1))]:
        if not p.is_file():
            raise SystemExit(f"missing {p}: run tools/prepare_assets.py first")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work_ctx = tempfile.TemporaryDirectory(prefix="bench-domain-") if a.workdir is None else None
    work = Path(work_ctx.name) if work_ctx else a.workdir
    work.mkdir(parents=True, exist_ok=True)
    shards = [(f"reviews gen{i}", reviews / f"gen{i}.jsonl") for i in range(1, a.generations + 1)]
    if a.bad:
        shards.append(("flipped labels", flipped(reviews / "gen1.jsonl", work / "flipped.jsonl")))
    t0 = time.time()
    base = {k: call([*edgeft, "device", "eval", "--bundle", str(a.bundle), "--state", str(work / "none"), "--data", str(p),
                     "--generation", "0", "--json"])[metric.key] for k, p in tests.items()}
    log(f"no update ({metric.key}): " + ", ".join(f"{k} {metric.fmt(v)}" for k, v in base.items()))
    results = []
    for mode, args in parse_modes(a.modes).items():
        for seed in [int(s) for s in a.seeds.split(",")]:
            log(f"{mode} (options: {shlex.join(args) or 'defaults'}), seed {seed}")
            state = work / f"{mode}-seed{seed}"
            if state.exists():
                raise SystemExit(f"{state} exists: pass a fresh --workdir")
            gens = run_story(edgeft, a.bundle, state, shards, tests, seed, args, base, metric, log)
            results.append({"mode": mode, "options": args, "seed": seed, "generations": gens})
            partial = {"bundle": str(a.bundle), "task": task, "metric": metric.key, "no_update": base, "results": results,
                       "summary": summarize(results, base, a.hurt, metric), "partial": True}
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(partial, indent=1) + "\n", encoding="utf-8")  # a killed run keeps what it measured
    summary = summarize(results, base, a.hurt, metric)
    report = {"bundle": str(a.bundle), "task": task, "metric": metric.key, "tests": {k: str(v) for k, v in tests.items()},
              "no_update": base, "results": results, "summary": summary,
              "command": shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]), "seconds": round(time.time() - t0, 1)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(table(results, base, metric))
    print()
    unit = "points" if metric.higher else "% perplexity"
    for mode, s in summary.items():
        d = s["delta"]
        print(f"{mode:<10} after {a.generations} generations (mean of {len(a.seeds.split(','))} seeds): "
              + ", ".join(f"{k} {d[k]:+.1f} {unit}" for k in base)
              + f"; candidates that hurt: {len(s['hurting_candidates'])}, promoted anyway: {len(s['hurting_promoted'])}; "
              f"goals {'met' if all(s['goals'].values()) else 'NOT met'} {s['goals']}")
    print(f"(JSON: {out_path}; {report['seconds']:.0f} s)")
    if work_ctx:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
