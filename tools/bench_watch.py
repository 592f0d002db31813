#!/usr/bin/env python3
"""`edgeft device watch` under fault injection: SIGKILL at random moments, then count every row.

A real watch process serves an inbox while files arrive (written to a temp name, renamed), and is
killed with SIGKILL at a random moment, again and again: some kills right after start (mid-ingest),
some while a generation trains or is checked, some anywhere. After the last kill it is restarted
with `--once --min-rows 1` until nothing is pending. Then the audit, from the files alone:

  rows dropped       rows in the files handed to the inbox
  rows ingested      rows in the learner's store (trained + still pending)
  rows trained       rows in the rounds of recorded generations (learner history)
  rows lost          dropped but never trained, or trained in a generation state.json no longer
                     records (the weights are gone)              (must be 0)
  rows trained twice in two rounds, or a round in two generations (must be 0)

Meanwhile an app in this process predicts through its own `Learner` every 0.25 s (latency, errors:
must be 0, and the generations it served as the service promoted them).

    flock /tmp/edgeft-heavy.lock .venv/bin/python tools/bench_watch.py --bundle /tmp/watch-bench.bundle \
        --kills 24 --out bench-results/watch-sigkill.json

The watch runs from .venv-device (torch-free, as on a device) when it exists.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ["assets/data/reviews/gen1.jsonl", "assets/data/reviews/gen2.jsonl", "assets/data/reviews/gen3.jsonl", "assets/data/sentiment/shard1.jsonl"]


def edgeft_cmd() -> list[str]:
    dev = ROOT / ".venv-device" / "bin" / "edgeft"
    return [str(dev)] if dev.is_file() else [sys.executable, "-m", "edgeft"]


def row_digest(row: dict) -> str:  # the same digest as edgeft/device/pending.py, kept here so the audit is independent
    import hashlib

    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def drop(inbox: Path, name: str, rows: list[dict]) -> None:
    """A producer's hand-over: write a temp name, then rename."""
    tmp = inbox / f"{name}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, inbox / name)


