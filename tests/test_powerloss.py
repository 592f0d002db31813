"""Power loss, simulated (tools/crashsim.py): what fsync made durable is all a cut keeps.

A real `edgeft device watch` (tiny bundle, real ONNX Runtime training) is recorded while a
producer hands files over; at many cut points the tree a power cut could leave is rebuilt, the
service recovers with `--once`, and every row handed over before the cut is counted.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path):
    """A folder on tmpfs when there is one: the simulation needs no real durability, and a real
    disk's fsyncs (about 7 ms each here) are most of a recovery's time."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="edgeft-powerloss-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tools():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_powerloss
        import crashsim
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return crashsim, bench_powerloss


def test_the_simulator_undoes_what_no_fsync_covers(tmp_path):
    """Three writers recorded in a subprocess, cut after the last call: one without the file's
    fsync (its name survives, its data not), one without the folder's fsync (its name is undone),
    one through fsutil (all kept); and a new folder's name needs its parent's fsync."""
    crashsim, _ = tools()
    root, journal = tmp_path / "root", tmp_path / "journal"
    (root / "d").mkdir(parents=True)
    (root / "e").mkdir()
    crashsim.snapshot(journal, root)
    code = f"""
import os
from pathlib import Path
from edgeft.fsutil import _fsync_dir, atomic_write_text
d, e = Path({str(root / 'd')!r}), Path({str(root / 'e')!r})  # e is never fsynced
d.joinpath("a.tmp").write_text("no file fsync")
os.replace(d / "a.tmp", d / "a")
_fsync_dir(d)
with open(e / "b.tmp", "w") as f:
    f.write("no folder fsync")
    f.flush()
    os.fsync(f.fileno())
os.replace(e / "b.tmp", e / "b")
atomic_write_text(d / "c", "all kept")
(e / "new").mkdir()
atomic_write_text(e / "new" / "x", "in a folder whose name is not durable")
(d / "new2").mkdir()
_fsync_dir(d)
atomic_write_text(d / "new2" / "y", "kept")
"""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "crashsim.py"), "--journal", str(journal), "--root", str(root), "-c", code],
                         capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    model = crashsim.Model(journal)
    end = len(model.entries)
    state = model.crash_state(end)
    assert state == {"d": None, "e": None, "d/a": b"", "d/c": b"all kept", "d/new2": None, "d/new2/y": b"kept"}, state
    assert model.crash_state(0) == {"d": None, "e": None}
    seen = {}
    for seed in range(40):  # a random legal state keeps some of the rest, never less than the minimum
        s = model.crash_state(end, f"random:{seed}")
        assert s["d/c"] == b"all kept" and s["d/new2/y"] == b"kept"
        for name in ("d/a", "e/b", "e/new/x"):
            seen.setdefault(name, set()).add(s.get(name))
    assert seen["e/b"] == {None, b"no folder fsync"} and b"no file fsync" in seen["d/a"] and len(seen["d/a"]) >= 3
    assert seen["e/new/x"] == {None, b"in a folder whose name is not durable"}
    crashsim.materialize(state, root)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["d", "d/a", "d/c", "d/new2", "d/new2/y", "e"]


# Each: the service SIGKILLs itself after this call, before the fsync of its folder (or parent).
KILLS = ["mkdir:inbox/.edgeft-ingesting", "rename:state/learner/pending/0", "rename:state/learner/round.json", "rename:state/state.json"]


def sweep(work, bundle, files, kills, cuts, per_phase, random_variants, seed):
    crashsim, bench = tools()
    journal = bench.record(bundle, work, bench.make_files(files, seed, ["neg", "pos"]), kills=kills, seed=seed)
    chosen = bench.choose_cuts(crashsim.Model(journal), cuts, per_phase, seed)
    result = bench.sweep(journal, chosen, random_variants, say=lambda m: None)
    failed = "\n".join(f"cut {r['cut']}/{r['of']} ({r['why']}, {r['variant']}): lost {r.get('rows_lost')}, twice {r.get('rows_trained_twice')}, "
                       f"history without generation {r.get('history_without_generation')}{'' if r['error'] is None else ', ' + r['error']}"
                       for r in result["failed"])
    assert not result["failed"], f"{len(result['failed'])} of {result['states']} crash states failed:\n{failed}"
    assert result["rows_lost"] == result["rows_trained_twice"] == result["rounds_trained_twice"] == result["rows_foreign"] == 0
    return result


def test_power_loss_at_any_cut_loses_and_doubles_no_row(work, cls_bundle):
    """20 seeded random cuts (2 of them also in a random legal state) and windows of each phase:
    the producer's hand-over, mid-ingest, opening a round, the training checkpoint, the promotion
    (weights, state.json), the round's bookkeeping; and after a SIGKILL that landed between a
    mkdir or a rename and its folder's fsync (the stage folder, a batch, round.json, state.json),
    while the restarted service goes on: a SIGKILL, then a power cut."""
    r = sweep(work, cls_bundle, files=6, kills=KILLS, cuts=20, random_variants=2, seed=14,
              per_phase={"hand-over": 1, "ingest": 1, "round": 1, "checkpoint": 1, "promotion": 1, "finish": 1, "after-kill": 1})
    assert r["kills"] == 4 and r["cuts"] >= 30 and r["rows_handed"] > 0 and r["rows_trained"] > 0
    assert all(r["by_phase"][p] >= 1 for p in ("hand-over", "ingest", "round", "checkpoint", "promotion", "finish", "after-kill")), r["by_phase"]


@pytest.mark.slow
def test_power_loss_sweep(work, cls_bundle):
    """tools/bench_powerloss.py's sweep: random SIGKILLs too, more files and cuts."""
    r = sweep(work, cls_bundle, files=12, kills=KILLS + ["random"] * 4, cuts=80, per_phase=6, random_variants=80, seed=3)
    assert r["cuts"] >= 100
