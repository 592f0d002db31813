"""Learning without forgetting on the device (edgeft/device/rehearsal.py): replay rows mixed into the
batches at the configured share, check rows never trained on, a bounded replay store, the pull
toward the previous adapter, and resume with all of it."""

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import device, run, target, write_jsonl

POS = ["i loved it", "great result", "so happy today", "what a great movie", "happy and fine", "the movie was great"]
NEG = ["terrible day", "sad movie", "i hate this", "awful and sad", "this is terrible", "what a terrible movie"]


def rows(texts_pos, texts_neg, tag=""):
    return [{"text": f"{t}{tag}", "label": "pos"} for t in texts_pos] + [{"text": f"{t}{tag}", "label": "neg"} for t in texts_neg]


def reference_rows():
    """24 distinct rows, none of them in the new data below."""
    return rows(POS, NEG, " today") + rows(POS, NEG, " again")


def new_rows(tag, n=3):
    return [r for k in range(n) for r in rows(POS, NEG, f" {tag}{k}")]


@pytest.fixture(scope="module")
def ref_bundle(tmp_path_factory, cls_run):
    """The tiny classify bundle, exported with reference rows."""
    tmp = tmp_path_factory.mktemp("refb")
    ref = write_jsonl(tmp / "ref.jsonl", reference_rows())
    r = run("export", "--run", cls_run, "--target", target(tmp), "--out", tmp / "bundle", "--reference-data", ref)
    assert r.exit_code == 0, r.output
    return tmp / "bundle"


def trainer(bundle, state, data, **cfg):
    from edgeft.device.trainer import DeviceTrainConfig, DeviceTrainer

    t = DeviceTrainer(bundle, state, DeviceTrainConfig(data=str(data), **cfg), log=lambda m: None, progress=False)
    t.prepare_data()
    return t


# -- batch composition ----------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5])
def test_mixed_batches_have_the_configured_share_and_see_every_new_row(ratio):
    from edgeft.device.rehearsal import mixed_batch_ids, mixed_micro_batches

    n_new, n_replay, batch, seed = 37, 11, 4, 5
    batches = [mixed_batch_ids(n_new, n_replay, batch, ratio, seed, i) for i in range(60)]
    assert batches == [mixed_batch_ids(n_new, n_replay, batch, ratio, seed, i) for i in range(60)]  # a pure function of the index
    assert batches != [mixed_batch_ids(n_new, n_replay, batch, ratio, seed + 1, i) for i in range(60)]  # and of the seed
    for i in range(1, 61):
        replayed = sum(len(r) for _, r in batches[:i])
        assert abs(replayed - ratio * batch * i) < 1, (i, replayed)  # any prefix: the share to within one row
        assert all(len(n) + len(r) == batch for n, r in batches[:i])
    # the new rows come epoch by epoch: the first n_new of them are every new row once
    stream = [j for n, _ in batches for j in n]
    assert sorted(stream[:n_new]) == list(range(n_new)) and sorted(stream[n_new : 2 * n_new]) == list(range(n_new))
    assert all(0 <= j < n_replay for _, r in batches for j in r)
    # a generation lasts until every new row was seen `epochs` times, and no micro-batch longer
    m = mixed_micro_batches(n_new, batch, ratio, 1.0)
    seen = sum(len(n) for n, _ in batches[:m])
    assert seen >= n_new and seen - len(batches[m - 1][0]) < n_new


