#!/usr/bin/env python3
"""`edgeft device watch` under simulated power loss: every row counted after a cut at many points.

1. Record: a real watch service (any classify bundle, real ONNX Runtime training) runs under
   tools/crashsim.py's recorder while a producer hands files over durably (temp, fsync, rename,
   fsync the inbox), one after another, until every row is trained; then it is killed. The first
   service processes SIGKILL themselves (then restart, as under systemd): after each call given
   by --kill-after (e.g. a rename, before its folder's fsync), then --kills times after a random
   call, so cuts also fall after a SIGKILL and the restart's recovery.
2. For each cut point k (seeded random ones, plus the windows of each phase: hand-over, ingest,
   round, checkpoint, promotion, finish, after-kill), build the tree a power cut before journal entry k could
   leave (crashsim.Model: "minimal" = only what fsyncs guarantee; "random:S" = a random legal
   mix), write it at the recorded paths, run `edgeft device watch --once --min-rows 1` until
   nothing is pending, predict once with the current generation, and audit (bench_watch.audit):

   rows handed   rows of files whose hand-over (the producer's fsync of the inbox) precedes k
   lost          handed, but neither trained nor pending, or trained in a generation that
                 state.json no longer records                                (must be 0)
   twice         trained in two rounds, or a round in two generations        (must be 0)
   foreign       trained rows that were never dropped                        (must be 0)
   errors        a recovery run that failed or raised, a prediction that did (must be 0)

    .venv/bin/python tools/bench_powerloss.py --bundle BUNDLE --files 12 --cuts 60 --per-phase 4 --kills 4 \
        --kill-after mkdir:inbox/.edgeft-ingesting --kill-after rename:state/learner/pending/0 \
        --kill-after rename:state/learner/round.json --kill-after rename:state/state.json \
        --out bench-results/watch-powerloss.json

The work folder defaults to /dev/shm (tmpfs): the simulation needs no real durability, and a
disk's fsyncs would be most of the time.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "tools"))
import bench_watch  # noqa: E402
import crashsim  # noqa: E402

QUICK = ["--settle", "0", "--max-steps", "2", "--tolerance", "1", "--nice", "0"]
PHASES = ("hand-over", "ingest", "round", "checkpoint", "promotion", "finish", "after-kill")
AFTER_KILL = 40  # journal entries after a SIGKILL (the restart's recovery) whose windows count as "after-kill"


def file_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def record(bundle: Path, work: Path, files: list[list[dict]], min_rows: int = 8, kills: int | list[str] = 0, kill_rate: float = 0.03,
           seed: int = 0, timeout: float = 900) -> Path:
    """Run the service under the recorder while the files are handed over; the journal's folder.
    With `kills` (a number, or a list of crashsim --kill-after OP:PATH), the first service
    processes SIGKILL themselves after a random journaled call (crashsim --kill-rate), or after
    the given one, and are restarted, as systemd would."""
    kills = ["random"] * kills if isinstance(kills, int) else list(kills)
    root, journal = work / "fs", work / "journal"
    inbox, state = root / "inbox", root / "state"
    inbox.mkdir(parents=True)
    crashsim.snapshot(journal, root)
    names = {f"f{i:04d}.jsonl": rows for i, rows in enumerate(files)}
    (journal / "files.json").write_text(json.dumps({"bundle": str(bundle), "root": str(root), "files": names}) + "\n")
    watch = ["-m", "edgeft", "device", "watch", "--bundle", str(bundle), "--state", str(state), "--inbox", str(inbox), "--min-rows", str(min_rows),
             "--interval", "0.05", "--log", str(work / "watch.log"), *QUICK]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "EDGEFT_DEBUG": "0",
           "EDGEFT_LOG_DIR": str(work)}  # an internal error's log stays with the run
    producer = crashsim.Journal(journal, root, who="producer")
    stderr = open(work / "watch.stderr", "ab")
    procs = []

    def start():
        how = kills[len(procs)] if len(procs) < len(kills) else None
        killing = [] if how is None else ["--kill-rate", str(kill_rate), "--seed", str(seed * 1000 + len(procs))] if how == "random" else ["--kill-after", how]
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tools" / "crashsim.py"), "--journal", str(journal), "--root", str(root),
                                       *killing, *watch], env=env, stdout=subprocess.DEVNULL, stderr=stderr))

    end = time.time() + timeout

    def wait(done, what):
        while not done():
            code = procs[-1].poll()
            if code == -signal.SIGKILL and len(procs) <= len(kills):
                start()  # it killed itself: restart
            elif code is not None:
                raise RuntimeError(f"the recorded watch exited (code {code}): {(work / 'watch.stderr').read_text()[-3000:]}")
            if time.time() > end:
                raise TimeoutError(f"recording: still waiting for {what}")
            time.sleep(0.02)
    start()
    try:
        for name, rows in names.items():
            crashsim.hand_over(producer, inbox, name, file_bytes(rows))
            wait(lambda: not (inbox / name).exists(), f"{name} to be taken")
        total = sum(len(r) for r in files)
        trained = lambda: sum(h["rows"] for h in bench_watch.events(state / "learner" / "history.jsonl"))  # noqa: E731
        wait(lambda: trained() + pending_rows(state) >= total and pending_rows(state) < min_rows and not (state / "learner" / "round.json").exists(),
             "the rows to be trained")
    finally:
        procs[-1].kill()
        procs[-1].wait()
        stderr.close()
    return journal


def pending_rows(state: Path) -> int:
    """Rows waiting in the live service's pending batches; a batch it finishes while we count is skipped,
    its rows are in a round or the history by the time the caller looks again."""
    rows = 0
    for p in (state / "learner" / "pending").glob("*.jsonl"):
        try:
            rows += len(p.read_text().splitlines())
        except FileNotFoundError:
            pass
    return rows


def phase(e: dict) -> str:
    by, path = e.get("by", ""), e.get("path") or e.get("dst") or ""
    if by == "producer":
        return "hand-over"
    if "watch.ingest" in by or "watch.process" in by or "move_aside" in by or "pending.add" in by:
        return "ingest"
    if path.startswith("state/job") or "open_job" in by or "save_checkpoint" in by:
        return "checkpoint"
    if "pending.finish" in by:
        return "finish"
    if "open_round" in by:
        return "round"
    if path.startswith(("state/state.json", "state/.state.json", "state/generations", "state/replay", "state/.replay")) or "add_generation" in by:
        return "promotion"
    return "other"


def choose_cuts(model: crashsim.Model, n_random: int, per_phase: int | dict, seed: int) -> dict[int, str]:
    """{cut: why}: seeded random cuts, and per phase (a number, or {phase: number}) some windows:
    just after a name change that no fsync covers yet, where a power cut can undo it. The first
    two windows after each SIGKILL are always taken (the restart acting on what the kill left)."""
    rng = random.Random(seed)
    n = len(model.entries)
    cuts = {k: "random" for k in rng.sample(range(1, n + 1), min(n_random, n))}
    windows, first_after_kill = {p: [] for p in PHASES}, []
    for g, (i, _, _) in enumerate(model.groups):
        at = model.persisted_at[g]
        if at is None or at > i + 1:
            after_kill = [kill for kill in model.kills if 0 < i - kill <= AFTER_KILL]
            windows.setdefault("after-kill" if after_kill else phase(model.entries[i]), []).append(i + 1)
            if after_kill and sum(after_kill[-1] < k - 1 for k in first_after_kill) < 2:
                first_after_kill.append(i + 1)
    cuts.update({k: "after-kill" for k in first_after_kill})
    for p in PHASES:
        n = per_phase.get(p, 0) if isinstance(per_phase, dict) else per_phase
        for k in rng.sample(windows[p], min(n, len(windows[p]))):
            cuts[k] = p
    return dict(sorted(cuts.items()))


def recover(bundle: Path, state: Path, inbox: Path, log: Path, runs: int = 5) -> dict:
    """`watch --once --min-rows 1` until nothing waits, then one prediction; {"runs", "error"}."""
    import traceback

    from click.testing import CliRunner

    from edgeft.cli import main
    from edgeft.device.learner import Learner

    args = ["device", "watch", "--bundle", str(bundle), "--state", str(state), "--inbox", str(inbox), "--once", "--min-rows", "1",
            "--log", str(log), *QUICK]
    for n in range(1, runs + 1):
        r = CliRunner().invoke(main, args)
        if r.exit_code != 0 or (r.exception is not None and not isinstance(r.exception, SystemExit)):
            tb = "".join(traceback.format_exception(*r.exc_info)) if r.exc_info and not isinstance(r.exception, SystemExit) else ""
            return {"runs": n, "error": f"exit {r.exit_code}: {r.output[-1500:]}{tb[-2500:]}"}
        s = json.loads(r.stdout)
        stage = inbox / ".edgeft-ingesting"
        if not s["pending_rows"] and s["round"] is None and not (stage.is_dir() and any(stage.iterdir())) and not list(inbox.glob("*.jsonl")):
            break
    else:
        return {"runs": runs, "error": f"still not drained after {runs} runs: {s}"}
    try:
        Learner(bundle, state).predict("i loved it")
    except Exception as e:  # noqa: BLE001  (counted: the state must load)
        return {"runs": n, "error": f"predict: {type(e).__name__}: {e}"}
    return {"runs": n, "error": None}


def check_cut(model: crashsim.Model, k: int, variant: str, meta: dict, bundle: Path, log: Path) -> dict:
    root = Path(meta["root"])
    state, inbox = root / "state", root / "inbox"
    crashsim.materialize(model.crash_state(k, variant), root)
    handed = [name for name, i in model.handed.items() if i < k]
    rows = lambda names: [r for name in names for r in meta["files"][name]]  # noqa: E731
    out = {"cut": k, "of": len(model.entries), "variant": variant, "volatile": len(model.volatile(k)), "files_handed": len(handed),
           "rows_handed": len(rows(handed)), **recover(bundle, state, inbox, log)}
    if out["error"] is None:
        mine, every = bench_watch.audit(state, inbox, rows(handed)), bench_watch.audit(state, inbox, rows(meta["files"]))
        out.update(rows_trained=mine["rows_trained"], rows_lost=mine["rows_lost"], rows_trained_twice=mine["rows_trained_twice"],
                   rounds_trained_twice=mine["rounds_trained_twice"], generations_without_history=mine["generations_without_history"],
                   history_without_generation=mine["history_without_generation"],
                   rows_foreign=every["rows_never_dropped"])
    out["ok"] = out["error"] is None and not any(out[c] for c in ("rows_lost", "rows_trained_twice", "rounds_trained_twice",
                                                                  "generations_without_history", "history_without_generation", "rows_foreign"))
    return out


def sweep(journal: Path, cuts: dict[int, str], random_variants: int, bundle: Path | None = None, say=print) -> dict:
    """Every cut in its "minimal" state, and the first `random_variants` random cuts also in one
    random legal state."""
    model = crashsim.Model(journal)
    meta = json.loads((journal / "files.json").read_text())
    bundle = Path(bundle or meta["bundle"])
    log = journal.parent / "recover.log"
    results, randoms = [], 0
    for k, why in cuts.items():
        randoms += why == "random"
        variants = ["minimal"] + ([f"random:{k}"] if why == "random" and randoms <= random_variants else [])
        for v in variants:
            r = {**check_cut(model, k, v, meta, bundle, log), "why": why, "phase": phase(model.entries[k - 1])}
            results.append(r)
            say(json.dumps({c: r.get(c) for c in ("cut", "why", "phase", "variant", "volatile", "rows_handed", "rows_trained", "rows_lost",
                                                  "rows_trained_twice", "runs", "ok")}) + ("" if r["error"] is None else f"\n  {r['error']}"))
    total = lambda c: sum(r.get(c) or 0 for r in results)  # noqa: E731
    return {"journal_entries": len(model.entries), "kills": len(model.kills), "killed_after": [phase(model.entries[i - 1]) for i in model.kills],
            "files": len(meta["files"]), "rows_dropped": sum(len(v) for v in meta["files"].values()),
            "cuts": len(cuts), "states": len(results), "by_phase": {p: sum(w == p for w in cuts.values()) for p in ("random", *PHASES)},
            "rows_handed": total("rows_handed"), "rows_trained": total("rows_trained"), "rows_lost": total("rows_lost"),
            "rows_trained_twice": total("rows_trained_twice"), "rounds_trained_twice": total("rounds_trained_twice"),
            "generations_without_history": total("generations_without_history"), "history_without_generation": total("history_without_generation"),
            "rows_foreign": total("rows_foreign"), "errors": sum(r["error"] is not None for r in results),
            "failed": [r for r in results if not r["ok"]]}


def make_files(n: int, seed: int, labels: list[str]) -> list[list[dict]]:
    """Distinct rows (a lost or doubled row shows), 3 to 6 per file, the labels in turn."""
    rng, files, start = random.Random(seed), [], 0
    words = ["i loved it", "terrible day", "great result", "sad movie"]
    for _ in range(n):
        k = rng.randint(3, 6)
        files.append([{"text": f"{words[i % 4]} {i}", "label": labels[i % len(labels)]} for i in range(start, start + k)])
        start += k
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path, help="A classify bundle (e.g. the tests' tiny one).")
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--min-rows", type=int, default=8)
    ap.add_argument("--cuts", type=int, default=60, help="Seeded random cut points (each also in one random legal state).")
    ap.add_argument("--per-phase", type=int, default=4, help="Cut points in the windows of each phase.")
    ap.add_argument("--kills", type=int, default=4, help="Service processes that SIGKILL themselves after a random call (then restart).")
    ap.add_argument("--kill-after", action="append", default=[], metavar="OP:PATH",
                    help="Before the random kills: a service process that SIGKILLs itself after this call (repeatable).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="Working folder (default: a temp folder).")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "watch-powerloss.json")
    args = ap.parse_args()
    from edgeft.bundle import read_manifest

    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-powerloss-", dir=shm))
    t0 = time.time()
    files = make_files(args.files, args.seed, read_manifest(args.bundle).labels)
    journal = record(args.bundle.resolve(), work, files, args.min_rows, args.kill_after + ["random"] * args.kills, seed=args.seed)
    t1 = time.time()
    model = crashsim.Model(journal)
    result = sweep(journal, choose_cuts(model, args.cuts, args.per_phase, args.seed), args.cuts, args.bundle.resolve())
    result.update(record_s=round(t1 - t0, 1), sweep_s=round(time.time() - t1, 1), seed=args.seed, work=str(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        if k != "failed":
            print(f"{k:>22}: {v}")
    print(f"{'failed':>22}: {len(result['failed'])}\nwritten to {args.out}")
    sys.exit(0 if not result["failed"] else 1)


if __name__ == "__main__":
    main()
