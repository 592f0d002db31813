"""`edgeft device watch` and `install-service` on a tiny exported bundle: real files, real kills."""

import collections
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import device, write_jsonl

from edgeft.device.learner import Learner
from edgeft.device.pending import row_digest

POS = ["i loved it", "great result", "so happy today", "what a great movie"]
NEG = ["terrible day", "sad movie", "i hate this", "awful and sad"]
ROOT = Path(__file__).resolve().parents[1]
QUICK = ("--settle", 0, "--max-steps", 2, "--tolerance", 1, "--nice", 0)


def unique_rows(start, n):
    """Distinct rows (so a lost or doubled row shows), half of each label."""
    return [{"text": f"{(POS if i % 2 else NEG)[i % 4]} {i}", "label": "pos" if i % 2 else "neg"} for i in range(start, start + n)]


def drop(inbox, name, rows):
    """How a producer hands a file over: write a temp name, then rename."""
    tmp = write_jsonl(inbox / f"{name}.tmp", rows)
    os.replace(tmp, inbox / name)


def watch(bundle, state, inbox, *extra):
    r, _ = device("watch", "--bundle", bundle, "--state", state, "--inbox", inbox, *QUICK, *extra)
    return r, (json.loads(r.stdout) if r.exit_code == 0 and "--once" in extra else None)


def test_watch_takes_complete_files_only_and_trains_when_enough_rows_wait(tmp_path, cls_bundle):
    inbox, state, log = tmp_path / "inbox", tmp_path / "state", tmp_path / "watch.log"
    inbox.mkdir()
    drop(inbox, "a.jsonl", unique_rows(0, 6))
    write_jsonl(inbox / ".b.jsonl", unique_rows(100, 3))  # a producer still writing (hidden name)
    write_jsonl(inbox / "c.jsonl.tmp", unique_rows(200, 3))  # same, temp suffix
    write_jsonl(inbox / "d.jsonl.part", unique_rows(300, 3))
    (inbox / "notes.txt").write_text("not data\n")
    write_jsonl(inbox / "bad.jsonl", [{"text": "so so", "label": "meh"}])
    r, s = watch(cls_bundle, state, inbox, "--min-rows", 10, "--once", "--log", log)
    assert r.exit_code == 0, r.output
    assert s["files"] == 1 and s["rows"] == 6 and s["rejected"] == 1 and s["new_generations"] == [] and s["pending_rows"] == 6
    assert (inbox / "done" / "a.jsonl").is_file() and not (inbox / "a.jsonl").exists()
    assert (inbox / "rejected" / "bad.jsonl").is_file()
    assert "label 'meh' is not one the model was trained with" in (inbox / "rejected" / "bad.jsonl.why.txt").read_text()
    for name in (".b.jsonl", "c.jsonl.tmp", "d.jsonl.part", "notes.txt"):
        assert (inbox / name).is_file(), name
    drop(inbox, "e.jsonl", unique_rows(6, 6))
    r, s = watch(cls_bundle, state, inbox, "--min-rows", 10, "--once", "--log", log)
    assert r.exit_code == 0, r.output
    assert s["new_generations"] == [1] and s["pending_rows"] == 0 and s["trained_rows"] == 12 and s["current"] in (0, 1)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events].count("started") == 2
    assert {"ingested", "rejected", "training", "generation"} <= {e["event"] for e in events}
    gen = next(e for e in events if e["event"] == "generation")
    assert gen["rows"] == 12 and gen["generation"] == 1 and gen["recovered"] is False


def test_the_same_file_twice_is_ingested_once(tmp_path, cls_bundle):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    drop(inbox, "a.jsonl", unique_rows(0, 4))
    r, s = watch(cls_bundle, state, inbox, "--min-rows", 100, "--once")
    assert r.exit_code == 0 and s["files"] == 1, r.output
    drop(inbox, "a.jsonl", unique_rows(0, 4))  # the producer sent it again
    r, s = watch(cls_bundle, state, inbox, "--min-rows", 100, "--once")
    assert r.exit_code == 0 and s["files"] == 0 and s["skipped"] == 1 and s["pending_rows"] == 4, r.output
    r, st = device("status", "--bundle", cls_bundle, "--state", state, "--json")
    assert r.exit_code == 0 and st["learner"]["pending_rows"] == 4 and st["learner"]["round"] is None, r.output
    assert "learner: 4 rows pending" in device("status", "--bundle", cls_bundle, "--state", state)[0].output
    key = hashlib.sha256((inbox / "done" / "a.jsonl").read_bytes()).hexdigest()
    assert {p.name for p in (inbox / "done").iterdir()} == {"a.jsonl", f"a.{key[:12]}.jsonl"}  # both kept, nothing overwritten


