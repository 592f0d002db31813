"""The device Python API (edgeft.device.learner) on tiny exported bundles: real ONNX Runtime, real files."""

import json
import re
import threading
from pathlib import Path

import pytest

from conftest import device, write_jsonl

from edgeft.device.learner import Learner
from edgeft.device.pending import row_digest
from edgeft.errors import DataError, UsageError

POS = ["i loved it", "great result", "so happy today", "what a great movie"]
NEG = ["terrible day", "sad movie", "i hate this", "awful and sad"]


def rows(n=2):
    return [{"text": t, "label": "pos"} for t in POS * n] + [{"text": t, "label": "neg"} for t in NEG * n]


def test_add_examples_checks_rows_and_keeps_them_across_instances(tmp_path, cls_bundle):
    learner = Learner(cls_bundle, tmp_path / "state")
    with pytest.raises(DataError, match="label 'meh' is not one the model was trained with"):
        learner.add_examples([{"text": "fine", "label": "pos"}, {"text": "so so", "label": "meh"}])
    with pytest.raises(DataError, match="row 1: no field 'label'"):
        learner.add_examples([{"text": "fine"}])
    with pytest.raises(DataError, match="list of rows"):
        learner.add_examples({"text": "fine", "label": "pos"})
    assert learner.status()["pending_rows"] == 0  # a bad call adds nothing, not even its good rows
    out = learner.add_examples(rows(1))
    assert out["added"] == 8 and out["pending_rows"] == 8 and not out["duplicate"]
    again = Learner(cls_bundle, tmp_path / "state", verify=False)  # another process, after a restart
    assert again.status()["pending_rows"] == 8 and again.status()["current"] == 0
    assert again.add_examples(rows(1), key="abc")["added"] == 8
    assert again.add_examples(rows(1), key="abc") == {**again.add_examples(rows(1), key="abc"), "added": 0, "duplicate": True}
    assert again.status()["pending_rows"] == 16


def test_update_trains_each_pending_row_once(tmp_path, cls_bundle):
    learner = Learner(cls_bundle, tmp_path / "state")
    assert learner.update(min_rows=1) is None  # nothing pending
    other = Learner(cls_bundle, tmp_path / "other", verify=False)
    other.add_examples(rows(1)[:1])
    with pytest.raises(UsageError, match="unknown training option.*max_stepz"):
        other.update(max_stepz=3)
    assert other.status()["round"] is None and other.status()["pending_rows"] == 1  # nothing committed
    learner.add_examples(rows(1))
    assert learner.update(min_rows=9) is None and learner.status()["pending_rows"] == 8  # not enough yet
    learner.add_examples(rows(1)[:2])
    s = learner.update(min_rows=9, max_steps=3, tolerance=1)
    assert s["generation"] == 1 and s["rows"] == 10 and s["steps"] == 3 and s["promoted"] and not s["recovered"]
    st = learner.status()
    assert st["current"] == 1 and st["pending_rows"] == 0 and st["round"] is None and st["trained_rows"] == 10
    g = learner.state().generation(1)
    assert g["data"]["rows"] == 10 and g["data"]["file"].endswith(f"{s['round']}.jsonl")
    assert learner.update(min_rows=1) is None  # consumed: nothing to train twice
    history = learner.store.history()
    assert len(history) == 1 and history[0]["generation"] == 1 and len(history[0]["row_digests"]) == 10
    assert not list((tmp_path / "state" / "learner" / "pending").iterdir()) and not list((tmp_path / "state" / "learner" / "rounds").iterdir())


def test_a_round_trained_before_a_kill_is_only_bookkept(tmp_path, cls_bundle):
    """Killed after state.json recorded the generation but before the rows were consumed: the
    next update consumes them and trains nothing (no generation 2, no row trained twice)."""
    learner = Learner(cls_bundle, tmp_path / "state")
    learner.add_examples(rows(1))
    with learner.store.lock():
        r = learner.store.open_round(1, {"max_steps": 2, "tolerance": 1})
    learner.train(r["data"], **r["options"])  # the generation is recorded; finish() never ran
    assert learner.status()["round"]["rows"] == 8
    restarted = Learner(cls_bundle, tmp_path / "state", verify=False)
    s = restarted.update(min_rows=1, max_steps=50)
    assert s["recovered"] and s["generation"] == 1 and s["rows"] == 8
    assert [g["id"] for g in restarted.state().data["generations"]] == [0, 1]
    assert restarted.status()["pending_rows"] == 0 and restarted.status()["trained_rows"] == 8


def test_an_interrupted_round_resumes_with_its_own_options(tmp_path, cls_bundle):
    """A round created but not trained (killed at once) keeps its rows and options; rows added
    meanwhile wait for the next round."""
    learner = Learner(cls_bundle, tmp_path / "state")
    learner.add_examples(rows(1))
    with learner.store.lock():
        learner.store.open_round(1, {"max_steps": 2, "tolerance": 1})
    learner.add_examples(rows(1)[:3])
    s = learner.update(min_rows=100, max_steps=7)  # resumes the round despite min_rows, with max_steps 2
    assert s["steps"] == 2 and s["rows"] == 8 and learner.status()["pending_rows"] == 3
    s = learner.update(min_rows=1, max_steps=2, tolerance=1)
    assert s["generation"] == 2 and s["rows"] == 3 and learner.status()["trained_rows"] == 11


