"""Fleet learning on Flower (edgeft/fleet/): aggregation and update checks on tiny arrays with known
answers, one device round and the server's screening on a tiny bundle, the commands' errors, and
(slow) a real Flower deployment on localhost: a SuperLink and four SuperNodes as separate processes,
the clients in the torch-free .venv-device, non-IID shards of the real tweets on the real MiniLM bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import device, run, write_jsonl

flwr = pytest.importorskip("flwr")  # the [fleet] extra

from edgeft.fleet.aggregate import aggregate, exact, fedavg, lora_pairs, product_error, refactor, stacked  # noqa: E402
from edgeft.fleet.validate import digest, problems  # noqa: E402

A, B, HEAD = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.classifier.modules_to_save.default.weight"


def adapter(a, b, head=0.0) -> dict:
    return {A: np.asarray(a, np.float32), B: np.asarray(b, np.float32), HEAD: np.full((2,), head, np.float32)}


# -- aggregation ------------------------------------------------------------------------------
def test_fedavg_is_not_the_mean_of_products_exact_is():
    # rank 1, 1x1: client 1 B=A=1 (B·A=1), client 2 B=A=3 (B·A=9). The mean update is 5;
    # averaging A and B separately gives 2·2 = 4.
    ads = [adapter([[1]], [[1]]), adapter([[3]], [[3]])]
    f, e = fedavg(ads, [1, 1]), exact(ads, [1, 1])
    assert (f[B] @ f[A]).item() == pytest.approx(4.0)
    assert (e[B] @ e[A]).item() == pytest.approx(5.0)
    assert product_error(f, ads, [1, 1]) == pytest.approx(0.2)  # |4 - 5| / 5
    assert product_error(e, ads, [1, 1]) == pytest.approx(0.0, abs=1e-7)


def test_weighted_by_samples():
    ads = [adapter([[1]], [[1]], head=0.0), adapter([[3]], [[3]], head=4.0)]
    e = exact(ads, [100, 300])
    assert (e[B] @ e[A]).item() == pytest.approx(0.25 * 1 + 0.75 * 9)
    assert e[HEAD].tolist() == pytest.approx([3.0, 3.0])
    assert fedavg(ads, [100, 300])[A].item() == pytest.approx(2.5)


def test_exact_reproduces_the_weighted_mean_of_products_when_it_fits_the_rank():
    rng = np.random.default_rng(0)
    r, out_dim, in_dim = 4, 12, 9
    ads = []
    for _ in range(2):  # each client's B·A has rank 2: the sum has rank <= 4 = r, representable exactly
        b = np.zeros((out_dim, r))
        b[:, :2] = rng.normal(size=(out_dim, 2))
        ads.append(adapter(rng.normal(size=(r, in_dim)), b, head=rng.normal()))
    w = [3, 1]
    e = exact(ads, w)
    want = 0.75 * ads[0][B] @ ads[0][A] + 0.25 * ads[1][B] @ ads[1][A]
    np.testing.assert_allclose(e[B] @ e[A], want, atol=1e-5)
    assert e[A].shape == (r, in_dim) and e[B].shape == (out_dim, r) and e[A].dtype == np.float32
    assert list(e) == list(ads[0])  # same tensors, same order


def test_exact_truncates_to_the_best_rank_r_and_balances_the_factors():
    rng = np.random.default_rng(1)
    ads = [adapter(rng.normal(size=(2, 8)), rng.normal(size=(10, 2))) for _ in range(3)]  # sum: rank 6 > r = 2
    e = exact(ads, [1, 1, 1])
    full = sum(ad[B].astype(np.float64) @ ad[A] for ad in ads) / 3
    s = np.linalg.svd(full, compute_uv=False)
    err = np.linalg.norm(e[B] @ e[A] - full) / np.linalg.norm(full)
    assert err == pytest.approx(np.sqrt((s[2:] ** 2).sum()) / np.linalg.norm(full), rel=1e-4)  # Eckart-Young
    np.testing.assert_allclose(e[B].T @ e[B], e[A] @ e[A].T, atol=1e-4)  # sqrt(S) on each side
    assert product_error(e, ads, [1, 1, 1]) < product_error(fedavg(ads, [1, 1, 1]), ads, [1, 1, 1])


def test_update_error_is_relative_to_what_the_round_changed():
    start = adapter([[2]], [[2]])  # B·A = 4
    ads = [adapter([[2]], [[2.5]]), adapter([[2]], [[1.5]])]  # 5 and 3: the mean product 4, the round moved nothing on average
    f = fedavg(ads, [1, 1])
    assert (f[B] @ f[A]).item() == pytest.approx(4.0)
    ads = [adapter([[1]], [[1]]), adapter([[3]], [[3]])]  # products 1 and 9, mean 5; fedavg gives 4; from start 4: moved by 1
    assert product_error(fedavg(ads, [1, 1]), ads, [1, 1], start) == pytest.approx(1.0)  # |4 - 5| / |5 - 4|
    assert product_error(exact(ads, [1, 1]), ads, [1, 1], start) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["exact", "fedavg"])
def test_server_step_extends_the_mean_step(method):
    start = adapter([[1]], [[1]], head=0.0)  # B·A = 1
    ads = [adapter([[1]], [[2]], head=1.0), adapter([[1]], [[4]], head=3.0)]  # B·A 2 and 4: the mean moved by 2, the head by 2
    one = aggregate(method, ads, [1, 1], start, 1.0)
    two = aggregate(method, ads, [1, 1], start, 2.0)
    assert (one[B] @ one[A]).item() == pytest.approx(3.0) and one[HEAD][0] == pytest.approx(2.0)
    assert (two[B] @ two[A]).item() == pytest.approx(5.0) and two[HEAD][0] == pytest.approx(4.0)  # 1 + 2 x 2, 0 + 2 x 2


def test_refactor_pads_a_layer_with_fewer_directions_than_the_rank():
    p, q = stacked([adapter([[1.0, 2.0]], [[3.0]])], np.array([1.0]), A, B)
    b, a = refactor(p, q, 3)
    assert b.shape == (1, 3) and a.shape == (3, 2)
    np.testing.assert_allclose(b @ a, [[3.0, 6.0]], atol=1e-6)


def test_lora_pairs_and_bad_weights():
    pairs, whole = lora_pairs([A, B, HEAD])
    assert list(pairs.values()) == [(A, B)] and whole == [HEAD]
    with pytest.raises(ValueError):
        aggregate("exact", [adapter([[1]], [[1]])], [0])
    with pytest.raises(ValueError):
        aggregate("mean", [adapter([[1]], [[1]])], [1])


# -- update checks ----------------------------------------------------------------------------
SHAPES = {A: (1, 1), B: (1, 1), HEAD: (2,)}
BASE = "sha256:" + "a" * 64


def meta_for(arrays, **over):
    return {"base_fingerprint": BASE, "num-examples": 10, "sha256": digest(arrays), "round": 1, "expected_round": 1, **over}


def test_a_good_update_passes():
    good = adapter([[1]], [[2]])
    assert problems(good, SHAPES, BASE, meta_for(good)) == []


@pytest.mark.parametrize("case, needle", [
    ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("shape", "not fp32 of the adapter's shape"), ("dtype", "not fp32"),
    ("base", "trained on base sha256:bbbb"), ("missing", "lacks 1"), ("extra", "does not train"), ("sha", "sha256 is not the one"),
    ("samples", "claims 0 samples"), ("round", "answers round 0"),
])
def test_a_bad_update_is_refused_with_its_reason(case, needle):
    arrays = adapter([[1]], [[2]])
    over = {}
    if case == "nan":
        arrays[A] = np.array([[np.nan]], np.float32)
    elif case == "inf":
        arrays[HEAD] = np.array([np.inf, 0], np.float32)
    elif case == "shape":
        arrays[B] = np.zeros((1, 2), np.float32)
    elif case == "dtype":
        arrays[B] = np.zeros((1, 1), np.float64)
    elif case == "base":
        over["base_fingerprint"] = "sha256:" + "b" * 64
    elif case == "missing":
        del arrays[HEAD]
    elif case == "extra":
        arrays["m.k.lora_A.default.weight"] = np.zeros((1, 1), np.float32)
    elif case == "samples":
        over["num-examples"] = 0
    elif case == "round":
        over["round"] = 0
    meta = meta_for(arrays, **over)
    if case == "sha":
        arrays[A] = arrays[A] + 1  # altered after the device hashed it
    reasons = problems(arrays, SHAPES, BASE, meta)
    assert any(needle in r for r in reasons), reasons


def test_digest_names_shapes_and_bytes():
    a = adapter([[1]], [[2]])
    assert digest(a) == digest({k: a[k].copy() for k in reversed(list(a))})
    assert digest(a) != digest({**a, A: np.array([[1.0000001]], np.float32)})
    assert digest({"x": np.zeros((2, 1), np.float32)}) != digest({"x": np.zeros((1, 2), np.float32)})


# -- a device round and the server's side, on a tiny bundle -------------------------------------
def test_device_round_trains_from_the_servers_adapter_and_returns_only_weights(tmp_path, cls_bundle):
    from edgeft.device.state import DeviceState
    from edgeft.bundle import read_manifest
    from edgeft.fleet.local import train_round

    m = read_manifest(cls_bundle)
    start = DeviceState(tmp_path / "st", cls_bundle, m).bundle_params()
    data = write_jsonl(tmp_path / "local.jsonl", [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("sad movie", "neg")] * 10])
    trained, meta = train_round(cls_bundle, data, tmp_path / "st", start, {"round": 1, "base_fingerprint": m.base.fingerprint, "max_steps": 3},
                                log=lambda _: None)
    assert set(trained) == set(start) and meta["steps"] == 3 and meta["num-examples"] == 18  # 20 rows, 10% held out
    assert meta["sha256"] == digest(trained) and meta["base_fingerprint"] == m.base.fingerprint
    assert any(not np.array_equal(trained[n], start[n]) for n in start)
    assert set(meta) >= {"round", "num-examples", "sha256", "base_fingerprint"} and "rows" not in meta
    state = json.loads((tmp_path / "st" / "state.json").read_text())
    assert [g.get("source") for g in state["generations"]][:2] == ["bundle", "fleet"]  # the server's adapter, then the trained one
    with pytest.raises(Exception, match="fleet's server trains base"):
        train_round(cls_bundle, data, tmp_path / "st", start, {"round": 2, "base_fingerprint": "sha256:" + "0" * 64, "max_steps": 1})


def test_schedule_span_places_each_round_in_one_schedule_over_the_run():
    from edgeft.fleet.local import schedule_span

    assert schedule_span({"schedule": "run", "rounds": 5, "max_steps": 30}, 1) == {"schedule_offset": 0, "schedule_total": 150}
    assert schedule_span({"schedule": "run", "rounds": 5, "max_steps": 30}, 4) == {"schedule_offset": 90, "schedule_total": 150}
    assert schedule_span({"schedule": "round", "rounds": 5, "max_steps": 30}, 4) == {}  # every round its own warmup and decay
    assert schedule_span({"max_steps": 30}, 2) == {}  # a server that sends no rounds (before 0.2)
    assert schedule_span({"schedule": "run", "rounds": 5, "max_steps": 30}, 6) == {}  # past the run: never a schedule it overruns


def test_fleet_rounds_continue_one_learning_rate_schedule(tmp_path, cls_bundle, monkeypatch):
    """Round 2 of 3 (3 steps each) takes steps 3..5 of one 9-step schedule: no second warmup, one decay."""
    import edgeft.device.trainer as trainer
    from edgeft.bundle import read_manifest
    from edgeft.device.state import DeviceState
    from edgeft.fleet.local import train_round
    from edgeft.schedule import lr_at

    seen = []
    monkeypatch.setattr(trainer, "lr_at", lambda step, total, *a: seen.append((step, total)) or lr_at(step, total, *a))
    m = read_manifest(cls_bundle)
    start = DeviceState(tmp_path / "st", cls_bundle, m).bundle_params()
    data = write_jsonl(tmp_path / "local.jsonl", [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("sad movie", "neg")] * 10])
    opts = {"base_fingerprint": m.base.fingerprint, "max_steps": 3, "rounds": 3, "lr": 1e-3}
    _, meta = train_round(cls_bundle, data, tmp_path / "st", start, {**opts, "round": 2, "schedule": "run"}, log=lambda _: None)
    assert seen == [(3, 9), (4, 9), (5, 9)] and meta["schedule_offset"] == 3
    seen.clear()
    train_round(cls_bundle, data, tmp_path / "st2", start, {**opts, "round": 2, "schedule": "round"}, log=lambda _: None)
    assert seen == [(0, 3), (1, 3), (2, 3)]  # the round's own schedule, warmup included
    assert lr_at(3, 9, 1e-3) > lr_at(2, 3, 1e-3)  # what the run schedule gives the round's last steps that the round schedule takes away


def test_fleet_rounds_carry_adamw_moments_only_within_a_run(tmp_path, cls_bundle, monkeypatch):
    import edgeft.device.backends as backends
    from safetensors.numpy import load_file
    from edgeft.bundle import read_manifest
    from edgeft.device.state import DeviceState
    from edgeft.fleet.local import MOMENTS, train_round

    loaded = []
    real = backends.AdamW.load_moments
    monkeypatch.setattr(backends.AdamW, "load_moments", lambda self, arrays, step: loaded.append((arrays, step)) or real(self, arrays, step))
    m = read_manifest(cls_bundle)
    st = tmp_path / "st"
    start = DeviceState(st, cls_bundle, m).bundle_params()
    data = write_jsonl(tmp_path / "local.jsonl", [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("sad movie", "neg")] * 10])
    opts = {"base_fingerprint": m.base.fingerprint, "max_steps": 3, "rounds": 3, "schedule": "run", "moments": "keep", "fleet_id": "run-a"}
    one, meta = train_round(cls_bundle, data, st, start, {**opts, "round": 1}, log=lambda _: None)
    assert not meta["moments_carried"] and not loaded and meta["best_step"] is None  # the round's last step, not a best checkpoint
    saved = load_file(str(st / MOMENTS))
    assert set(saved) == {"exp_avg", "exp_avg_sq"} and np.abs(saved["exp_avg_sq"]).sum() > 0
    two, meta = train_round(cls_bundle, data, st, one, {**opts, "round": 2}, log=lambda _: None)
    assert meta["moments_carried"] and len(loaded) == 1 and loaded[0][1] == 3  # round 1's moments and its 3 AdamW steps
    np.testing.assert_array_equal(loaded[0][0]["exp_avg"], saved["exp_avg"])
    # the same weights trained from zero moments land elsewhere: the moments change the round's steps
    fresh, _ = train_round(cls_bundle, data, tmp_path / "other", one, {**opts, "round": 2}, log=lambda _: None)
    assert any(not np.allclose(two[n], fresh[n]) for n in two)
    # another run, or a round that is not later than the one that saved them: from zero
    logs = []
    _, meta = train_round(cls_bundle, data, st, two, {**opts, "round": 3, "fleet_id": "run-b"}, log=logs.append)
    assert not meta["moments_carried"] and any("another fleet run" in line for line in logs)
    _, meta = train_round(cls_bundle, data, st, two, {**opts, "round": 1, "fleet_id": "run-b"}, log=logs.append)
    assert not meta["moments_carried"] and "from round 3" in logs[-1]
    # reset: nothing carried, nothing written
    _, meta = train_round(cls_bundle, data, tmp_path / "r", start, {**opts, "round": 2, "moments": "reset"}, log=lambda _: None)
    assert not meta["moments_carried"] and not (tmp_path / "r" / MOMENTS).exists()


def test_defaults_are_the_measured_ones():
    """BENCHMARKS.md section 11: one schedule over the run, AdamW's moments carried, A and B averaged
    (exact's SVD re-factoring moves every layer to a new basis each round, under the carried moments)."""
    from edgeft.fleet.cli import serve
    from edgeft.fleet.server import DEFAULTS

    options = {p.name: p.default for p in serve.params}
    assert (options["aggregation"], options["schedule"], options["moments"]) == ("fedavg", "run", "keep")
    assert (DEFAULTS["aggregation"], DEFAULTS["schedule"], DEFAULTS["moments"]) == ("fedavg", "run", "keep")


def test_moments_that_do_not_fit_the_bundle_are_refused_by_name(tmp_path, cls_bundle):
    from edgeft.device.state import save_arrays
    from edgeft.device.trainer import DeviceTrainConfig, DeviceTrainer
    from edgeft.errors import StateError

    data = write_jsonl(tmp_path / "local.jsonl", [{"text": "fine", "label": "pos"}] * 12)
    save_arrays(tmp_path / "m.safetensors", {"exp_avg": np.zeros(3, np.float32), "exp_avg_sq": np.zeros(3, np.float32)}, {"step": 4})
    t = DeviceTrainer(cls_bundle, tmp_path / "st", DeviceTrainConfig(data=str(data), max_steps=1, moments_in=str(tmp_path / "m.safetensors")),
                      log=lambda _: None, progress=False)
    with pytest.raises(StateError, match="moments do not fit"):
        t.run()
    with pytest.raises(Exception, match="run past the schedule"):
        DeviceTrainer(cls_bundle, tmp_path / "st", DeviceTrainConfig(data=str(data), max_steps=5, schedule_offset=8, schedule_total=10),
                      log=lambda _: None, progress=False).prepare_data()


def test_server_refuses_bad_replies_aggregates_the_rest_and_writes_an_update_devices_accept(tmp_path, cls_bundle):
    from edgeft.device.apply import check_update
    from edgeft.device.state import DeviceState
    from edgeft.fleet.server import Fleet

    fleet = Fleet(cls_bundle, tmp_path / "out", {"aggregation": "exact"}, log=lambda _: None)
    start = fleet.initial
    one = {n: v + np.float32(0.01) for n, v in start.items()}
    two = {n: v - np.float32(0.03) for n, v in start.items()}
    nan = {n: v.copy() for n, v in start.items()}
    first = sorted(nan)[0]
    nan[first][...] = np.nan
    fp = fleet.manifest.base.fingerprint
    reply = lambda node, arrays, n=10, base=fp: {"node": node, "arrays": arrays, "bytes_down": 8, "bytes_up": 8,  # noqa: E731
                                                 "meta": {"num-examples": n, "base_fingerprint": base, "sha256": digest(arrays), "round": 1}}
    replies = [reply(1, one, 30), reply(2, two, 10), reply(3, nan), reply(4, one, base="sha256:" + "f" * 64),
               {"node": 5, "error": "the device failed or dropped out: node unavailable"}]
    accepted = fleet.screen(1, replies)
    assert [r["node"] for r in accepted] == [1, 2]
    agg = fleet.aggregate(1, accepted)
    whole = [n for n in start if "lora" not in n]
    np.testing.assert_allclose(agg[whole[0]], start[whole[0]] + 0.75 * 0.01 - 0.25 * 0.03, atol=1e-6)  # weighted 30:10
    fleet.finish_round(1, agg)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    refused = {e["node"]: " ".join(e["reasons"]) for e in log if e["event"] == "reply" and not e["accepted"]}
    assert "NaN" in refused[3] and "trained on base" in refused[4] and "dropped out" in refused[5]
    assert [e["clients"] for e in log if e["event"] == "aggregate"] == [2]
    update = tmp_path / "out" / "rounds" / "r0001" / "update"
    _, _, weights = check_update(DeviceState(tmp_path / "dev", cls_bundle, fleet.manifest), update)  # what apply-update checks
    np.testing.assert_array_equal(weights[whole[0]], agg[whole[0]])
    r, out = device("apply-update", "--bundle", cls_bundle, "--state", tmp_path / "dev", update, "--json")
    assert r.exit_code == 0 and out["promoted"], r.output
    assert (tmp_path / "out" / "rounds" / "r0001" / "adapter" / "adapter_model.safetensors").is_file()


# -- the commands' errors ----------------------------------------------------------------------
def test_join_errors_are_one_clear_message(tmp_path, cls_bundle):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "great", "label": "pos"}] * 3)
    r, _ = device("fleet-join", "--bundle", tmp_path / "nope", "--data", data, "--server", "127.0.0.1:9", "--insecure")
    assert r.exit_code == 8 and "not an edgeft bundle" in r.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "great", "label": "thrilled"}])
    r, _ = device("fleet-join", "--bundle", cls_bundle, "--data", bad, "--server", "127.0.0.1:9", "--insecure")
    assert r.exit_code == 3 and "thrilled" in r.output
    r, _ = device("fleet-join", "--bundle", cls_bundle, "--data", data, "--server", "127.0.0.1:9", "--insecure")
    assert r.exit_code == 7 and "cannot reach the fleet server at 127.0.0.1:9" in r.output
    r, _ = device("fleet-join", "--bundle", cls_bundle, "--data", data, "--server", "nohost", "--insecure")
    assert r.exit_code == 2 and "HOST:PORT" in r.output
    assert "Traceback" not in r.output


