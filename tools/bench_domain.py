#!/usr/bin/env python3
"""The domain-shift story, measured: a tweet-sentiment bundle learns movie reviews on the device.

The workstation trained the bundle on tweets (tools/quickstart). The device then receives Rotten
Tomatoes reviews (assets/data/reviews, from tools/prepare_assets.py) in three generations, one
`edgeft device train` each, for every seed and mode:

  rehearsal   the device defaults: replayed rows mixed into every batch (edgeft/device/rehearsal.py)
  naive       plain fine-tuning on the new rows: --replay-ratio 0 --l2-previous 0

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

Writes the table to stdout and everything (per generation: decision, reason, steps, seconds, the
guard's own metrics) to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"rehearsal": [], "naive": ["--replay-ratio", "0", "--l2-previous", "0"]}


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


def flipped(src: Path, dst: Path) -> Path:
    swap = {"positive": "negative", "negative": "positive"}
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    dst.write_text("".join(json.dumps({**r, "label": swap.get(r["label"], r["label"])}) + "\n" for r in rows), encoding="utf-8")
    return dst


def run_story(edgeft: list[str], bundle: Path, state: Path, shards: list[tuple[str, Path]], tests: dict, seed: int,
              args: list[str], base: dict, log) -> list[dict]:
    gens, now = [], dict(base)
    for i, (name, data) in enumerate(shards, 1):
        t0 = time.time()
        tr = call([*edgeft, "device", "train", "--bundle", str(bundle), "--state", str(state), "--data", str(data),
                   "--seed", str(seed), "--quiet", "--json", *args])
        ev = {k: call([*edgeft, "device", "eval", "--bundle", str(bundle), "--state", str(state), "--data", str(p),
                       "--generation", str(tr["generation"]), "--json"]) for k, p in tests.items()}
        cand = {k: e["accuracy"] for k, e in ev.items()}
        parent = dict(now)
        if tr["promoted"]:
            now = dict(cand)
        gens.append({"generation": tr["generation"], "data": name, "promoted": tr["promoted"], "reason": tr["reason"],
                     "steps": tr["steps"], "train_seconds": tr["seconds"], "wall_seconds": round(time.time() - t0, 1),
                     "peak_rss_mib": tr["peak_rss_mib"], "candidate": cand, "parent": parent, "now": dict(now),
                     "candidate_loss": {k: e["eval_loss"] for k, e in ev.items()},
                     "guard": {split: {"baseline": tr["metrics"]["baseline"][split].get("accuracy"),
                                       "candidate": tr["metrics"]["candidate"][split].get("accuracy"),
                                       "baseline_loss": tr["metrics"]["baseline"][split]["eval_loss"],
                                       "candidate_loss": tr["metrics"]["candidate"][split]["eval_loss"],
                                       "rows": tr["metrics"]["candidate"][split]["rows"]} for split in tr["metrics"]["candidate"]},
                     "rehearsal": tr.get("rehearsal")})
        g = gens[-1]
        log(f"  gen {g['generation']} {name:<13} {'promoted' if g['promoted'] else 'REJECTED':<9} "
            + "  ".join(f"{k} {cand[k]:.4f}" for k in tests) + f"  ({g['steps']} steps, {g['train_seconds']:.0f} s)")
    return gens


def summarize(results: list[dict], base: dict, hurt: float) -> dict:
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        runs = [r for r in results if r["mode"] == mode]
        story = [[g for g in r["generations"] if g["data"] != "flipped labels"] for r in runs]
        final = {k: sum(s[-1]["now"][k] for s in story) / len(story) for k in base}
        hurting = [(r["seed"], g["generation"]) for r in runs for g in r["generations"]
                   if any(g["candidate"][k] < g["parent"][k] - hurt for k in base)]
        hurting_promoted = [(r["seed"], g["generation"]) for r in runs for g in r["generations"]
                            if g["promoted"] and any(g["candidate"][k] < g["parent"][k] - hurt for k in base)]
        out[mode] = {"final_now_mean": final, "delta_points": {k: round(100 * (final[k] - base[k]), 2) for k in base},
                     "per_seed_delta_points": {r["seed"]: {k: round(100 * (s[-1]["now"][k] - base[k]), 2) for k in base} for r, s in zip(runs, story)},
                     "hurting_candidates": hurting, "hurting_promoted": hurting_promoted}
        d = out[mode]["delta_points"]
        out[mode]["goals"] = {"reviews_+5": d["reviews"] >= 5, "tweets_-1": d["tweets"] >= -1, "hurting_rejected": not hurting_promoted}
    return out


def table(results: list[dict], base: dict) -> str:
    head = (f"{'mode':<10}{'seed':>5} {'gen':>4} {'data':<15}{'steps':>6}{'train s':>8}  {'decision':<9}"
            f"{'cand rev':>9}{'cand tw':>9}{'now rev':>9}{'now tw':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['mode']:<10}{r['seed']:>5} {0:>4} {'(bundle)':<15}{'':>6}{'':>8}  {'':<9}{'':>9}{'':>9}"
                     f"{base['reviews']:>9.4f}{base['tweets']:>9.4f}")
        for g in r["generations"]:
            lines.append(f"{'':<10}{'':>5} {g['generation']:>4} {g['data']:<15}{g['steps']:>6}{g['train_seconds']:>8.0f}  "
                         f"{'promoted' if g['promoted'] else 'rejected':<9}{g['candidate']['reviews']:>9.4f}{g['candidate']['tweets']:>9.4f}"
                         f"{g['now']['reviews']:>9.4f}{g['now']['tweets']:>9.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "quickstart-sentiment.bundle")
    ap.add_argument("--reviews", type=Path, default=ROOT / "assets" / "data" / "reviews", help="gen1..3.jsonl and test.jsonl")
    ap.add_argument("--tweets", type=Path, default=ROOT / "assets" / "data" / "sentiment" / "test.jsonl")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--modes", default="rehearsal,naive", help="NAME[=device train options],...")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--bad", action="store_true", help="a last generation on gen1 with flipped labels: must be rejected")
    ap.add_argument("--hurt", type=float, default=0.01, help="a candidate hurts when it loses more than this on a test set")
    ap.add_argument("--edgeft", help="the device command (default: .venv-device/bin/edgeft, else this python -m edgeft)")
    ap.add_argument("--workdir", type=Path, help="state folders (default: a temp folder, removed)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_domain.json")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    edgeft = edgeft_cmd(a.edgeft)
    tests = {"reviews": a.reviews / "test.jsonl", "tweets": a.tweets}
    for p in [a.bundle / "manifest.json", *tests.values(), *(a.reviews / f"gen{i}.jsonl" for i in range(1, a.generations + 1))]:
        if not p.is_file():
            raise SystemExit(f"missing {p}: run tools/prepare_assets.py and tools/quickstart first")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work_ctx = tempfile.TemporaryDirectory(prefix="bench-domain-") if a.workdir is None else None
    work = Path(work_ctx.name) if work_ctx else a.workdir
    work.mkdir(parents=True, exist_ok=True)
    shards = [(f"reviews gen{i}", a.reviews / f"gen{i}.jsonl") for i in range(1, a.generations + 1)]
    if a.bad:
        shards.append(("flipped labels", flipped(a.reviews / "gen1.jsonl", work / "flipped.jsonl")))
    t0 = time.time()
    base = {k: call([*edgeft, "device", "eval", "--bundle", str(a.bundle), "--state", str(work / "none"), "--data", str(p),
                     "--generation", "0", "--json"])["accuracy"] for k, p in tests.items()}
    log(f"no update: reviews {base['reviews']:.4f}, tweets {base['tweets']:.4f}")
    results = []
    for mode, args in parse_modes(a.modes).items():
        for seed in [int(s) for s in a.seeds.split(",")]:
            log(f"{mode} (options: {shlex.join(args) or 'defaults'}), seed {seed}")
            state = work / f"{mode}-seed{seed}"
            if state.exists():
                raise SystemExit(f"{state} exists: pass a fresh --workdir")
            gens = run_story(edgeft, a.bundle, state, shards, tests, seed, args, base, log)
            results.append({"mode": mode, "options": args, "seed": seed, "generations": gens})
    summary = summarize(results, base, a.hurt)
    report = {"bundle": str(a.bundle), "tests": {k: str(v) for k, v in tests.items()}, "no_update": base, "results": results,
              "summary": summary, "command": shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "seconds": round(time.time() - t0, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(table(results, base))
    print()
    for mode, s in summary.items():
        d = s["delta_points"]
        print(f"{mode:<10} after {a.generations} generations (mean of {len(a.seeds.split(','))} seeds): reviews {d['reviews']:+.1f} points, "
              f"tweets {d['tweets']:+.1f} points; candidates that hurt: {len(s['hurting_candidates'])}, promoted anyway: "
              f"{len(s['hurting_promoted'])}; goals {'met' if all(s['goals'].values()) else 'NOT met'} {s['goals']}")
    print(f"(JSON: {a.out}; {report['seconds']:.0f} s)")
    if work_ctx:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