def test_trainer_batches_mix_replay_rows_at_the_configured_share(tmp_path, ref_bundle):
    """The batches the trainer really feeds: each row traced back to its text."""
    data = write_jsonl(tmp_path / "new.jsonl", new_rows("x"))
    t = trainer(ref_bundle, tmp_path / "state", data, replay_ratio=0.25)
    by_ids = {tuple(e.input_ids): r["text"] for r, e in zip(t.replay_rows["rehearsal"], t.replay_set)}
    new_texts = {r["text"] for r in t.train_rows}
    assert t.mixing and len(t.replay_set) == 12  # half of the 24 reference rows are rehearsed
    replayed = new = 0
    for i in range(t.total_steps):
        b = t.micro_batch(i, seed=1000)
        assert len(b["input_ids"]) == t.batch
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            key = tuple(int(x) for x, m in zip(ids, mask) if m)
            if key in by_ids:
                replayed += 1
            else:
                new += 1
    assert replayed == int(t.total_steps * t.batch * 0.25) and replayed > 0
    assert new >= len(new_texts)  # every new row once per epoch
    # --replay-ratio 0: the workstation's batching, no replay row at all
    t0 = trainer(ref_bundle, tmp_path / "state0", data, replay_ratio=0.0)
    assert not t0.mixing
    for i in range(t0.total_steps):
        b = t0.micro_batch(i, seed=1000)
        assert not any(tuple(int(x) for x, m in zip(ids, mask) if m) in by_ids for ids, mask in zip(b["input_ids"], b["attention_mask"]))


