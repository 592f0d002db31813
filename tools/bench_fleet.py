#!/usr/bin/env python
"""Benchmark: fleet learning on Flower against each device alone and against centralized training.

Three devices hold non-IID shards of the tweets (shard1..3 pooled, 3,000 rows, 1,000 per label,
dealt so device k gets 60% of its rows from label k and 20% from each other label). All three arms
start from the same bundle and train with the same trainer (`edgeft device train`'s, in the
torch-free .venv-device), and all are scored on the same global test set (test.jsonl, 1,500 rows,
balanced) with the bundle's inference graph:

  fleet        `edgeft fleet serve` + three `edgeft device fleet-join` (a real Flower deployment on
               localhost: SuperLink, three SuperNodes, separate processes), ROUNDS rounds of STEPS
               steps per device; the server scores each round on val.jsonl (rows no device has)
  local-only   `edgeft device train` on one shard alone, ROUNDS x STEPS steps (each device's total)
  centralized  `edgeft device train` on the union of the shards, 3 x ROUNDS x STEPS steps (the
               fleet's total steps, on all the data in one place)

It runs the fleet once per aggregation (fedavg, then exact, each with --compare-aggregations: the
other aggregation of the same updates scored on the same held-out rows every round).

    # the starting bundle: the 30-step MiniLM run (weak on purpose: 0.59 validation accuracy), with the
    # holdout tweets as its reference rows (what the devices rehearse and check forgetting on)
    .venv/bin/edgeft train --model assets/models/all-MiniLM-L6-v2 --task classify --data assets/data/sentiment/train.jsonl \
      --eval-data assets/data/sentiment/val.jsonl --target raspberry-pi-5-8gb --max-seq-len 64 --batch-size 32 --max-steps 30 \
      --out runs/minilm-pi5-30steps
    .venv/bin/edgeft export --run runs/minilm-pi5-30steps --target raspberry-pi-5-8gb --out runs/minilm-pi5-30steps.bundle \
      --reference-data assets/data/sentiment/holdout.jsonl
    .venv/bin/python tools/bench_fleet.py --bundle runs/minilm-pi5-30steps.bundle --rounds 5 --steps 30
    # the fleet alone, the other arms from an earlier run (same bundle, same rounds x steps); the devices' schedule and moments:
    .venv/bin/python tools/bench_fleet.py --bundle runs/minilm-pi5-30steps.bundle --aggregations exact --schedule round --moments reset \
      --baselines bench-results/fleet.json --out bench-results/fleet-round-reset.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "assets" / "data" / "sentiment"
LABELS = ["negative", "neutral", "positive"]
# the server's held-out rows: val.jsonl (600), which no device trains on. Not holdout.jsonl: the bundle's reference
# rows are a sample of it, and every arm's devices rehearse half of them (measured before 2026-12-02 with holdout.jsonl)
HELDOUT = "val.jsonl"


def skewed_shards(folder: Path, major: float = 0.6, seed: int = 0) -> list[Path]:
    rows = [json.loads(line) for k in (1, 2, 3) for line in (DATA / f"shard{k}.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    shards: list[list[dict]] = [[] for _ in LABELS]
    for k, label in enumerate(LABELS):
        have = [r for r in rows if r["label"] == label]
        rng.shuffle(have)
        cut = int(len(have) * major)
        rest = [i for i in range(len(LABELS)) if i != k]
        half = (len(have) - cut) // 2
        shards[k] += have[:cut]
        shards[rest[0]] += have[cut:cut + half]
        shards[rest[1]] += have[cut + half:]
    paths = []
    for k, shard in enumerate(shards):
        rng.shuffle(shard)
        p = folder / f"device{k}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in shard))
        paths.append(p)
    union = folder / "union.jsonl"
    union.write_text("".join(p.read_text() for p in paths))
    return paths + [union]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OPENBLAS_NUM_THREADS": "1"}


def device_train(bundle: Path, data: Path, state: Path, steps: int, seed: int = 0) -> dict:
    cmd = [str(ROOT / ".venv-device/bin/python"), "-m", "edgeft", "device", "train", "--bundle", str(bundle), "--data", str(data),
           "--state", str(state), "--max-steps", str(steps), "--seed", str(seed), "--quiet", "--json",
           "--blend", "1"]  # the trained adapter as is, as a fleet round sends it (fleet/local.py), and as section 11 measured
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if p.returncode:
        sys.exit(f"device train failed:\n{p.stderr[-3000:]}")
    return {**json.loads(p.stdout), "wall_s": round(time.perf_counter() - t0, 2)}


def test_accuracy(bundle: Path, state: Path, generation: int | None, test_rows) -> dict:
    from edgeft.bundle import read_manifest
    from edgeft.device.infer import Predictor
    from edgeft.device.state import DeviceState

    m = read_manifest(bundle)
    st = DeviceState(state, bundle, m)
    p = Predictor(bundle, m, st.params(generation), test_rows[1])
    out = p.evaluate(test_rows[0])
    return {k: round(float(out[k]), 4) for k in ("accuracy", "macro_f1", "eval_loss")}


def encoded_test(bundle: Path, path: Path):
    from edgeft.bundle import read_manifest
    from edgeft.datasets import load_task_rows
    from edgeft.device.data import encode_rows
    from edgeft.device.tokenizer import DeviceTokenizer

    m = read_manifest(bundle)
    tok = DeviceTokenizer(bundle / "tokenizer")
    return encode_rows(load_task_rows(path, m.task, m.labels), m.task, tok, m.labels, m.max_seq_len, where=str(path), warn=lambda _: None), tok


def fleet(bundle: Path, shards: list[Path], work: Path, rounds: int, steps: int, aggregation: str, port: int, server_lr: float = 1.0,
          schedule: str = "run", moments: str = "keep") -> dict:
    out = work / f"fleet-{aggregation}"
    py = str(ROOT / ".venv/bin/python")
    server = subprocess.Popen([py, "-m", "edgeft", "fleet", "serve", "--bundle", str(bundle), "--out", str(out), "--rounds", str(rounds),
                               "--steps", str(steps), "--min-clients", "3", "--eval-data", str(DATA / HELDOUT), "--aggregation",
                               aggregation, "--server-lr", str(server_lr), "--schedule", schedule, "--moments", moments, "--compare-aggregations", "--port", str(port), "--insecure", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    sys.path.insert(0, str(ROOT))
    from edgeft.fleet.launch import stop, wait_reachable

    t0 = time.perf_counter()
    devices = []
    try:
        if not wait_reachable("127.0.0.1", port, 60, server):
            sys.exit(f"the fleet server did not start:\n{server.communicate()[1][-3000:]}")
        for k, shard in enumerate(shards):
            log = open(work / f"{aggregation}-device{k}.log", "w")
            devices.append(subprocess.Popen([str(ROOT / ".venv-device/bin/python"), "-m", "edgeft", "device", "fleet-join", "--bundle", str(bundle),
                                             "--data", str(shard), "--state", str(work / f"{aggregation}-state{k}"), "--name", f"device{k}",
                                             "--server", f"127.0.0.1:{port}", "--insecure"], stdout=log, stderr=subprocess.STDOUT, env=env(),
                                            start_new_session=True))
        stdout, stderr = server.communicate()
        if server.returncode:
            sys.exit(f"fleet serve failed:\n{stderr[-3000:]}")
    finally:
        for d in devices:
            stop(d)
        stop(server)
    wall = time.perf_counter() - t0
    summary = json.loads(stdout)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    replies = [e for e in log if e["event"] == "reply" and e["accepted"]]
    per_round = []
    for r in summary["rounds"][1:]:
        mine = [e for e in replies if e["round"] == r["round"]]
        other = "fedavg" if aggregation == "exact" else "exact"
        per_round.append({"round": r["round"], "clients": r["clients"], "heldout_accuracy": r["heldout"].get("accuracy"),
                          f"heldout_accuracy_{other}": r.get(other, {}).get("heldout", {}).get("accuracy"),
                          "product_error": r.get("product_error"), f"product_error_{other}": r.get(other, {}).get("product_error"),
                          "update_error": r.get("update_error"), f"update_error_{other}": r.get(other, {}).get("update_error"),
                          "bytes_down_per_client": max(e["bytes_down"] for e in mine), "bytes_up_per_client": max(e["bytes_up"] for e in mine),
                          "device_seconds": [e.get("seconds") for e in mine],
                          "device_best_step": [e.get("best-step") for e in mine], "moments_carried": [e.get("moments-carried") for e in mine]})
    return {"out": str(out), "wall_s": round(wall, 1), "rounds": per_round, "start_heldout_accuracy": summary["rounds"][0]["heldout"].get("accuracy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="steps per device per round")
    ap.add_argument("--aggregations", default="fedavg,exact")
    ap.add_argument("--port", type=int, default=9390)
    ap.add_argument("--server-lr", type=float, default=1.0, help="the fleet's server step (edgeft fleet serve --server-lr)")
    ap.add_argument("--schedule", choices=["run", "round"], default="run", help="the devices' learning-rate schedule (edgeft fleet serve --schedule)")
    ap.add_argument("--moments", choices=["keep", "reset"], default="keep", help="the devices' AdamW moments between rounds (edgeft fleet serve --moments)")
    ap.add_argument("--seed", type=int, default=0, help="how the rows are dealt to the devices, and device train --seed of the local and centralized arms")
    ap.add_argument("--baselines", type=Path, help="reuse the start, local-only and centralized arms of an earlier run's JSON (same bundle and rounds x steps)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "fleet.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    bundle = args.bundle.resolve()
    result = {"bundle": str(bundle), "rounds": args.rounds, "steps_per_round": args.steps, "devices": 3, "test": "test.jsonl",
              "server_lr": args.server_lr, "schedule": args.schedule, "moments": args.moments, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        *shards, union = skewed_shards(work, seed=args.seed)
        result["shards"] = [{label: sum(json.loads(line)["label"] == label for line in p.read_text().splitlines()) for label in LABELS} for p in shards]
        test = encoded_test(bundle, DATA / "test.jsonl")
        total = args.rounds * args.steps
        old = json.loads(args.baselines.read_text()) if args.baselines else None
        if old and (old["rounds"] * old["steps_per_round"], old["bundle"], old.get("seed", 0)) != (total, str(bundle), args.seed):
            sys.exit(f"{args.baselines} was measured with another bundle, seed or total of steps per device")
        result["start"] = old["start"] if old else test_accuracy(bundle, work / "s0", 0, test)
        local = old["local_only"] if old else []
        for k, shard in enumerate(shards if not old else []):
            s = device_train(bundle, shard, work / f"local{k}", total, args.seed)
            local.append({"device": k, "steps": s["steps"], "promoted": s["promoted"], "wall_s": s["wall_s"],
                          **test_accuracy(bundle, work / f"local{k}", s["generation"], test)})
            print(f"local-only device {k}: {local[-1]}", file=sys.stderr)
        result["local_only"] = local
        if old:
            result["centralized"], result["baselines_from"] = old["centralized"], str(args.baselines)
        else:
            s = device_train(bundle, union, work / "central", 3 * total, args.seed)
            result["centralized"] = {"steps": s["steps"], "promoted": s["promoted"], "wall_s": s["wall_s"],
                                     **test_accuracy(bundle, work / "central", s["generation"], test)}
        print(f"centralized: {result['centralized']}", file=sys.stderr)
        result["fleet"] = {}
        for i, agg in enumerate(args.aggregations.split(",")):
            f = fleet(bundle, shards, work, args.rounds, args.steps, agg, args.port + i, args.server_lr, args.schedule, args.moments)
            f["test"] = test_accuracy(bundle, Path(f["out"]) / "state", None, test)
            f["test_per_round"] = [test_accuracy(bundle, Path(f["out"]) / "state", g, test)["accuracy"] for g in range(1, args.rounds + 1)]
            result["fleet"][agg] = f
            print(f"fleet ({agg}): {f['test']} in {f['wall_s']} s", file=sys.stderr)
    best_local = max(r["accuracy"] for r in result["local_only"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"start: test accuracy {result['start']['accuracy']:.4f}")
    print("| arm | steps per device | test accuracy | macro-F1 | wall |")
    print("|---|---:|---:|---:|---:|")
    for r in result["local_only"]:
        print(f"| local-only, device {r['device']} | {r['steps']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['wall_s']:.0f} s |")
    c = result["centralized"]
    print(f"| centralized (union) | {c['steps']} (one machine) | {c['accuracy']:.4f} | {c['macro_f1']:.4f} | {c['wall_s']:.0f} s |")
    for agg, f in result["fleet"].items():
        print(f"| fleet, {agg}, {args.rounds} rounds, server step {args.server_lr:g}, schedule {args.schedule}, moments {args.moments} "
              f"| {total} | {f['test']['accuracy']:.4f} "
              f"| {f['test']['macro_f1']:.4f} | {f['wall_s']:.0f} s |")
    for agg, f in result["fleet"].items():
        print(f"\nfleet ({agg}) per round; test accuracy after each round: {f['test_per_round']}")
        other = "fedavg" if agg == "exact" else "exact"
        print(f"| round | clients | held-out acc ({agg}) | held-out acc ({other}, same updates) | B·A error vs the round's update: {agg} "
              f"| {other} | bytes down / up per client |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in f["rounds"]:
            print(f"| {r['round']} | {r['clients']} | {r['heldout_accuracy']:.4f} | {r[f'heldout_accuracy_{other}']:.4f} | {r['update_error']:.4f} "
                  f"| {r[f'update_error_{other}']:.4f} | {r['bytes_down_per_client']:,} / {r['bytes_up_per_client']:,} |")
        f["beats_best_local"] = f["test"]["accuracy"] > best_local
        f["gap_to_centralized_points"] = round(100 * (c["accuracy"] - f["test"]["accuracy"]), 2)
        print(f"beats the best local-only ({best_local:.4f}): {f['beats_best_local']}; "
              f"points below centralized: {f['gap_to_centralized_points']}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
