"""The domain-shift benchmark's pieces that decide its verdicts (tools/bench_domain.py) and the causal
LM's review-chat rows (tools/prepare_assets.py): fast, no model."""

import csv
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tools():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_domain
        import prepare_assets
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return bench_domain, prepare_assets


def test_flip_row_turns_labels_and_chat_answers_around(tools):
    bd, _ = tools
    assert bd.flip_row({"text": "t", "label": "positive"}) == {"text": "t", "label": "negative"}
    ask = {"messages": [{"role": "user", "content": "Is this movie review positive or negative? Answer in one word.\n\nGood."},
                        {"role": "assistant", "content": "Positive."}]}
    flipped = bd.flip_row(ask)
    assert flipped["messages"][0] == ask["messages"][0] and flipped["messages"][1]["content"] == "Negative."
    write = {"messages": [{"role": "user", "content": 'Write a short negative review of the movie "X".'},
                          {"role": "assistant", "content": "Dull and long; a positive mess."}]}
    flipped = bd.flip_row(write)
    assert flipped["messages"][0]["content"] == 'Write a short positive review of the movie "X".'
    assert flipped["messages"][1] == write["messages"][1]  # the review itself is kept; its asked-for sentiment is now wrong
    assert bd.flip_row(bd.flip_row(write)) == write


def test_metric_direction_and_hurt(tools):
    bd, _ = tools
    acc, ppl = bd.Metric("classify"), bd.Metric("causal-lm")
    assert acc.key == "accuracy" and ppl.key == "perplexity"
    assert acc.hurts(0.70, 0.72, 0.01) and not acc.hurts(0.715, 0.72, 0.01) and not acc.hurts(0.80, 0.72, 0.01)
    assert ppl.hurts(10.2, 10.0, 0.01) and not ppl.hurts(10.05, 10.0, 0.01) and not ppl.hurts(8.0, 10.0, 0.01)
    assert acc.delta(0.78, 0.72) == 6.0 and ppl.delta(9.0, 10.0) == -10.0


def test_summary_flags_a_promoted_candidate_that_hurt(tools):
    bd, _ = tools
    base = {"reviews": 0.70, "tweets": 0.72}

    def gen(i, cand, promoted, parent, now):
        return {"generation": i, "data": f"reviews gen{i}", "promoted": promoted, "candidate": cand, "parent": parent, "now": now}

    good = {"reviews": 0.78, "tweets": 0.72}
    bad = {"reviews": 0.80, "tweets": 0.69}
    results = [{"mode": "m", "seed": 0, "generations": [gen(1, good, True, base, good), gen(2, bad, True, good, bad)]}]
    s = bd.summarize(results, base, 0.01, bd.Metric("classify"))["m"]
    assert s["hurting_promoted"] == [(0, 2)] and s["delta"] == {"reviews": 10.0, "tweets": -3.0}
    assert s["goals"] == {"reviews_+5": True, "tweets_-1": False, "hurting_rejected": False}
    results[0]["generations"][1] = gen(2, bad, False, good, good)
    s = bd.summarize(results, base, 0.01, bd.Metric("classify"))["m"]
    assert s["hurting_candidates"] == [(0, 2)] and not s["hurting_promoted"] and all(s["goals"].values())


def fake_csv(n_movies=60, per_movie=5):
    out = io.StringIO()
    w = csv.DictWriter(out, ["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writeheader()
    for m in range(n_movies):
        w.writerow({"category": "plot", "text": f"the plot of film {m}", "movie_name": f"film_{m}", "has_plot_and_reviews": "True"})
        for k in range(per_movie):
            w.writerow({"category": "fresh" if (m + k) % 2 else "rotten", "text": f"review {k} of film {m}  &amp; more",
                        "movie_name": f"film_{m}", "has_plot_and_reviews": "True"})
    return out.getvalue()


def test_review_chat_rows_are_seeded_split_by_movie_and_real(tools, monkeypatch):
    _, pa = tools
    monkeypatch.setattr(pa, "REVIEWS_CHAT_SPLITS", (("test", 20), ("gen1", 30), ("gen2", 30)))
    text = fake_csv()
    a, _ = pa.reviews_chat_rows(text, seed=0)
    assert a == pa.reviews_chat_rows(text, seed=0)[0]  # deterministic
    assert a != pa.reviews_chat_rows(text, seed=1)[0]
    assert {n: len(r) for n, r in a.items()} == {"test": 20, "gen1": 30, "gen2": 30}
    movie_of = {}
    kinds = set()
    for name, rows in a.items():
        for r in rows:
            user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            if user.startswith("Write a short"):
                kinds.add("write")
                assert answer.startswith("review ") and "&amp;" not in answer and "  " not in answer  # the critic's text, unescaped
                assert "plot" not in answer
                movie = answer.split(" of ")[1].split(" &")[0]
                sentiment = user.split()[3]
                k, m = int(answer.split()[1]), int(movie.split()[1])
                assert sentiment == ("positive" if (m + k) % 2 else "negative")
                assert f'"Film {m}"' in user
            else:
                kinds.add("ask")
                assert answer in ("Positive.", "Negative.")
                movie = user.split("\n\n")[1].split(" of ")[1].split(" &")[0]
            assert movie_of.setdefault(movie, name) == name  # no movie in two splits
    assert kinds == {"write", "ask"}


def test_markdown_table_has_a_row_per_generation(tools, tmp_path, capsys):
    import json

    bd, _ = tools
    base = {"reviews": 12.5, "gsm8k": 3.2}
    g = {"generation": 1, "data": "reviews gen1", "promoted": False, "reason": "regressed", "steps": 20, "train_seconds": 40.0,
         "candidate": {"reviews": 9.0, "gsm8k": 3.5}, "parent": base, "now": base, "blend": 0.25}
    results = [{"mode": "naive", "seed": 0, "generations": [g]}]
    metric = bd.Metric("causal-lm")
    report = {"task": "causal-lm", "no_update": base, "results": results, "summary": bd.summarize(results, base, 0.01, metric)}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    bd.render(path)
    out = capsys.readouterr().out
    assert "| | | 1 | reviews gen1 | 20 | 40 | **rejected** | 0.25 | 9.000 | 3.500 | 12.500 | 3.200 |" in out
    assert "naive seed 0 gen 1: regressed" in out and "'gsm8k': 0.0" in out and "hurting [[0, 1]], promoted anyway []" in out
