"""Training data files: parse, validate, normalise. Torch-free.

Runs on the device too (a Raspberry Pi has no torch), so only the stdlib is
used; pyarrow is imported only when a .parquet file is actually read. Bad
data never surfaces as a traceback: every problem is a DataError that names
the file, the line (or row) and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json-lines", ".ndjson")
SUFFIXES = JSONL_SUFFIXES + (".csv", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
LABELLED_TASKS = ("classify", "image-classify")  # a head over named labels, whose names and order an adapter fixes
SHAPES = "{'messages': [{'role', 'content'}, ...]}, {'prompt', 'completion'} or {'text'}"


def _kind(value) -> str:
    """Name a value the way someone who wrote the JSON would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _decode(path: Path, data: bytes) -> str:
    """Decode strictly so mojibake never reaches training; point at the offending line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path} line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column})",
                        f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > fixed{path.suffix}") from None


def _read_jsonl(path: Path, text: str) -> tuple[list[dict], list[str]]:
    records, where = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg}: column {e.colno})",
                            "each line must be one complete JSON object; a pretty-printed file must be rewritten one object per line") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e})", "each line must be one complete JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {n}: expected a JSON object {{...}}, got {_kind(obj)}",
                            'write one object per line, e.g. {"text": "...", "label": "..."}')
        records.append(obj)
        where.append(f"{path} line {n}")
    return records, where


def _read_csv(path: Path, text: str) -> tuple[list[dict], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header, records, where, line = None, [], [], 0
    try:
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row:
                continue
            if header is None:
                names = [c.strip() for c in row]
                dup = sorted({c for c in names if names.count(c) > 1})
                if "" in names or dup:
                    problem = f"duplicate column {dup[0]!r}" if dup else "an empty column name"
                    raise DataError(f"{path} line {start}: the header row has {problem}",
                                    "the first line must name every column once, e.g. text,label")
                header = names
                continue
            if len(row) != len(header):
                raise DataError(f"{path} line {start}: {len(row)} fields but the header has {len(header)}",
                                'quote fields that contain commas, e.g. "good, really",positive')
            records.append(dict(zip(header, row)))
            where.append(f"{path} line {start}")
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({e})", "check the quoting on that line, or convert the file to JSONL") from None
    if header is None:
        raise DataError(f"{path} has no CSV header row", "the first line must name the columns, e.g. text,label")
    return records, where


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed", "pip install pyarrow, or convert the file to JSONL") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path} is not a readable parquet file ({e})", "re-export the file, or convert it to JSONL") from None
    return records, [f"{path} row {i}" for i in range(1, len(records) + 1)]


def _read(path: str | Path) -> tuple[list[dict], list[str]]:
    """Records plus where each came from ('file line N'), so later checks can name the line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}", "check the path passed to --data / --eval-data")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file", f"point at a file inside it ({', '.join(SUFFIXES)})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        hint = "rename it to .jsonl if it holds one object per line; a JSON array must be converted" if suffix == ".json" else "convert it to JSONL"
        raise DataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported: {', '.join(SUFFIXES)}", hint)
    try:
        if suffix == ".parquet":
            records, where = _read_parquet(path)
        else:
            data = path.read_bytes()
            if not data.strip():
                raise DataError(f"{path} is empty", "add at least one record")
            text = _decode(path, data.removeprefix(b"\xef\xbb\xbf"))  # tolerate the BOM Excel writes
            records, where = (_read_csv if suffix == ".csv" else _read_jsonl)(path, text)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}", "check the file's permissions") from None
    if not records:
        raise DataError(f"{path} holds no records", "add at least one record")
    return records, where


def read_records(path: str | Path) -> list[dict]:
    """One loader for every supported format, so the CLI validates all data the same way."""
    return _read(path)[0]


def _label(value, where: str, field: str) -> str:
    """Labels compare as strings so 1 in JSONL and "1" in CSV name the same class."""
    if value is None:
        raise DataError(f"{where}: {field!r} is null", "give every row a label")
    if isinstance(value, (list, dict)):
        raise DataError(f"{where}: {field!r} must be a single value, got {_kind(value)}", "one label per row: a string, number or true/false")
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where}: {field!r} is {value}", "give every row a real label")
        return str(int(value)) if value.is_integer() else repr(value)
    label = str(value).strip()
    if not label:
        raise DataError(f"{where}: {field!r} is empty", "give every row a label")
    return label