def test_serve_errors_are_one_clear_message(tmp_path, cls_bundle):
    r = run("fleet", "serve", "--bundle", cls_bundle, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--insecure" in r.output  # neither TLS files nor --insecure
    r = run("fleet", "serve", "--bundle", tmp_path / "nope", "--out", tmp_path / "o", "--insecure")
    assert r.exit_code == 8
    r = run("fleet", "serve", "--bundle", cls_bundle, "--out", tmp_path / "o", "--insecure", "--eval-data", tmp_path / "missing.jsonl")
    assert r.exit_code == 3 and "missing.jsonl" in r.output
    r = run("fleet", "serve", "--bundle", cls_bundle, "--out", tmp_path / "o", "--insecure", "--fraction", "0")
    assert r.exit_code == 2


# -- a real deployment --------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
REAL_BUNDLE = ROOT / "runs" / "quickstart-sentiment.bundle"
TWEETS = ROOT / "assets" / "data" / "sentiment"
DEVICE_PY = ROOT / ".venv-device" / "bin" / "python"


def skewed_shards(folder: Path, per_label: int = 120) -> list[Path]:
    """Client k: 60% label k, 20% each other label (from the tweets' shard files)."""
    rows = [json.loads(line) for k in (1, 2, 3) for line in (TWEETS / f"shard{k}.jsonl").read_text().splitlines()]
    labels = ["negative", "neutral", "positive"]
    out = []
    for k, major in enumerate(labels):
        pick = []
        for label in labels:
            have = [r for r in rows if r["label"] == label][k * per_label:(k + 1) * per_label]
            pick += have[: (per_label if label == major else per_label // 3)]
        out.append(write_jsonl(folder / f"device{k}.jsonl", pick))
    return out


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (a device losing power)."""
    for p in descendants(proc.pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.skipif(not DEVICE_PY.is_file(), reason="needs .venv-device (tools/bootstrap-device)")
def test_tiny_flower_deployment_one_round(tmp_path, cls_bundle):
    """The whole Flower path in about a minute: `edgeft fleet serve` and three `edgeft device fleet-join`
    as separate processes (the devices in .venv-device), one round on the tiny bundle."""
    from edgeft.fleet.launch import wait_reachable

    r = subprocess.run([str(DEVICE_PY), "-c", "import flwr"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(".venv-device lacks the [fleet] extra")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = 9900 + os.getpid() % 90
    out = tmp_path / "fleet"
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": "i loved it", "label": "pos"}, {"text": "sad movie", "label": "neg"}] * 4)
    server = subprocess.Popen([sys.executable, "-m", "edgeft", "fleet", "serve", "--bundle", cls_bundle, "--out", out, "--rounds", "1",
                               "--steps", "2", "--min-clients", "3", "--round-timeout", "120", "--eval-data", held, "--port", str(port),
                               "--insecure", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    devices = []
    try:
        assert wait_reachable("127.0.0.1", port, 60, server), "the SuperLink did not start"
        for k, (a, b) in enumerate([("i loved it", "great result"), ("terrible day", "sad movie"), ("great result", "sad movie")]):
            data = write_jsonl(tmp_path / f"d{k}.jsonl", [{"text": a, "label": "pos" if "great" in a or "loved" in a else "neg"},
                                                          {"text": b, "label": "pos" if "great" in b else "neg"}] * 6)
            devices.append(subprocess.Popen([str(DEVICE_PY), "-m", "edgeft", "device", "fleet-join", "--bundle", cls_bundle, "--data", data,
                                             "--state", tmp_path / f"s{k}", "--name", f"d{k}", "--server", f"127.0.0.1:{port}", "--insecure"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True))
        stdout, stderr = server.communicate(timeout=300)
        assert server.returncode == 0, stderr[-3000:]
    finally:
        for p in devices:
            kill_tree(p)
        if server.poll() is None:
            kill_tree(server)
    summary = json.loads(stdout)
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["rounds"][1]["clients"] == 3
    replies = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"reply"' in line]
    assert sorted(e["device"] for e in replies if e["accepted"]) == ["d0", "d1", "d2"]
    assert all(e["bytes_up"] > 0 and e["bytes_up"] == e["bytes_down"] and e["samples"] == 11 for e in replies)  # 12 rows, 10% held out
    assert (out / "rounds" / "r0001" / "update" / "update.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_BUNDLE.is_dir() or not DEVICE_PY.is_file(), reason="needs runs/quickstart-sentiment.bundle (tools/quickstart) and .venv-device")
def test_real_flower_deployment_survives_a_dropout_a_bad_update_and_a_restart(tmp_path):
    r = subprocess.run([str(DEVICE_PY), "-c", "import flwr, edgeft.fleet.client, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        pytest.skip(f".venv-device lacks the [fleet] extra: {r.stderr[-200:]}")
    assert r.stdout.strip() == "False"  # the client side imports no torch
    shards = skewed_shards(tmp_path)
    port = 9400 + os.getpid() % 500
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "fleet"
    server = subprocess.Popen([sys.executable, "-m", "edgeft", "fleet", "serve", "--bundle", REAL_BUNDLE, "--out", out, "--rounds", "3",
                               "--steps", "3", "--min-clients", "3", "--round-timeout", "75", "--eval-data", TWEETS / "holdout.jsonl",
                               "--port", str(port), "--insecure", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)

    def join(k, fault=None):
        log = open(tmp_path / f"device{k}.log", "a")
        return subprocess.Popen([str(DEVICE_PY), "-m", "edgeft", "device", "fleet-join", "--bundle", REAL_BUNDLE, "--data",
                                 shards[k] if k < 3 else shards[0], "--state", tmp_path / f"state{k}", "--name", f"device{k}",
                                 "--server", f"127.0.0.1:{port}", "--insecure"], stdout=log, stderr=subprocess.STDOUT,
                                env={**env, **({"EDGEFT_FLEET_FAULT": fault} if fault else {})}, start_new_session=True)

    devices = {}
    try:
        from edgeft.fleet.launch import wait_reachable

        assert wait_reachable("127.0.0.1", port, 60, server), "the SuperLink did not start"
        devices = {k: join(k) for k in range(3)}
        devices[3] = join(3, fault="nan")  # a device gone wrong: its update holds NaN
        server_log = out / "server.log"
        deadline = time.monotonic() + 240
        while "round 2: sending" not in (server_log.read_text(errors="replace") if server_log.is_file() else ""):
            assert time.monotonic() < deadline and server.poll() is None, "round 2 never started"
            time.sleep(0.5)
        time.sleep(2)
        kill_tree(devices[2])  # device 2 dies mid-round
        devices[2] = join(2)  # and comes back (a new SuperNode, the same state folder)
        stdout, stderr = server.communicate(timeout=420)
        assert server.returncode == 0, stderr[-3000:]
    finally:
        for p in devices.values():
            kill_tree(p)
        if server.poll() is None:
            kill_tree(server)
    summary = json.loads(stdout)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    replies = [e for e in log if e["event"] == "reply"]
    by_round = {rnd: {e["device"] or e["node"]: e for e in replies if e["round"] == rnd} for rnd in (1, 2, 3)}
    # round 1: three honest devices accepted, the NaN one refused, with its reason
    assert sorted(d for d, e in by_round[1].items() if e["accepted"]) == ["device0", "device1", "device2"]
    assert not by_round[1]["device3"]["accepted"] and "NaN" in " ".join(by_round[1]["device3"]["reasons"])
    # round 2: device 2 was killed; the round completed with the other two
    assert sorted(d for d, e in by_round[2].items() if e["accepted"]) == ["device0", "device1"]
    # round 3: the restarted device 2 is back
    assert by_round[3]["device2"]["accepted"], by_round[3]
    # bytes per client per round: the adapter both ways (MiniLM r16: 0.68M fp32 parameters, 2.7 MB)
    for e in replies:
        if e["accepted"]:
            assert 2_600_000 < e["bytes_up"] < 2_900_000 and e["bytes_down"] == e["bytes_up"] and e["samples"] > 0
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and [r["clients"] for r in rounds[1:]] == [3, 2, 3]
    from safetensors.numpy import load_file

    start = load_file(str(REAL_BUNDLE / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "rounds" / "r0003" / "adapter" / "adapter_model.safetensors"))
    assert set(final) == set(start) and max(float(np.abs(final[k] - start[k]).max()) for k in start) > 1e-4  # the adapter changed
    assert 0.3 < rounds[-1]["heldout"]["accuracy"] <= 1.0 and (out / "rounds" / "r0003" / "update" / "update.json").is_file()