def test_generation_reports_what_it_replayed(tmp_path, ref_bundle):
    data = write_jsonl(tmp_path / "new.jsonl", new_rows("x"))
    r, s = device("train", "--bundle", ref_bundle, "--state", tmp_path / "state", "--data", data, "--replay-ratio", "0.5",
                  "--tolerance", "1", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    info = s["rehearsal"]
    assert info["replay_ratio"] == 0.5 and info["pool_rows"] == 12 and info["check_rows"] == {"reference": 12}
    assert info["replayed_rows"] == info["new_rows"] == s["steps"]  # batch 2: one replayed row and one new row each
    assert info["new_rows"] >= len(new_rows("x")) - round(0.1 * len(new_rows("x")))  # one epoch of the training part
    r, _ = device("train", "--bundle", ref_bundle, "--state", tmp_path / "s2", "--data", data, "--replay-ratio", "0.95", "--quiet")
    assert r.exit_code == 2 and "--replay-ratio" in r.output


# -- no leak ----------------------------------------------------------------------

def test_reference_split_is_deterministic_and_disjoint():
    from edgeft.device.rehearsal import row_key, split_reference

    ref = reference_rows()
    rehearse, check = split_reference(ref)
    assert len(check) == 12 and len(rehearse) == 12
    assert not {row_key(r) for r in rehearse} & {row_key(r) for r in check}
    assert sorted(map(row_key, rehearse + check)) == sorted(map(row_key, ref))
    shuffled = list(ref)
    random.Random(3).shuffle(shuffled)
    r2, c2 = split_reference(shuffled + shuffled[:5])  # order and duplicates change nothing about which rows check
    assert sorted(map(row_key, c2)) == sorted(map(row_key, check))
    assert not {row_key(r) for r in r2} & {row_key(r) for r in c2}
    # the split is by content: a row keeps its side when other rows join the file
    _, c3 = split_reference(ref + rows(["brand new"], ["all new"]))
    assert len({row_key(r) for r in check} & {row_key(r) for r in c3}) >= 11


def test_rows_that_decide_promotion_are_never_trained_on(tmp_path, ref_bundle):
    """Over two generations: the check rows (the bundle's check half, earlier generations' held-out rows)
    are disjoint from the rehearsal pool, even when the store holds a copy of a check row."""
    from edgeft.device.rehearsal import row_key

    state = tmp_path / "state"
    r, s = device("train", "--bundle", ref_bundle, "--state", state, "--data", write_jsonl(tmp_path / "a.jsonl", new_rows("a")),
                  "--tolerance", "1", "--json", "--quiet")
    assert r.exit_code == 0 and s["promoted"], r.output
    held = [json.loads(x) for x in (state / "replay-check.jsonl").read_text().splitlines()]
    assert held and not {row_key(r) for r in held} & {row_key(r) for r in [json.loads(x) for x in (state / "replay.jsonl").read_text().splitlines()]}
    # a copy of a check row slips into the replay store: it must not be rehearsed
    with open(state / "replay.jsonl", "a") as f:
        f.write(json.dumps(held[0]) + "\n")
    t = trainer(ref_bundle, state, write_jsonl(tmp_path / "b.jsonl", new_rows("b")))
    rehearse = {row_key(r) for r in t.replay_rows["rehearsal"]}
    checked = {row_key(r) for name in ("reference", "earlier") for r in t.replay_rows[name]}
    assert t.replay_rows["earlier"] and len(t.replay_rows["reference"]) == 12
    assert not rehearse & checked
    assert {n: len(v) for n, v in t.check_sets.items()} == {"reference": 12, "earlier": len(held)}
    r, s = device("train", "--bundle", ref_bundle, "--state", state, "--data", tmp_path / "b.jsonl", "--tolerance", "1", "--json", "--quiet")
    assert r.exit_code == 0 and set(s["metrics"]["candidate"]) == {"heldout", "reference", "earlier"}, r.output


def test_earlier_rows_that_are_this_generations_own_data_are_not_rehearsed(tmp_path, ref_bundle):
    """A fleet's rounds (or a rerun) train on the same file again: the rows earlier generations retained
    from it must not take the replay share, which is for what the generation does not train on."""
    from edgeft.bundle import read_manifest
    from edgeft.device.rehearsal import row_key
    from edgeft.device.state import DeviceState

    state = tmp_path / "state"
    state.mkdir()
    own, other = new_rows("a"), new_rows("z", 1)
    DeviceState(state, ref_bundle, read_manifest(ref_bundle)).retain(own + other, [], 0)
    t = trainer(ref_bundle, state, write_jsonl(tmp_path / "a.jsonl", own))
    rehearse = {row_key(r) for r in t.replay_rows["rehearsal"]}
    assert not rehearse & {row_key(r) for r in own}  # neither its training rows nor its held-out split
    assert {row_key(r) for r in other} <= rehearse  # earlier data it does not hold is still rehearsed
    assert len(t.replay_rows["rehearsal"]) == len(other) + 12  # and the reference rows' rehearsal half


# -- the replay store -------------------------------------------------------------

def test_replay_store_stays_within_its_cap_across_generations(tmp_path, ref_bundle, monkeypatch):
    from edgeft.device import state as state_mod

    monkeypatch.setattr(state_mod, "REPLAY_ROWS", 10)
    monkeypatch.setattr(state_mod, "REPLAY_BYTES", 600)
    state = tmp_path / "state"
    gens = {}
    for g in ("a", "b", "c"):
        data = write_jsonl(tmp_path / f"{g}.jsonl", new_rows(g, n=4))
        gens[g] = {r["text"] for r in new_rows(g, n=4)}
        r, s = device("train", "--bundle", ref_bundle, "--state", state, "--data", data, "--max-steps", 2, "--tolerance", "1", "--json", "--quiet")
        assert r.exit_code == 0 and s["promoted"], r.output
        for name in ("replay.jsonl", "replay-check.jsonl"):
            text = (state / name).read_text(encoding="utf-8")
            assert 0 < len(text.splitlines()) <= 10 and len(text.encode("utf-8")) <= 600, (name, len(text.splitlines()), len(text))
    kept = {json.loads(x)["text"] for x in (state / "replay.jsonl").read_text().splitlines()}
    assert sum(bool(kept & texts) for texts in gens.values()) >= 2  # a sample of every generation so far, not only the last
    # retaining the same rows again (a resumed job) changes nothing
    st = state_mod.DeviceState(state, ref_bundle, None)
    extra = [{"text": f"late row {i}", "label": "pos"} for i in range(30)]
    st.retain(extra, [], 0)
    after = (state / "replay.jsonl").read_bytes()
    st.retain(extra, [], 0)
    assert (state / "replay.jsonl").read_bytes() == after and len(after.splitlines()) <= 10 and len(after) <= 600


# -- the pull toward the previous adapter ------------------------------------------

def test_pull_to_previous_is_the_gradient_of_the_l2_term():
    from edgeft.device.rehearsal import pull_to_previous

    rng = np.random.default_rng(0)
    g, w, w0 = (rng.standard_normal(50).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(pull_to_previous(g, w, w0, 0.3), g + 0.3 * (w - w0), rtol=1e-6)
    assert pull_to_previous(g, w, None, 0.0) is g
    # numerically: d/dw of 0.15 * |w - w0|^2
    eps, i = 1e-3, 7
    f = lambda v: 0.15 * float(((v - w0).astype(np.float64) ** 2).sum())  # noqa: E731
    wp, wm = w.copy(), w.copy()
    wp[i] += eps
    wm[i] -= eps
    assert abs((f(wp) - f(wm)) / (2 * eps) - pull_to_previous(np.zeros_like(g), w, w0, 0.3)[i]) < 1e-3


def test_l2_previous_keeps_the_new_adapter_near_the_previous_one(tmp_path, ref_bundle):
    from safetensors.numpy import load_file

    from edgeft.device.cli import open_state

    data = write_jsonl(tmp_path / "new.jsonl", new_rows("x"))
    prev = open_state(ref_bundle, tmp_path / "unused").params(0)
    dist = {}
    for lam in ("0", "100"):
        state = tmp_path / f"l2-{lam}"
        r, s = device("train", "--bundle", ref_bundle, "--state", state, "--data", data, "--max-steps", 20, "--lr", "5e-3",
                      "--checkpoint-every", 20, "--l2-previous", lam, "--tolerance", "1", "--json", "--quiet")
        assert r.exit_code == 0 and s["rehearsal"]["l2_previous"] == float(lam), r.output
        new = load_file(str(state / "generations" / "g0001.safetensors"))
        dist[lam] = float(np.sqrt(sum(((new[k] - prev[k]) ** 2).sum() for k in prev)))
    assert dist["0"] > 0 and dist["100"] < 0.5 * dist["0"], dist


def test_freeze_head_trains_only_the_lora_matrices(tmp_path, ref_bundle):
    """--freeze-head: the classifier head (trained in full, not a LoRA matrix) stays bit for bit at the
    parent's values while the LoRA matrices move; without it the head moves too."""
    from safetensors.numpy import load_file

    from edgeft.bundle import read_manifest
    from edgeft.device.cli import open_state

    trainable = read_manifest(ref_bundle).trainable
    head = [n for n, key in trainable.items() if "lora_A" not in key and "lora_B" not in key]
    lora = [n for n in trainable if n not in head]
    assert head and lora
    data = write_jsonl(tmp_path / "new.jsonl", new_rows("x"))
    prev = open_state(ref_bundle, tmp_path / "unused").params(0)
    moved = {}
    for flag in ("--freeze-head", "--no-freeze-head"):
        state = tmp_path / flag.strip("-")
        r, s = device("train", "--bundle", ref_bundle, "--state", state, "--data", data, "--max-steps", 10, "--lr", "5e-3",
                      "--checkpoint-every", 10, flag, "--tolerance", "1", "--json", "--quiet")
        assert r.exit_code == 0 and s["rehearsal"]["freeze_head"] == (flag == "--freeze-head"), r.output
        new = load_file(str(state / "generations" / "g0001.safetensors"))
        moved[flag] = {n: float(np.abs(new[n] - prev[n]).max()) for n in trainable}
    assert all(moved["--freeze-head"][n] == 0.0 for n in head), moved["--freeze-head"]
    assert max(moved["--freeze-head"][n] for n in lora) > 0
    assert max(moved["--no-freeze-head"][n] for n in head) > 0


# -- resume ----------------------------------------------------------------------------

def _cmd(bundle, state, data, *extra):
    return [sys.executable, "-m", "edgeft", "device", "train", "--bundle", str(bundle), "--state", str(state), "--data", str(data),
            "--max-steps", "16", "--checkpoint-every", "2", "--tolerance", "1", "--quiet", "--json", *extra]


def test_killed_rehearsal_job_resumes_to_the_same_weights_even_if_the_store_changed(tmp_path, ref_bundle):
    """Generation 2 replays generation 1's rows. Killed after a checkpoint, and the replay store changed
    meanwhile (as when a kill lands after retaining), the rerun trains on the job's own snapshot of the
    replay rows and ends bit-identical to an uninterrupted run."""
    from safetensors.numpy import load_file

    first = write_jsonl(tmp_path / "a.jsonl", new_rows("a"))
    second = write_jsonl(tmp_path / "b.jsonl", new_rows("b", n=6))
    for name in ("clean", "killed"):
        out = subprocess.run(_cmd(ref_bundle, tmp_path / name, first), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and json.loads(out.stdout)["promoted"], out.stderr
    out = subprocess.run(_cmd(ref_bundle, tmp_path / "clean", second), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(ref_bundle, killed, second), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "job" / "last.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed / "replay.jsonl").write_text(json.dumps({"text": "a row that arrived later", "label": "pos"}) + "\n")
    out = subprocess.run(_cmd(ref_bundle, killed, second), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["resumed_at_step"] is not None and s["rehearsal"]["replay_ratio"] > 0
    a = load_file(str(tmp_path / "clean" / "generations" / "g0002.safetensors"))
    b = load_file(str(killed / "generations" / "g0002.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# -- the guard against generation 0 -------------------------------------------------

def test_guard_rejects_losses_that_add_up_across_generations():
    """Each step loses too little against its parent to be seen, but the sum against generation 0 is plain."""
    from types import SimpleNamespace

    from edgeft.device.trainer import DeviceTrainer

    owner = SimpleNamespace(task="classify", cfg=SimpleNamespace(tolerance=0.01, reference_loss_rise=0.05))
    origin = [True] * 40 + [False] * 10
    parent = [True] * 34 + [False] * 16      # 6 rows lost against the origin
    cand = [True] * 31 + [False] * 19        # 3 more: chance against the parent, 9 lost of 9 changed against the origin
    acc = lambda xs: {"accuracy": sum(xs) / len(xs), "eval_loss": 0.5}  # noqa: E731
    metrics = {"baseline": {"reference": acc(parent)}, "candidate": {"reference": acc(cand)}}
    rows = {("baseline", "reference"): parent, ("candidate", "reference"): cand, ("origin", "reference"): origin}
    ok, why = DeviceTrainer.decide(owner, metrics, rows)
    assert ok, why
    ok, why = DeviceTrainer.decide(owner, {**metrics, "origin": {"reference": acc(origin)}}, rows)
    assert not ok and "against the workstation" in why and "0.8000 -> 0.6200" in why


def test_second_generation_is_checked_against_generation_0_without_scoring_it_again(tmp_path, ref_bundle):
    state = tmp_path / "state"
    r, s1 = device("train", "--bundle", ref_bundle, "--state", state, "--data", write_jsonl(tmp_path / "a.jsonl", new_rows("a")),
                   "--tolerance", "1", "--json", "--quiet")
    assert r.exit_code == 0 and s1["promoted"] and "origin" not in s1["metrics"], r.output  # the parent is generation 0
    r, s2 = device("train", "--bundle", ref_bundle, "--state", state, "--data", write_jsonl(tmp_path / "b.jsonl", new_rows("b")),
                   "--tolerance", "1", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert list(s2["metrics"]["origin"]) == ["reference"]
    assert s2["metrics"]["origin"]["reference"] == s1["metrics"]["baseline"]["reference"]  # reused from generation 1's check
    assert s2["check"]["correct"]["origin"]["reference"] == s1["check"]["correct"]["baseline"]["reference"]
    assert s2["check"]["origin"] == 0
    r, _ = device("train", "--bundle", ref_bundle, "--state", state, "--data", tmp_path / "b.jsonl", "--tolerance", "1", "--quiet")
    assert r.exit_code == 0 and "reference against generation 0: accuracy" in r.output, r.output


def test_blend_promotes_the_weight_average_of_the_parent_and_the_trained_adapter(tmp_path, ref_bundle):
    from edgeft.device.rehearsal import blend
    from edgeft.device.state import load_arrays

    prev, new = {"a": np.array([1.0, 2.0], np.float32)}, {"a": np.array([3.0, -2.0], np.float32)}
    assert blend(prev, new, 0.25)["a"].tolist() == [1.5, 1.0] and blend(prev, new, 1) is new
    data = write_jsonl(tmp_path / "new.jsonl", new_rows("x"))
    gens = {}
    for b in ("1", "0.5"):
        r, s = device("train", "--bundle", ref_bundle, "--state", tmp_path / b, "--data", data, "--blend", b, "--tolerance", "1", "--json", "--quiet")
        assert r.exit_code == 0 and s["promoted"] and s["rehearsal"]["blend"] == float(b), r.output
        gens[b] = load_arrays(tmp_path / b / "generations" / "g0001.safetensors")
    from edgeft.device.learner import Learner

    parent = Learner(ref_bundle, tmp_path / "1", verify=False).state().params(0)
    assert set(gens["1"]) == set(parent)
    for k in parent:  # same seed, same batches: the blended generation is halfway between the parent and the trained adapter
        np.testing.assert_allclose(gens["0.5"][k], (parent[k] + gens["1"][k]) / 2, rtol=0, atol=1e-6)
    assert any(not np.allclose(gens["1"][k], parent[k]) for k in parent)
    r, _ = device("train", "--bundle", ref_bundle, "--state", tmp_path / "bad", "--data", data, "--blend", "0", "--quiet")
    assert r.exit_code == 2 and "--blend" in r.output


def test_the_origin_is_the_workstations_last_adapter_on_the_line():
    from types import SimpleNamespace

    from edgeft.device.state import DeviceState

    gens = {0: {"id": 0}, 1: {"id": 1, "parent": 0}, 2: {"id": 2, "parent": 1, "source": "update"}, 3: {"id": 3, "parent": 2},
            4: {"id": 4, "parent": 3}, 5: {"id": 5, "parent": 1}, 6: {"id": 6, "parent": 4, "source": "fleet"}, 7: {"id": 7, "parent": 6}}
    fake = SimpleNamespace(generation=gens.__getitem__)
    assert [DeviceState.origin(fake, g) for g in range(8)] == [0, 0, 2, 2, 2, 0, 6, 6]


def test_guard_rejects_a_classifier_whose_loss_on_earlier_rows_jumps():
    """Measured (BENCHMARKS.md section 10, seed 1): a flipped-label feed, blended, kept 128 rows' accuracy
    within chance but raised the loss on earlier generations' held-out reviews by 25%."""
    from types import SimpleNamespace

    from edgeft.device.trainer import DeviceTrainer

    owner = SimpleNamespace(task="classify", cfg=SimpleNamespace(tolerance=0.01, reference_loss_rise=0.05))
    before, after = [True] * 100 + [False] * 28, [True] * 97 + [False] * 31
    m = lambda acc, loss: {"accuracy": acc, "eval_loss": loss}  # noqa: E731
    rows = {("baseline", "earlier"): before, ("candidate", "earlier"): after}
    flipped = {"baseline": {"earlier": m(0.78125, 0.5287)}, "candidate": {"earlier": m(0.7578, 0.6610)}}
    ok, why = DeviceTrainer.decide(owner, flipped, rows)
    assert not ok and "earlier eval_loss 0.5287 -> 0.6610" in why
    learning = {"baseline": {"earlier": m(0.74, 0.5985)}, "candidate": {"earlier": m(0.79, 0.5579)}}
    assert DeviceTrainer.decide(owner, learning, {("baseline", "earlier"): after, ("candidate", "earlier"): before})[0]


def test_guard_rejects_a_classifier_whose_reference_loss_rises_against_the_origin():
    """Forgetting shows in the reference rows' loss before 128 rows' accuracy can tell it from chance."""
    from types import SimpleNamespace

    from edgeft.device.guard import REFERENCE_LOSS
    from edgeft.device.trainer import DeviceTrainer

    owner = SimpleNamespace(task="classify", cfg=SimpleNamespace(tolerance=0.01, reference_loss_rise=0.05))
    same = [True] * 90 + [False] * 38
    rows = {(side, "reference"): same for side in ("baseline", "candidate", "origin")}
    m = lambda loss: {"reference": {"accuracy": 0.7031, "eval_loss": loss}}  # noqa: E731
    rises = 0.6 * (1 + REFERENCE_LOSS) + 0.01
    ok, why = DeviceTrainer.decide(owner, {"baseline": m(0.6), "candidate": m(rises)}, rows)  # generation 1: the parent is the origin
    assert not ok and f"reference eval_loss 0.6000 -> {rises:.4f}" in why
    ok, why = DeviceTrainer.decide(owner, {"baseline": m(0.62), "origin": m(0.6), "candidate": m(rises)}, rows)
    assert not ok and "against the workstation's adapter" in why  # small against the parent, too much against the origin
    assert DeviceTrainer.decide(owner, {"baseline": m(0.6), "origin": m(0.6), "candidate": m(0.6 * (1 + REFERENCE_LOSS) - 0.01)}, rows)[0]
    assert why.endswith("(--reference-loss-rise sets how far it may rise)")  # the loss alone blocked it: say which knob moves it
    owner.cfg.reference_loss_rise = 0.25  # a device moving to a new domain, judged on accuracy
    assert DeviceTrainer.decide(owner, {"baseline": m(0.62), "origin": m(0.6), "candidate": m(0.6 * 1.24)}, rows)[0]
    assert not DeviceTrainer.decide(owner, {"baseline": m(0.62), "origin": m(0.6), "candidate": m(0.6 * 1.26)}, rows)[0]


def test_backoff_retries_a_smaller_blend_only_for_a_reference_regression():
    from types import SimpleNamespace

    from edgeft.device.trainer import DeviceTrainer

    owner = SimpleNamespace(task="classify", cfg=SimpleNamespace(tolerance=0.01, blend=0.5, blend_backoff=2, reference_loss_rise=0.05))
    prev, trained = {"a": np.zeros(2, np.float32)}, {"a": np.ones(2, np.float32)}
    same = [True] * 10
    rows = {(side, split): same for side in ("baseline", "candidate") for split in ("heldout", "reference")}
    m = lambda held, ref: {"heldout": {"accuracy": 1.0, "eval_loss": held}, "reference": {"accuracy": 1.0, "eval_loss": ref}}  # noqa: E731
    forgets = {"baseline": m(0.5, 0.5), "candidate": m(0.4, 0.6)}
    tried = [{"blend": 0.5}]
    retry = DeviceTrainer.backoff(owner, prev, trained, tried)
    assert retry(forgets, rows)["a"].tolist() == [0.25, 0.25]  # half the move
    assert retry(forgets, rows)["a"].tolist() == [0.125, 0.125]
    assert retry(forgets, rows) is None and [t["blend"] for t in tried] == [0.5, 0.25, 0.125]  # --blend-backoff 2: no more
    assert "reference eval_loss 0.5000 -> 0.6000" in tried[0]["regressed"][0]
    tried = [{"blend": 0.5}]
    ok = {"baseline": m(0.5, 0.5), "candidate": m(0.4, 0.5)}
    assert DeviceTrainer.backoff(owner, prev, trained, tried)(ok, rows) is None and tried == [{"blend": 0.5, "regressed": []}]
    tried = [{"blend": 0.5}]  # reference accuracy lost beyond chance: a wrong candidate, not too big a step
    rows_wrong = {**rows, ("candidate", "reference"): [False] * 10}
    wrong = {"baseline": m(0.5, 0.5), "candidate": {**m(0.4, 0.6), "reference": {"accuracy": 0.0, "eval_loss": 0.6}}}
    assert DeviceTrainer.backoff(owner, prev, trained, tried)(wrong, rows_wrong) is None and len(tried) == 1
    tried = [{"blend": 0.5}]
    rows_lost = {**rows, ("candidate", "heldout"): [False] * 10}  # the device's own rows got worse: the data, not the step
    bad = {"baseline": m(0.5, 0.5), "candidate": {**m(0.9, 0.6), "heldout": {"accuracy": 0.0, "eval_loss": 0.9}}}
    assert DeviceTrainer.backoff(owner, prev, trained, tried)(bad, rows_lost) is None and len(tried) == 1
