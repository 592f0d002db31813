"""Data parsing and validation: real files on disk, every error names file, line and fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.datasets import label_names, load_causal, load_classify, read_records, split
from edgeft.errors import DataError


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def data_error(fn, *args) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args)
    assert info.value.hint, "every DataError carries a hint"
    return info.value


# -- happy paths ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json-lines", ".ndjson", ".JSONL"])
def test_jsonl_skips_blank_lines(tmp_path, suffix):
    path = write(tmp_path, f"d{suffix}", '{"text": "a", "label": 1}\n\n   \n{"text": "b", "label": 0}\r\n')
    assert read_records(path) == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]


def test_classify_jsonl_converts_labels_to_str(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a", "label": 1}, {"text": "b", "label": True}, {"text": "c", "label": " pos "},
                                           {"text": "d", "label": 2.0}, {"text": "e", "label": False}))
    texts, labels = load_classify(path)
    assert texts == ["a", "b", "c", "d", "e"]
    assert labels == ["1", "1", "pos", "2", "0"]


def test_classify_csv_custom_fields_and_bom(tmp_path):
    path = write(tmp_path, "d.csv", b"\xef\xbb\xbfsentence, y\n\"hello, world\",pos\n\n\"two\nlines\",neg\n")
    assert read_records(path) == [{"sentence": "hello, world", "y": "pos"}, {"sentence": "two\nlines", "y": "neg"}]
    assert load_classify(path, "sentence", "y") == (["hello, world", "two\nlines"], ["pos", "neg"])


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, 1, None]}), path)
    assert read_records(path)[0] == {"text": "a", "label": 0}
    err = data_error(load_classify, path)
    assert "row 3" in str(err) and "'label' is null" in str(err)


def test_label_names_order():
    assert label_names(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_names(["pos", "neg", "pos", "10"]) == ["10", "neg", "pos"]


def test_load_causal_normalises_shapes(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl(
        {"messages": [{"role": "system", "content": "s", "name": "x"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 1},
        {"prompt": "p", "completion": "c", "extra": 3},
        {"text": "t", "source": "web"},
        {"messages": [{"role": "user", "content": "q"}], "text": "ignored"},
    ))
    assert load_causal(path) == [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "p", "completion": "c"},
        {"text": "t"},
        {"messages": [{"role": "user", "content": "q"}]},
    ]


def test_load_causal_csv(tmp_path):
    path = write(tmp_path, "d.csv", "prompt,completion\nhi,there\n")
    assert load_causal(path) == [{"prompt": "hi", "completion": "there"}]


def test_split_is_seeded_and_complete():
    rows = list(range(20))
    train, val = split(rows, 0.2, seed=7)
    assert len(val) == 4 and sorted(train + val) == rows
    assert split(rows, 0.2, seed=7) == (train, val)
    assert split(rows, 0.2, seed=8) != (train, val)
    assert [len(v) for _, v in (split([1, 2], 0.01, 0), split([1, 2], 0.99, 0))] == [1, 1]


# -- read_records errors -------------------------------------------------------


def test_missing_file(tmp_path):
    assert "data file not found: " in str(data_error(read_records, tmp_path / "nope.jsonl"))


def test_directory(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    assert "is a directory" in str(data_error(read_records, tmp_path / "d.jsonl"))


@pytest.mark.parametrize("name", ["d.txt", "d.json", "data"])
def test_unsupported_suffix_lists_supported(tmp_path, name):
    err = data_error(read_records, write(tmp_path, name, jsonl({"text": "a"})))
    assert "unsupported file type" in err.message and ".jsonl" in err.message and ".csv" in err.message and ".parquet" in err.message


def test_not_utf8_names_line(tmp_path):
    path = write(tmp_path, "d.jsonl", b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    err = data_error(read_records, path)
    assert "line 3" in err.message and "not UTF-8" in err.message and "0xe9" in err.message
    assert "UTF-8" in err.hint


def test_not_utf8_csv(tmp_path):
    err = data_error(read_records, write(tmp_path, "d.csv", b"text,label\nok,1\nna\xefve,0\n"))
    assert "line 3" in err.message and "not UTF-8" in err.message


@pytest.mark.parametrize("name,content,phrase", [("d.jsonl", "", "is empty"), ("d.jsonl", "\n  \n", "is empty"), ("d.csv", "", "is empty"),
                                                  ("d.jsonl", b"\xef\xbb\xbf", "holds no records")])  # a BOM alone: bytes, but no record
def test_empty(tmp_path, name, content, phrase):
    err = data_error(read_records, write(tmp_path, name, content))
    assert phrase in err.message


def test_csv_header_only_has_no_records(tmp_path):
    assert "holds no records" in data_error(read_records, write(tmp_path, "d.csv", "text,label\n")).message


def test_malformed_json_names_line(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a"}, {"text": "b"}, "", "", "", "", '{"text": "c" "label": 1}'))
    err = data_error(read_records, path)
    assert err.message.startswith(f"{path} line 7: not valid JSON (Expecting ',' delimiter")


def test_pretty_printed_json_fails_on_first_line(tmp_path):
    err = data_error(read_records, write(tmp_path, "d.jsonl", '{\n  "text": "a"\n}\n'))
    assert "line 1: not valid JSON" in err.message and "one object per line" in err.hint


@pytest.mark.parametrize("line,kind", [("[1, 2]", "a list"), ('"text"', "a string"), ("3", "a number"), ("null", "null")])
def test_json_not_object(tmp_path, line, kind):
    err = data_error(read_records, write(tmp_path, "d.jsonl", jsonl({"text": "a"}, line)))
    assert "line 2: expected a JSON object" in err.message and kind in err.message


def test_csv_ragged_row(tmp_path):
    err = data_error(read_records, write(tmp_path, "d.csv", "text,label\na,1\ngood, really,1\n"))
    assert "line 3: 3 fields but the header has 2" in err.message and "quote" in err.hint


@pytest.mark.parametrize("header,problem", [("text,,label", "empty column name"), ("text,label,text", "duplicate column 'text'")])
def test_csv_bad_header(tmp_path, header, problem):
    err = data_error(read_records, write(tmp_path, "d.csv", f"{header}\na,b,c\n"))
    assert "line 1: the header row has" in err.message and problem in err.message


def test_csv_without_header_is_caught_by_field_check(tmp_path):
    err = data_error(load_classify, write(tmp_path, "d.csv", "great movie,pos\nawful,neg\n"))
    assert "line 2: no field 'text'" in err.message and "'great movie'" in err.message and "header" in err.hint


def test_bad_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    assert "not a readable parquet file" in data_error(read_records, write(tmp_path, "d.parquet", "not parquet")).message


# -- load_classify errors ------------------------------------------------------


@pytest.mark.parametrize("row,phrase", [
    ({"sentence": "a", "label": 1}, "no field 'text' (the row has 'sentence', 'label')"),
    ({"text": "a", "y": 1}, "no field 'label' (the row has 'text', 'y')"),
    ({"text": 5, "label": 1}, "'text' must be a string, got a number"),
    ({"text": None, "label": 1}, "'text' must be a string, got null"),
    ({"text": "  ", "label": 1}, "'text' is empty"),
    ({"text": "a", "label": None}, "'label' is null"),
    ({"text": "a", "label": ""}, "'label' is empty"),
    ({"text": "a", "label": ["x"]}, "'label' must be a single value, got a list"),
    ({"text": "a", "label": {"x": 1}}, "'label' must be a single value, got an object"),
])
def test_classify_row_errors(tmp_path, row, phrase):
    path = write(tmp_path, "d.jsonl", jsonl({"text": "ok", "label": 1}, "", row))
    err = data_error(load_classify, path)
    assert f"{path} line 3: " in err.message and phrase in err.message


def test_classify_missing_field_mentions_options(tmp_path):
    err = data_error(load_classify, write(tmp_path, "d.jsonl", jsonl({"sentence": "a", "label": 1})))
    assert "--text-field" in err.hint and "--label-field" in err.hint


def test_classify_csv_empty_label_names_line(tmp_path):
    err = data_error(load_classify, write(tmp_path, "d.csv", "text,label\na,1\n\nb,\n"))
    assert "line 4: 'label' is empty" in err.message


@pytest.mark.parametrize("labels,phrase", [(["x", "x"], "holds a single label 'x'; classification needs at least two"), ([], "no labels")])
def test_label_names_needs_two(labels, phrase):
    assert phrase in data_error(label_names, labels).message


# -- load_causal errors --------------------------------------------------------


@pytest.mark.parametrize("row,phrase", [
    ({"input": "a", "output": "b"}, "not a recognised row shape (the row has 'input', 'output')"),
    ({"messages": "hi"}, "'messages' must be a non-empty list, got a string"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "message 1 must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "a"}, "hi"]}, "message 2 must be an object"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "message 1 has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "message 1 'content' must be a string, got a list"),
    ({"prompt": "a"}, "has 'prompt' but no 'completion'"),
    ({"completion": "a"}, "has 'completion' but no 'prompt'"),
    ({"prompt": 1, "completion": "a"}, "'prompt' must be a string, got a number"),
    ({"prompt": "a", "completion": " "}, "'completion' is empty"),
    ({"text": {"a": 1}}, "'text' must be a string, got an object"),
    ({"text": ""}, "'text' is empty"),
])
def test_causal_row_errors(tmp_path, row, phrase):
    path = write(tmp_path, "d.jsonl", jsonl({"text": "ok"}, "", row))
    err = data_error(load_causal, path)
    assert f"{path} line 3: " in err.message and phrase in err.message


def test_causal_unknown_shape_lists_accepted_shapes(tmp_path):
    err = data_error(load_causal, write(tmp_path, "d.jsonl", jsonl({"input": "a"})))
    assert "messages" in err.hint and "prompt" in err.hint and "completion" in err.hint and "text" in err.hint


def test_unknown_role_hint_lists_roles(tmp_path):
    err = data_error(load_causal, write(tmp_path, "d.jsonl", jsonl({"messages": [{"role": "bot", "content": "a"}]})))
    assert all(r in err.hint for r in ("system", "user", "assistant", "tool"))


# -- split errors --------------------------------------------------------------


@pytest.mark.parametrize("rows,fraction,phrase", [([1], 0.5, "too few to split"), ([], 0.5, "too few to split"),
                                                  ([1, 2, 3], 0.0, "not between 0 and 1"), ([1, 2, 3], 1.0, "not between 0 and 1")])
def test_split_errors(rows, fraction, phrase):
    assert phrase in data_error(split, rows, fraction, 0).message


# -- device side ---------------------------------------------------------------


def test_torch_free(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a", "label": 0}, {"text": "b", "label": 1}))
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgeft.datasets as d\n"
            f"print(d.label_names(d.load_classify({str(path)!r})[1]))\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['0', '1']"
