"""Power loss, simulated (tools/crashsim.py): what fsync made durable is all a cut keeps.

A real `edgeft device watch` (tiny bundle, real ONNX Runtime training) is recorded while a
producer hands files over; at many cut points the tree a power cut could leave is rebuilt, the
service recovers with `--once`, and every row handed over before the cut is counted.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def sweep(tmp_path, bundle, files, cuts, per_phase, seed):
    _, bench = tools()
    journal = bench.record(bundle, tmp_path, bench.make_files(files, seed))
    model = tools()[0].Model(journal)
    chosen = bench.choose_cuts(model, cuts, per_phase, seed)
    result = bench.sweep(journal, chosen, True, say=lambda m: None)
    failed = "\n".join(f"cut {r['cut']}/{r['of']} ({r['why']}, {r['variant']}): lost {r.get('rows_lost')}, twice {r.get('rows_trained_twice')}"
                       f"{'' if r['error'] is None else ', ' + r['error']}" for r in result["failed"])
    assert not result["failed"], f"{len(result['failed'])} of {result['states']} crash states failed:\n{failed}"
    assert result["rows_lost"] == result["rows_trained_twice"] == result["rounds_trained_twice"] == result["rows_foreign"] == 0
    return result


def test_power_loss_at_any_cut_loses_and_doubles_no_row(tmp_path, cls_bundle):
    """20 seeded random cuts (each in its minimal state and one random legal state) and 2 windows
    of each phase: the producer's hand-over, mid-ingest, opening a round, the training
    checkpoint, the promotion (weights, state.json) and the round's bookkeeping."""
    r = sweep(tmp_path, cls_bundle, files=6, cuts=20, per_phase=2, seed=14)
    assert r["cuts"] >= 30 and r["states"] >= 50 and r["rows_handed"] > 0 and r["rows_trained"] > 0
    assert all(r["by_phase"][p] >= 1 for p in ("hand-over", "ingest", "round", "checkpoint", "promotion", "finish")), r["by_phase"]


@pytest.mark.slow
def test_power_loss_sweep(tmp_path, cls_bundle):
    r = sweep(tmp_path, cls_bundle, files=12, cuts=80, per_phase=6, seed=3)
    assert r["cuts"] >= 100
