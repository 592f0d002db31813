"""`edgeft train` survives crashes: SIGKILL mid-run then --resume is bit-exact, swaps cut short
are settled, --overwrite keeps the old run until the new one has finished, runs can move."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run, write_jsonl
from edgeft.fsutil import atomic_dir, recover_swap
from edgeft.workstation.rundir import read_run_config, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """The killed process and the in-process runs must use the same thread count to compare bit for
    bit; one thread is also many times faster than two on a loaded 2-core machine (no spinning)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cls_data(tmp_path, sentiment_rows):
    return write_jsonl(tmp_path / "train.jsonl", sentiment_rows)


def train_args(model, data, out, *extra):
    # int8: a torch-only base, ~30 ms a step on the CPU (bitsandbytes NF4 is ~30x slower there)
    return ["train", "--model", model, "--data", data, "--task", "classify", "--out", out, "--batch-size", 4, "--quant", "int8",
            "--quiet", *extra]


def steps_of(run_dir: Path, key: str = "train_loss") -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- fsutil: the two-rename swap, cut short ------------------------------------------
def make_dir(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "f.txt").write_text(text)
    return path


def test_recover_swap_restores_old_when_new_never_landed(tmp_path):
    target = tmp_path / "run"
    make_dir(tmp_path / ".run.old", "old")  # killed after `run -> .run.old`, before `tmp -> run`
    make_dir(tmp_path / ".run.abcd_123.tmp", "half-written new")
    (tmp_path / ".run.x.abcd1234.tmp").mkdir()  # another folder's ("run.x") temp: not ours to touch
    assert "restored" in recover_swap(target)
    assert (target / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.x.abcd1234.tmp", "run"]
    assert recover_swap(target) is None  # nothing left to do


def test_recover_swap_drops_old_when_new_landed(tmp_path):
    target = make_dir(tmp_path / "run", "new")  # killed after `tmp -> run`, before `.run.old` was deleted
    make_dir(tmp_path / ".run.old", "old")
    (tmp_path / ".run.zzzzzzzz.tmp").write_text("a temp file of an atomic write")
    assert "removed" in recover_swap(target)
    assert (target / "f.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_dir_after_a_cut_swap_lands_the_new_folder(tmp_path):
    target = tmp_path / "run"
    make_dir(tmp_path / ".run.old", "old")
    with atomic_dir(target) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (target / "f.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_truncate_metrics_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "accuracy": 0.5}, {"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.9},
            {"step": 2, "accuracy": 0.6}, {"step": 3, "train_loss": 0.8}]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    path.write_text(text + '{"step": 4, "train_lo')  # a line torn by the kill
    assert truncate_metrics(path, 2) == 2
    assert path.read_text() == "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows[:4])
    assert truncate_metrics(path, 2) == 0


# -- a real process killed mid-run, then resumed ---------------------------------------
def test_sigkill_then_resume_is_bit_exact(tmp_path, cls_data, tiny_bert, monkeypatch):
    """Kill -9 a running `edgeft train` past a checkpoint; --resume (from another working directory)
    writes no duplicate rows and ends bit for bit where an uninterrupted run ends."""
    total, every = 150, 10
    args = ["--max-steps", total, "--checkpoint-every", every, "--eval-every", 10_000, "--no-eval-before", "--lr", 3e-3]
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeft", *map(str, train_args(tiny_bert, cls_data, killed, *args))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "training never got past its first checkpoints"
            steps = steps_of(killed) if (killed / "metrics.jsonl").exists() else []
            if steps and steps[-1] >= 2 * every + 3 and (killed / "checkpoint").is_dir():
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert 2 * every + 3 <= steps_of(killed)[-1] < total
    # rows past the checkpoint, and a torn line, as a kill at any moment can leave them
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 9999, "train_lo')

    reference = tmp_path / "reference"
    assert run(*train_args(tiny_bert, cls_data, reference, *args)).exit_code == 0

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = run("train", "--resume", killed, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert "dropped" in r.stderr
    assert steps_of(killed) == list(range(1, total + 1))
    assert steps_of(killed, "accuracy") == [total]

    def losses(d):
        return [r["train_loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]

    assert losses(killed) == losses(reference)
    assert_same_tensors(tensors(killed / "adapter/adapter_model.safetensors"), tensors(reference / "adapter/adapter_model.safetensors"))
    assert_same_tensors(tensors(killed / "checkpoint/trainable.safetensors"), tensors(reference / "checkpoint/trainable.safetensors"))
    assert_same_tensors(tensors(killed / "checkpoint/optimizer.safetensors"), tensors(reference / "checkpoint/optimizer.safetensors"))


# -- the run folder: interrupted swaps, --overwrite, relative paths -------------------
def test_resume_settles_swaps_cut_short(tmp_path, cls_data, tiny_bert, monkeypatch):
    out = tmp_path / "run"
    assert run(*train_args(tiny_bert, cls_data, out, "--max-steps", 2)).exit_code == 0
    # killed mid-swap three times over: the run folder, its checkpoint/ (new never landed), its adapter/ (new landed)
    (out / "checkpoint").rename(out / ".checkpoint.old")
    make_dir(out / ".checkpoint.abcdefgh.tmp", "half")
    shutil.copytree(out / "adapter", out / ".adapter.old")
    out.rename(tmp_path / ".run.old")
    monkeypatch.chdir(tmp_path.parent)
    r = run("train", "--resume", out, "--max-steps", 3, "--quiet")
    assert r.exit_code == 0, r.output
    assert steps_of(out) == [1, 2, 3]
    assert not (tmp_path / ".run.old").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(tmp_path, cls_data, tiny_bert, monkeypatch):
    from edgeft.errors import TrainingDiverged
    from edgeft.workstation import train as train_mod

    out = tmp_path / "run"
    assert run(*train_args(tiny_bert, cls_data, out, "--max-steps", 2)).exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_step = train_mod.Trainer.train_step
    seen = {}

    def failing(self, step):
        seen["work"] = self.out
        if step == 3:
            raise TrainingDiverged("the loss became nan at step 4", "lower --lr")
        return real_step(self, step)

    monkeypatch.setattr(train_mod.Trainer, "train_step", failing)
    r = run(*train_args(tiny_bert, cls_data, out, "--max-steps", 6, "--checkpoint-every", 1, "--overwrite"))
    assert r.exit_code == 13 and "unchanged" in r.output
    assert seen["work"] == tmp_path / ".run.new"
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.jsonl"]

    # interrupted (Ctrl-C) after a checkpoint: the new run waits beside the old one; --resume finishes and swaps it in
    def interrupted(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(train_mod.Trainer, "train_step", interrupted)
    r = run(*train_args(tiny_bert, cls_data, out, "--max-steps", 6, "--checkpoint-every", 1, "--overwrite", "--seed", 7))
    assert r.exit_code != 0 and (tmp_path / ".run.new/checkpoint").is_dir()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    r = run(*train_args(tiny_bert, cls_data, out, "--max-steps", 2))
    assert r.exit_code == 6 and "--resume" in r.output
    monkeypatch.setattr(train_mod.Trainer, "train_step", real_step)
    r = run("train", "--resume", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["run"] == str(out) and json.loads(r.stdout)["steps"] == 6
    assert json.loads((out / "config.json").read_text())["seed"] == 7 and steps_of(out) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.jsonl"]
    assert "edgeft run: run" in (out / "report.md").read_text()


def test_run_paths_are_relative_to_the_run_and_it_can_move(tmp_path, sentiment_rows, tiny_bert, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_bert, work / "models/bert")
    (work / "data").mkdir()
    write_jsonl(work / "data/train.jsonl", sentiment_rows)
    write_jsonl(work / "data/val.jsonl", sentiment_rows[::3])
    monkeypatch.chdir(work)
    r = run(*train_args("models/bert", "data/train.jsonl", "runs/a", "--eval-data", "data/val.jsonl", "--max-steps", 2, "--json"))
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["run"], s["adapter"]) == ("runs/a", "runs/a/adapter")
    stored = json.loads((work / "runs/a/config.json").read_text())
    assert (stored["model"], stored["data"], stored["eval_data"], stored["out"]) == ("../../models/bert", "../../data/train.jsonl", "../../data/val.jsonl", ".")
    assert str(tmp_path) not in json.dumps(s)

    moved = tmp_path / "moved"
    shutil.move(work, moved)
    monkeypatch.chdir(tmp_path)
    assert read_run_config(Path("moved/runs/a"))["eval_data"] == os.path.join("moved", "data", "val.jsonl")
    r = run("train", "--resume", "moved/runs/a", "--max-steps", 3, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == os.path.join("moved", "models", "bert")
    assert steps_of(moved / "runs/a") == [1, 2, 3]


def test_resume_republishes_a_best_the_crash_kept_from_adapter(tmp_path, cls_data, tiny_bert):
    """Killed between the checkpoint of a new best and publishing it: adapter/ lags; resume repairs it."""
    out = tmp_path / "run"
    assert run(*train_args(tiny_bert, cls_data, out, "--max-steps", 2, "--eval-every", 1, "--no-eval-before", "--lr", 0)).exit_code == 0
    state = json.loads((out / "checkpoint/state.json").read_text())["counters"]
    assert state["best_step"] == 1  # lr 0: step 2 is no better
    # as if the run died after step 1's checkpoint, before step 1's adapter
    ckpt1 = tmp_path / "ckpt1"
    shutil.copytree(out / "checkpoint", ckpt1)
    meta = json.loads((out / "adapter/edgeft.json").read_text())
    meta["step"] = None
    (out / "adapter/edgeft.json").write_text(json.dumps(meta))
    counters = {**state, "step": 1, "bad_evals": 0}
    full = json.loads((ckpt1 / "state.json").read_text())
    (ckpt1 / "state.json").write_text(json.dumps({**full, "counters": counters}))
    shutil.rmtree(out / "checkpoint")
    shutil.move(ckpt1, out / "checkpoint")
    r = run("train", "--resume", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert "brought up" in r.stderr
    assert json.loads((out / "adapter/edgeft.json").read_text())["step"] == 1
    assert steps_of(out) == [1, 2] and steps_of(out, "accuracy") == [1, 2]