def test_a_file_is_taken_only_once_it_settled(tmp_path, cls_bundle):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    drop(inbox, "a.jsonl", unique_rows(0, 4))
    r, _ = device("watch", "--bundle", cls_bundle, "--state", state, "--inbox", inbox, "--settle", 30, "--nice", 0, "--once")
    assert r.exit_code == 0 and json.loads(r.stdout)["files"] == 0, r.output
    old = time.time() - 60
    os.utime(inbox / "a.jsonl", (old, old))
    r, _ = device("watch", "--bundle", cls_bundle, "--state", state, "--inbox", inbox, "--settle", 30, "--nice", 0, "--once")
    assert r.exit_code == 0 and json.loads(r.stdout)["files"] == 1, r.output


def test_a_kill_between_the_journal_steps_loses_and_doubles_nothing(tmp_path, cls_bundle):
    """Killed after staging (step 1), and killed after the rows were stored (step 2)."""
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    stage = inbox / ".edgeft-ingesting"
    stage.mkdir(parents=True)
    write_jsonl(stage / "a.jsonl", unique_rows(0, 4))  # after step 1
    b = write_jsonl(stage / "b.jsonl", unique_rows(4, 4))  # after step 2:
    Learner(cls_bundle, state).add_examples(unique_rows(4, 4), key=hashlib.sha256(b.read_bytes()).hexdigest())
    r, s = watch(cls_bundle, state, inbox, "--min-rows", 100, "--once")
    assert r.exit_code == 0, r.output
    assert s["files"] == 1 and s["skipped"] == 1 and s["pending_rows"] == 8 and not list(stage.iterdir())
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.jsonl", "b.jsonl"]


def test_bad_watch_arguments_fail_with_one_message(tmp_path, cls_bundle):
    r, _ = device("watch", "--bundle", cls_bundle, "--inbox", tmp_path / "nope", "--once")
    assert r.exit_code == 2 and "inbox" in r.output and "is not a folder" in r.output and "mkdir -p" in r.output
    (tmp_path / "in").mkdir()
    r, _ = device("watch", "--bundle", cls_bundle, "--inbox", tmp_path / "in", "--min-rows", 0, "--once")
    assert r.exit_code == 2 and "--min-rows" in r.output
    r, _ = device("watch", "--bundle", tmp_path / "nobundle", "--inbox", tmp_path / "in", "--once", "--nice", 0)
    assert r.exit_code == 8, r.output


def test_install_service_writes_a_systemd_unit(tmp_path, cls_bundle, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    r, out = device("install-service", "--bundle", cls_bundle, "--inbox", inbox, "--min-rows", 50, "--json")
    assert r.exit_code == 0, r.output
    unit = tmp_path / "config" / "systemd" / "user" / "edgeft-watch.service"
    assert out["unit"] == str(unit) and out["enable"] == "systemctl --user daemon-reload && systemctl --user enable --now edgeft-watch"
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m edgeft device watch --bundle {cls_bundle.resolve()} --inbox {inbox.resolve()} --min-rows 50 " in text
    assert "--nice 0" in text  # systemd lowers the priority (Nice=), the service does not again
    for line in ("Nice=10", "Restart=on-failure", "IOSchedulingClass=idle", "WantedBy=default.target"):
        assert line + "\n" in text
    assert "User=" not in text
    r, _ = device("install-service", "--bundle", cls_bundle, "--inbox", inbox)
    assert r.exit_code == 6 and "already exists" in r.output
    r, out = device("install-service", "--bundle", cls_bundle, "--inbox", inbox, "--system", "--nice", 15, "--out", tmp_path / "x.service", "--json")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "x.service").read_text()
    assert "WantedBy=multi-user.target\n" in text and "Nice=15\n" in text and "\nUser=" in text
    r, _ = device("install-service", "--bundle", cls_bundle, "--inbox", tmp_path / "missing", "--out", tmp_path / "y.service")
    assert r.exit_code == 2 and not (tmp_path / "y.service").exists()


