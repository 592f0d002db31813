"""One definition of a training step for both halves: LR schedule, micro-batches, step count."""

import json
import math

import pytest

from conftest import device, write_jsonl
from edgeft import schedule
from edgeft.encode import batch_order, batches_per_epoch, micro_batch_ids


def ws_lrs(total, peak, name, ratio):
    from edgeft.workstation.train import TrainConfig, lr_at

    cfg = TrainConfig(model="m", data="d", task="classify", out="o", lr=peak, schedule=name, warmup_ratio=ratio)
    return [lr_at(s, total, cfg) for s in range(total)]


def device_lrs(total, peak, name, ratio):
    from edgeft.device import trainer

    return [trainer.lr_at(s, total, peak, name, ratio) for s in range(total)]


EDGES = [  # (total, warmup_ratio): no warmup, warmup rounding to 0, to 1 step, a half step, one step only, warmup >= total
    (10, 0.0), (10, 0.04), (10, 0.06), (10, 0.15), (10, 0.25), (1, 0.06), (1, 0.0), (1, 1.0), (4, 1.0), (4, 3.0), (100, 0.06), (7, 0.5),
]


@pytest.mark.parametrize("name", schedule.SCHEDULES)
@pytest.mark.parametrize("total, ratio", EDGES)
def test_device_lr_sequence_equals_workstation(name, total, ratio):
    assert device_lrs(total, 1e-3, name, ratio) == ws_lrs(total, 1e-3, name, ratio)


def test_warmup_edges_are_what_the_docs_say():
    assert schedule.warmup_steps(10, 0.0) == 0
    assert schedule.warmup_steps(10, 0.04) == 0  # 0.4 step rounds to none
    assert schedule.warmup_steps(10, 0.06) == 1  # 0.6 rounds to one
    assert schedule.warmup_steps(10, 0.25) == 3  # 2.5: halves round up
    assert schedule.warmup_steps(100, 0.06) == 6  # 0.06 * 100 is 6.000000000000001 in floats: still 6
    assert schedule.warmup_steps(4, 3.0) == 4  # never more than the run
    lr = 1.0
    # no warmup: the first step is at the peak and cosine decays from there
    assert ws_lrs(4, lr, "cosine", 0.0) == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    # one warmup step reaches the peak at once, then the decay starts over the remaining steps
    assert ws_lrs(3, lr, "linear", 0.34) == pytest.approx([1.0, 1.0, 0.5])
    # a single-step run trains at the peak, whatever the warmup
    for name in schedule.SCHEDULES:
        for ratio in (0.0, 0.06, 1.0, 5.0):
            assert ws_lrs(1, lr, name, ratio) == [1.0]
    # warmup covering the whole run: a linear ramp that reaches the peak on the last step
    assert ws_lrs(4, lr, "cosine", 1.0) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert ws_lrs(4, lr, "constant", 0.5) == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_default_schedule_is_edgeft_trains():
    from edgeft.workstation.train import TrainConfig

    cfg = TrainConfig(model="m", data="d", task="classify", out="o")
    assert schedule.DEFAULT == {"name": cfg.schedule, "warmup_ratio": cfg.warmup_ratio}


def test_micro_batches_one_rule():
    # 10 rows, batch 4: 3 micro-batches an epoch, the last one short; every row once per epoch
    assert batches_per_epoch(10, 4) == 3
    epoch0 = [micro_batch_ids(10, 4, seed=7, index=i) for i in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2] and sorted(sum(epoch0, [])) == list(range(10))
    assert micro_batch_ids(10, 4, 7, 3) == batch_order(10, 4, 7, epoch=1)[0]  # index 3 opens epoch 1
    # a shard smaller than one batch still trains (the device's case)
    assert batches_per_epoch(3, 4) == 1 and sorted(micro_batch_ids(3, 4, 0, 5)) == [0, 1, 2]
    # two processes: rounds of two micro-batches; the third (short) one cannot be dealt to both and waits
    assert batches_per_epoch(10, 4, world=2) == 1
    r0, r1 = micro_batch_ids(10, 4, 7, 0, world=2, rank=0), micro_batch_ids(10, 4, 7, 0, world=2, rank=1)
    assert r0 == epoch0[0] and r1 == epoch0[1]
    assert schedule.total_steps(3, 2, 1.0) == 2  # 3 micro-batches at grad_accum 2: 2 steps cover the epoch
    assert schedule.total_steps(3, 1, 0.1) == 1 and schedule.total_steps(10, 1, 0.3) == 3 and schedule.total_steps(5, 1, 2, max_steps=7) == 7


def test_both_trainers_batch_by_the_shared_rule(tmp_path, cls_bundle, monkeypatch):
    """The device trainer's micro-batches, step count and LRs come from the shared functions with the
    manifest's schedule; the workstation trainer's from the same functions (checked by source here,
    since its run is covered by test_train_cli)."""
    import inspect

    from edgeft.device import trainer
    from edgeft.workstation import train

    manifest = json.loads((cls_bundle / "manifest.json").read_text())
    assert manifest["schedule"] == schedule.DEFAULT  # cls_run trained with edgeft train's default schedule
    seen = []
    real = trainer.lr_at
    monkeypatch.setattr(trainer, "lr_at", lambda *a: seen.append(a) or real(*a))
    rows = [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("terrible day", "neg"), ("great result", "pos")]]
    r, s = device("train", "--bundle", cls_bundle, "--state", tmp_path / "state", "--data", write_jsonl(tmp_path / "d.jsonl", rows),
                  "--epochs", 2, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    # 3 rows, the manifest's batch of 2: 2 micro-batches an epoch (one short), 2 epochs -> 4 steps
    assert manifest["train_shape"]["batch"] == 2 and s["steps"] == 4
    assert [a[:2] for a in seen] == [(i, 4) for i in range(4)]
    assert {a[3:] for a in seen} == {(manifest["schedule"]["name"], manifest["schedule"]["warmup_ratio"])}
    assert "micro_batch_ids(" in inspect.getsource(train.Trainer.micro_batch) and "total_steps(" in inspect.getsource(train.Trainer.prepare_data)


def test_manifest_records_the_runs_schedule(tmp_path):
    from edgeft.workstation.export import _run_schedule

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "edgeft.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"schedule": "linear", "warmup_ratio": 0.2, "lr": 1e-3}))
    assert _run_schedule(run / "adapter") == {"name": "linear", "warmup_ratio": 0.2}
    (run / "config.json").write_text("not json")
    assert _run_schedule(run / "adapter") == schedule.DEFAULT
    # a PEFT adapter from another tool: no edgeft.json, so a config.json beside it is not a run's
    other = tmp_path / "peft" / "adapter"
    other.mkdir(parents=True)
    (other.parent / "config.json").write_text(json.dumps({"schedule": "constant", "warmup_ratio": 0.0}))
    assert _run_schedule(other) == schedule.DEFAULT