def events(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line a kill cut
    return out


def wait_for(log: Path, event: str, after: int, timeout: float, proc) -> bool:
    """Until the log holds more than `after` lines of `event` (or the process ended)."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if sum(e["event"] == event for e in events(log)) > after:
            return True
        time.sleep(0.02)
    return False


def where(state: Path, inbox: Path) -> str:
    """What the killed process was doing, read from what it left."""
    if (state / "job" / "last.safetensors").is_file():
        return "training (after a checkpoint)"
    if (state / "learner" / "round.json").is_file():
        return "round open (training, checking or bookkeeping)"
    stage = inbox / ".edgeft-ingesting"
    if stage.is_dir() and any(stage.iterdir()):
        return "ingesting a file"
    return "idle or starting"


def chaos(cmd: list[str], inbox: Path, state: Path, log: Path, files: list[list[dict]], kills: int, seed: int,
          files_per_cycle: int = 2, env: dict | None = None, final_runs: int = 6, say=print) -> dict:
    """Serve, drop files, SIGKILL at random moments, restart; finally drain with --once."""
    rng = random.Random(seed)
    inbox.mkdir(parents=True, exist_ok=True)
    queue, dropped, killed_at = list(files), [], collections.Counter()
    t0 = time.time()
    for k in range(kills):
        before = {e: sum(x["event"] == e for x in events(log)) for e in ("started", "training")}
        proc = subprocess.Popen(cmd + ["--log", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for _ in range(files_per_cycle):
            if queue:
                rows = queue.pop(0)
                drop(inbox, f"f{len(dropped):04d}.jsonl", rows)
                dropped.append(rows)
        mode = rng.choice(["startup", "training", "training", "anytime"])
        if mode == "startup":
            wait_for(log, "started", before["started"], 120, proc)
            time.sleep(rng.uniform(0, 0.3))
        elif mode == "training":
            wait_for(log, "started", before["started"], 120, proc)  # a loaded machine takes long to start
            wait_for(log, "training", before["training"], 30, proc)  # none when too few rows arrived: a kill anyway
            time.sleep(rng.uniform(0, 2.0) * rng.choice([0.1, 1, 4]))
        else:
            time.sleep(rng.uniform(0, 6))
        if proc.poll() is not None:
            raise RuntimeError(f"watch exited by itself (code {proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        killed_at[where(state, inbox)] += 1
        say(f"kill {k + 1}/{kills} ({mode}): {where(state, inbox)}")
    for rows in queue:
        drop(inbox, f"f{len(dropped):04d}.jsonl", rows)
        dropped.append(rows)
    runs = 0
    for runs in range(1, final_runs + 1):
        out = subprocess.run(cmd + ["--log", str(log), "--once", "--min-rows", "1"], capture_output=True, text=True, timeout=1800, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"watch --once failed (code {out.returncode}): {out.stderr[-2000:]}")
        s = json.loads(out.stdout)
        stage = inbox / ".edgeft-ingesting"
        if not s["pending_rows"] and s["round"] is None and not (stage.is_dir() and any(stage.iterdir())) and not list(inbox.glob("*.jsonl")):
            break
    return {"kills": kills, "killed_while": dict(killed_at), "files": len(dropped), "final_runs": runs, "seconds": round(time.time() - t0, 1),
            "dropped": [r for rows in dropped for r in rows]}


def audit(state: Path, inbox: Path, dropped: list[dict]) -> dict:
    """Count rows from the files: the learner's history, its pending store, state.json."""
    learner = state / "learner"
    history = events(learner / "history.jsonl")
    pending = [json.loads(line) for p in sorted((learner / "pending").glob("*.jsonl")) for line in p.read_text().splitlines() if line.strip()]
    expected = collections.Counter(row_digest(r) for r in dropped)
    gens = json.loads((state / "state.json").read_text())["generations"] if (state / "state.json").is_file() else []  # none trained yet
    rounds = collections.Counter(Path(g["data"]["file"]).stem for g in gens if g.get("data"))
    orphans = [h for h in history if h["round"] not in rounds]  # recorded as trained, but its generation is gone: its rows are lost
    history = [h for h in history if h["round"] in rounds]
    trained = collections.Counter(d for h in history for d in h["row_digests"])
    round_rows = {Path(g["data"]["file"]).stem: g["data"]["rows"] for g in gens if g.get("data")}
    recorded = collections.Counter(h["round"] for h in history)
    pending_keys = collections.Counter(row_digest(r) for r in pending)
    return {
        "rows_dropped": len(dropped),
        "rows_ingested": sum(trained.values()) + len(pending),
        "rows_trained": sum(trained.values()),
        "rows_pending": len(pending),
        "rows_lost": sum((expected - trained - pending_keys).values()),
        "rows_trained_twice": sum(k - 1 for k in trained.values() if k > 1) + sum((c - 1) * round_rows[r] for r, c in rounds.items()),
        "rounds_trained_twice": sum(c - 1 for c in rounds.values() if c > 1),
        "generations_without_history": sum((rounds - recorded).values()),
        "history_without_generation": len(orphans),
        "rows_never_dropped": sum((trained - expected).values()),
        "generations": len(history),
        "promoted": sum(h["status"] == "promoted" for h in history),
        "rejected": sum(h["status"] == "rejected" for h in history),
        "files_done": len(list((inbox / "done").iterdir())) if (inbox / "done").is_dir() else 0,
    }


class Probe:
    """An app on the same device: predicts every `period` s through its own Learner while the
    service is killed and restarted, recording latency, errors and the generations it served."""

    def __init__(self, bundle: Path, state: Path, text: str, period: float = 0.25):
        import threading

        self.bundle, self.state, self.text, self.period = bundle, state, text, period
        self.latencies, self.errors, self.generations = [], [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        sys.path.insert(0, str(ROOT))
        from edgeft.device.learner import Learner

        learner = Learner(self.bundle, self.state)
        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                learner.predict(self.text)
                self.latencies.append(time.perf_counter() - t)
                gen = learner._model[1]
                if not self.generations or self.generations[-1] != gen:
                    self.generations.append(gen)
            except Exception as e:  # noqa: BLE001  (counted: an app must never see one)
                self.errors.append(repr(e)[:200])
            self.stop.wait(self.period)

    def result(self) -> dict:
        lat = sorted(self.latencies)
        pick = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None  # noqa: E731
        return {"predictions": len(lat), "errors": len(self.errors), "first_errors": self.errors[:3], "p50_ms": pick(0.5), "p95_ms": pick(0.95),
                "max_ms": round(1000 * lat[-1], 1) if lat else None, "generations_served": self.generations}


def make_files(paths: list[str], n_files: int, lo: int, hi: int, seed: int) -> list[list[dict]]:
    """Files of lo..hi distinct rows each, drawn without replacement from the data files."""
    pool, seen = [], set()
    for p in paths:
        for line in (ROOT / p).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            key = row_digest(r)
            if key not in seen:
                seen.add(key)
                pool.append(r)
    rng = random.Random(seed)
    rng.shuffle(pool)
    files = []
    for _ in range(n_files):
        n = rng.randint(lo, hi)
        files.append(pool[:n])
        pool = pool[n:]
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--kills", type=int, default=24)
    ap.add_argument("--files", type=int, help="Data files handed over (default: 2 per kill + 4).")
    ap.add_argument("--rows", default="8,24", help="Rows per file: LO,HI.")
    ap.add_argument("--min-rows", type=int, default=30)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="Working folder (default: a temp folder).")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "watch-sigkill.json")
    args = ap.parse_args()
    lo, hi = map(int, args.rows.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-watch-"))
    inbox, state, log = work / "inbox", work / "state", work / "watch.log"
    files = make_files(DATA, args.files or 2 * args.kills + 4, lo, hi, args.seed)
    cmd = edgeft_cmd() + ["device", "watch", "--bundle", str(args.bundle), "--state", str(state), "--inbox", str(inbox),
                          "--min-rows", str(args.min_rows), "--interval", "0.2", "--settle", "0", "--max-steps", str(args.max_steps)]
    probe = Probe(args.bundle, state, "the battery died after a week, what a waste")
    probe.thread.start()
    try:
        run = chaos(cmd, inbox, state, log, files, args.kills, args.seed)
    finally:
        probe.stop.set()
        probe.thread.join()
    counts = audit(state, inbox, run.pop("dropped"))
    ev = events(log)
    result = {"bundle": str(args.bundle), "command": " ".join(cmd), "seed": args.seed, **run, **counts,
              "starts": sum(e["event"] == "started" for e in ev), "recovered_rounds": sum(e["event"] == "generation" and e.get("recovered") for e in ev),
              "resumed_trainings": sum(e["event"] == "trainer" and e.get("message", "").startswith("resuming") for e in ev),
              "skipped_reingests": sum(e["event"] == "skipped" for e in ev), "app": probe.result()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k in ("kills", "killed_while", "files", "rows_dropped", "rows_ingested", "rows_trained", "rows_lost", "rows_trained_twice",
              "rounds_trained_twice", "generations", "promoted", "rejected", "recovered_rounds", "resumed_trainings", "skipped_reingests", "seconds", "app"):
        print(f"{k:>22}: {result[k]}")
    print(f"written to {args.out}")
    ok = counts["rows_lost"] == counts["rows_trained_twice"] == counts["rounds_trained_twice"] == 0 and not result["app"]["errors"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