def load_classify(path: str | Path, text_field: str = "text", label_field: str = "label",
                  known: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Checks every row up front, so a bad row fails in seconds rather than mid-training.
    With `known`, a label outside it fails on its line (a device cannot grow new classes)."""
    records, where = _read(path)
    header_hint = " (the first line of a CSV must be its header)" if Path(path).suffix.lower() == ".csv" else ""
    texts, labels = [], []
    for row, loc in zip(records, where):
        for field in (text_field, label_field):
            if field not in row:
                has = ", ".join(repr(k) for k in row) or "no fields"
                raise DataError(f"{loc}: no field {field!r} (the row has {has})",
                                "pick the columns with --text-field / --label-field" + header_hint)
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{loc}: {text_field!r} must be a string, got {_kind(text)}", "check --text-field names the text column")
        if not text.strip():
            raise DataError(f"{loc}: {text_field!r} is empty", "remove the row or give it text")
        texts.append(text)
        labels.append(_label(row[label_field], loc, label_field))
        if known is not None and labels[-1] not in known:
            raise DataError(f"{loc}: label {labels[-1]!r} is not one the model was trained with",
                            f"known labels: {', '.join(known)}; new classes need a new workstation run")
    return texts, labels


def label_names(labels: list[str]) -> list[str]:
    """A stable class order, so label ids match between training and the device."""
    names = set(labels)
    if len(names) < 2:
        what = f"a single label {next(iter(names))!r}" if names else "no labels"
        raise DataError(f"the training data holds {what}; classification needs at least two",
                        "add examples of the other classes, or check --label-field points at the class column")
    try:
        return sorted(names, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(names)


def _causal_row(row: dict, loc: str) -> dict:
    """One of three shapes, so the encoder never has to guess."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{loc}: 'messages' must be a non-empty list, got {_kind(messages)}", 'e.g. "messages": [{"role": "user", "content": "hi"}]')
        out = []
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{loc}: message {i} must be an object with 'role' and 'content'", 'e.g. {"role": "user", "content": "hi"}')
            if m["role"] not in ROLES:
                raise DataError(f"{loc}: message {i} has unknown role {m['role']!r}", f"use one of: {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{loc}: message {i} 'content' must be a string, got {_kind(m['content'])}", "put the message text in 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        return {"messages": out}
    if "prompt" in row or "completion" in row:
        for field in ("prompt", "completion"):
            if field not in row:
                raise DataError(f"{loc}: has {'completion' if field == 'prompt' else 'prompt'!r} but no {field!r}", "prompt rows need both 'prompt' and 'completion'")
            if not isinstance(row[field], str):
                raise DataError(f"{loc}: {field!r} must be a string, got {_kind(row[field])}", "prompt rows need both as strings")
        if not row["completion"].strip():
            raise DataError(f"{loc}: 'completion' is empty", "the completion is what the model learns; remove the row or fill it in")
        return {"prompt": row["prompt"], "completion": row["completion"]}
    if "text" in row:
        if not isinstance(row["text"], str):
            raise DataError(f"{loc}: 'text' must be a string, got {_kind(row['text'])}", "put the training text in 'text'")
        if not row["text"].strip():
            raise DataError(f"{loc}: 'text' is empty", "remove the row or give it text")
        return {"text": row["text"]}
    has = ", ".join(repr(k) for k in row) or "no fields"
    raise DataError(f"{loc}: not a recognised row shape (the row has {has})", f"use one of: {SHAPES}")


def load_causal(path: str | Path) -> list[dict]:
    """Normalised rows, so extra columns in the file never leak into training."""
    records, where = _read(path)
    return [_causal_row(row, loc) for row, loc in zip(records, where)]


def split(rows: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded, so a resumed or repeated run validates on the same rows."""
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction {val_fraction} is not between 0 and 1", "use e.g. --val-fraction 0.1, or pass --eval-data")
    if len(rows) < 2:
        raise DataError(f"only {len(rows)} row(s): too few to split into train and validation", "add more rows, or pass a separate --eval-data file")
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    return shuffled[n_val:], shuffled[:n_val]


def load_task_rows(path: str | Path, task: str, labels: list[str] | None = None) -> list[dict]:
    """Normalised rows for a task: {'text','label'} for classify (labels checked against `labels`),
    one of the causal shapes otherwise. What the device trains on and what a bundle retains.
    image-classify: {'image': absolute path, 'label'} from class folders or a .jsonl/.csv (edgeft.images)."""
    if task == "image-classify":
        from .images import image_task_rows

        return image_task_rows(path, labels)
    if not Path(path).is_file():
        raise DataError(f"data file {path} does not exist", "check the path")
    if task == "classify":
        texts, ys = load_classify(path, known=labels)
        return [{"text": t, "label": y} for t, y in zip(texts, ys)]
    return load_causal(path)


def sample_rows(rows: list, n: int, seed: int = 0) -> list:
    """A seeded sample in file order, so the same file always yields the same subset."""
    if len(rows) <= n:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]