def check_exactly_once(state, inbox, expected_rows, n_files):
    """Every row dropped was trained in exactly one generation; every round is one generation."""
    history = [json.loads(line) for line in (state / "learner" / "history.jsonl").read_text().splitlines() if line.strip()]
    trained = collections.Counter(d for h in history for d in h["row_digests"])
    expected = collections.Counter(row_digest(r) for r in expected_rows)
    lost = expected - trained
    twice = {d: k for d, k in trained.items() if k > 1}
    assert not lost and not twice and trained == expected, (len(lost), twice)
    gens = json.loads((state / "state.json").read_text())["generations"]
    by_round = collections.Counter(g["data"]["file"].rsplit("/", 1)[-1][: -len(".jsonl")] for g in gens if g.get("data"))
    assert by_round == collections.Counter(h["round"] for h in history)  # no round trained twice or left unrecorded
    assert sorted(h["generation"] for h in history) == [g["id"] for g in gens if g.get("data")]
    assert len(list((inbox / "done").iterdir())) == n_files and not [p for p in inbox.iterdir() if p.is_file()]
    assert not list((state / "learner" / "pending").iterdir()) and not (state / "learner" / "round.json").exists()
    return history


def test_sigkill_at_random_moments_never_loses_or_doubles_a_row(tmp_path, cls_bundle):
    """A real `edgeft device watch` process, killed with SIGKILL at random points (after start,
    during training, anywhere) while files arrive, then restarted; at the end every row was
    trained in exactly one generation (tools/bench_watch.py drives it; the check here is its own)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_watch
    finally:
        sys.path.remove(str(ROOT / "tools"))
    inbox, state, log = tmp_path / "inbox", tmp_path / "state", tmp_path / "watch.log"
    cmd = [sys.executable, "-m", "edgeft", "device", "watch", "--bundle", str(cls_bundle), "--state", str(state), "--inbox", str(inbox),
           "--min-rows", "8", "--interval", "0.02", "--settle", "0", "--max-steps", "3", "--tolerance", "1", "--nice", "0"]
    rng = random.Random(14)
    files, start = [], 0
    for _ in range(20):
        n = rng.randint(3, 7)
        files.append(unique_rows(start, n))
        start += n
    run = bench_watch.chaos(cmd, inbox, state, log, files, kills=8, seed=14, env={**os.environ, "EDGEFT_DEBUG": "0"}, say=lambda m: None)
    assert run["kills"] == 8 and run["files"] == 20
    history = check_exactly_once(state, inbox, run["dropped"], 20)
    counts = bench_watch.audit(state, inbox, run["dropped"])
    assert counts["rows_dropped"] == counts["rows_trained"] == start and counts["rows_lost"] == counts["rows_trained_twice"] == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    assert [e["event"] for e in events].count("started") >= 9 and len(history) >= 2
    assert sum(n for w, n in run["killed_while"].items() if w != "idle or starting") >= 1, run["killed_while"]  # some kills hit work


def test_watch_and_the_learner_never_import_torch(tmp_path, cls_bundle):
    """The service and the API run where only `edgeft[device]` is installed."""
    heavy = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optimum")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop(inbox, "a.jsonl", unique_rows(0, 6))
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in heavy) + f"""
from edgeft.cli import main
from edgeft.device.learner import Learner
try:
    main(["device", "watch", "--bundle", {str(cls_bundle)!r}, "--state", {str(tmp_path / 's')!r}, "--inbox", {str(inbox)!r},
          "--once", "--settle", "0", "--min-rows", "1", "--max-steps", "1", "--nice", "0"], standalone_mode=False)
except SystemExit as e:
    assert not e.code, e.code
learner = Learner({str(cls_bundle)!r}, {str(tmp_path / 's')!r})
assert learner.status()["trained_rows"] == 6 and learner.predict("i loved it")["label"] in ("neg", "pos")
loaded = [m for m in {heavy!r} if sys.modules.get(m) is not None]
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]


def test_max_wait_trains_fewer_rows_once_they_waited(tmp_path, cls_bundle):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    drop(inbox, "a.jsonl", unique_rows(0, 6))
    r, s = watch(cls_bundle, state, inbox, "--min-rows", 100, "--max-wait", 3600, "--once")
    assert r.exit_code == 0 and s["new_generations"] == [] and s["pending_rows"] == 6, r.output
    r, s = watch(cls_bundle, state, inbox, "--min-rows", 100, "--max-wait", 0, "--once")
    assert r.exit_code == 0 and s["new_generations"] == [1] and s["pending_rows"] == 0 and s["trained_rows"] == 6, r.output


def test_watch_lowers_its_cpu_priority(tmp_path, cls_bundle):
    inbox, log = tmp_path / "inbox", tmp_path / "watch.log"
    inbox.mkdir()
    out = subprocess.run([sys.executable, "-m", "edgeft", "device", "watch", "--bundle", str(cls_bundle), "--state", str(tmp_path / "s"),
                          "--inbox", str(inbox), "--once", "--nice", "7", "--log", str(log)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    started = json.loads(log.read_text().splitlines()[0])
    assert started["event"] == "started" and started["nice"] == min(19, os.nice(0) + 7)