def test_feedback_a_corrected_prediction_trains_the_next_generation(tmp_path, cls_bundle):
    """The README's feedback flow: predict, the user corrects the label, update."""
    learner = Learner(cls_bundle, tmp_path / "state")
    p = learner.predict("what a great movie")
    assert set(p["probabilities"]) == {"neg", "pos"} and p["label"] in ("neg", "pos")
    corrected = "neg" if p["label"] == "pos" else "pos"
    before = p["probabilities"][corrected]
    learner.add_examples([{"text": p["text"], "label": corrected}] * 16)  # the user insists
    s = learner.update(max_steps=12, lr=5e-3, replay_ratio=0.0, tolerance=1)
    assert s["promoted"] and learner.status()["current"] == 1
    assert learner.store.history()[0]["row_digests"] == [row_digest({"text": p["text"], "label": corrected})] * 16
    after = learner.predict(p["text"])["probabilities"][corrected]
    assert after > before + 0.05, (before, after)
    assert learner.predict([p["text"]], generation=0)[0]["probabilities"][corrected] == pytest.approx(before, abs=1e-6)


def test_one_thread_predicts_while_another_updates(tmp_path, cls_bundle):
    """Every prediction is the old generation's or the new one's, never an error or a mix; after
    the update the learner serves the promoted generation."""
    learner = Learner(cls_bundle, tmp_path / "state")
    text = ["i loved it", "sad movie"]
    old = learner.predict(text)
    learner.add_examples(rows(2))
    seen, errors, stop = [], [], threading.Event()

    def predict_loop():
        while not stop.is_set():
            try:
                seen.append(json.dumps(learner.predict(text), sort_keys=True))
            except Exception as e:  # noqa: BLE001  (any failure fails the test below)
                errors.append(repr(e))

    t = threading.Thread(target=predict_loop)
    t.start()
    try:
        s = learner.update(max_steps=6, lr=5e-3, tolerance=1)
    finally:
        stop.set()
        t.join()
    assert s["promoted"] and not errors
    new = learner.predict(text)
    assert new != old and learner.model() is learner.model()  # cached until the state changes
    allowed = {json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True)}
    assert len(seen) > 3 and set(seen) <= allowed and seen[-1] == json.dumps(new, sort_keys=True)


def test_another_process_promoting_is_picked_up(tmp_path, cls_bundle):
    """An app's Learner follows what the watch service or `device rollback` did to the state."""
    app = Learner(cls_bundle, tmp_path / "state")
    gen0 = app.predict("i loved it")
    service = Learner(cls_bundle, tmp_path / "state", verify=False)
    service.add_examples(rows(2))
    service.update(max_steps=6, lr=5e-3, tolerance=1)
    assert app.predict("i loved it") != gen0 and app.refresh() == 1
    r, _ = device("rollback", "0", "--bundle", cls_bundle, "--state", tmp_path / "state")
    assert r.exit_code == 0, r.output
    assert app.predict("i loved it") == gen0


def test_causal_lm_generates_and_learns_from_examples(tmp_path, lm_bundle, chat_rows):
    learner = Learner(lm_bundle, tmp_path / "state")
    out = learner.generate("what is two plus two?", max_new_tokens=3)
    assert set(out) == {"prompt", "completion", "tokens"} and 0 <= out["tokens"] <= 3
    with pytest.raises(UsageError, match="predict is for classify bundles"):
        learner.predict("hi")
    with pytest.raises(UsageError, match="--top-p"):
        learner.generate("hi", top_p=0)
    with pytest.raises(DataError, match="not a recognised row shape"):
        learner.add_examples([{"question": "?"}])
    learner.add_examples(chat_rows)
    s = learner.update(max_steps=3, tolerance=10)
    assert s["generation"] == 1 and s["rows"] == len(chat_rows)
    assert learner.evaluate(write_jsonl(tmp_path / "held.jsonl", chat_rows[:3]))["generation"] == learner.status()["current"]


def test_the_readme_example_runs(tmp_path, cls_bundle, capsys):
    """README's Python API example, on the tiny bundle (its labels are neg/pos)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(from edgeft.device.learner import Learner\n.*?)```", readme, re.S).group(1)
    code = code.replace("runs/quickstart-sentiment.bundle", str(cls_bundle)).replace("/tmp/app-state", str(tmp_path / "state"))
    exec(compile(code.replace('"negative"', '"neg"'), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] in ("neg", "pos") and lines[1] == "1" and lines[2].startswith("1 ")
    assert Learner(cls_bundle, tmp_path / "state", verify=False).status()["trained_rows"] == 1
