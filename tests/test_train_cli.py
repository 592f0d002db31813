"""`edgeft train` through the CLI: real tiny models, real files, real training."""

import json
import shutil

import pytest

from conftest import run, write_jsonl


@pytest.fixture
def cls_data(tmp_path, sentiment_rows):
    return write_jsonl(tmp_path / "train.jsonl", sentiment_rows)


def train_args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--task", "classify", "--out", out, "--max-steps", 2, "--batch-size", 4, "--quiet", *extra]


# -- bad input: one message, non-zero exit, no traceback, no run directory ----
def _bad_utf8(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    return p


BAD_DATA = {
    "missing file": (lambda tmp: tmp / "nope.jsonl", "not found"),
    "empty file": (lambda tmp: (tmp / "empty.jsonl").write_text("") and None or tmp / "empty.jsonl", "empty"),
    "malformed line": (lambda tmp: (tmp / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": oops}\n') and tmp / "bad.jsonl", "line 2"),
    "missing field": (lambda tmp: write_jsonl(tmp / "nofield.jsonl", [{"text": "a", "label": "x"}, {"sentence": "b", "label": "y"}]), "line 2"),
    "single label": (lambda tmp: write_jsonl(tmp / "one.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(10)]), "single label"),
    "not utf-8": (_bad_utf8, "line 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data(tmp_path, tiny_bert, case):
    make, phrase = BAD_DATA[case]
    out = tmp_path / "run"
    result = run(*train_args(tiny_bert, make(tmp_path), out))
    assert result.exit_code != 0
    assert phrase in result.output.lower()
    assert not out.exists()


def test_bad_model_folders(tmp_path, cls_data, tiny_bert):
    out = tmp_path / "run"
    r = run(*train_args(tmp_path / "missing", cls_data, out))
    assert r.exit_code == 4 and "not found" in r.output
    (tmp_path / "empty").mkdir()
    r = run(*train_args(tmp_path / "empty", cls_data, out))
    assert r.exit_code == 4 and "no config.json" in r.output
    odd = tmp_path / "odd"
    shutil.copytree(tiny_bert, odd)
    (odd / "config.json").write_text(json.dumps({"model_type": "t5"}))
    r = run(*train_args(odd, cls_data, out))
    assert r.exit_code == 4 and "unsupported architecture 't5'" in r.output
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    r = run(*train_args(pickled, cls_data, out))
    assert r.exit_code == 4 and "never loads pickled" in r.output
    assert not out.exists()


def test_bad_target_lora_device(tmp_path, cls_data, tiny_bert):
    out = tmp_path / "run"
    r = run(*train_args(tiny_bert, cls_data, out, "--target", "toaster"))
    assert r.exit_code == 5 and "unknown target" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\narch = "aarch64"\n')
    r = run(*train_args(tiny_bert, cls_data, out, "--target", bad))
    assert r.exit_code == 5 and "memory.ram_mb" in r.output
    r = run(*train_args(tiny_bert, cls_data, out, "--lora-r", 0))
    assert r.exit_code == 2 and "--lora-r" in r.output
    import torch

    if not torch.cuda.is_available():
        r = run(*train_args(tiny_bert, cls_data, out, "--device", "cuda"))
        assert r.exit_code == 7 and "CUDA" in r.output
    assert not out.exists()


def test_existing_output_is_kept(tmp_path, cls_data, tiny_bert):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = run(*train_args(tiny_bert, cls_data, out))
    assert r.exit_code == 6 and "already exists" in r.output
    # --overwrite with bad input must not destroy the old run either
    r = run(*train_args(tiny_bert, tmp_path / "nope.jsonl", out, "--overwrite"))
    assert r.exit_code != 0 and (out / "precious.txt").exists()


# -- happy paths ---------------------------------------------------------------
def test_classify_run_directory_is_complete_and_peft_loads_it(tmp_path, cls_data, tiny_bert):
    out = tmp_path / "run"
    r = run(*train_args(tiny_bert, cls_data, out, "--json", "--quant", "int4-g32"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and summary["scheme"] == "int4-g32" and "accuracy" in summary["after"]
    for f in ("config.json", "metrics.jsonl", "report.md", "loss.png", "summary.json", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors", "adapter/tokenizer.json", "adapter/edgeft.json", "checkpoint/optimizer.safetensors"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "adapter/edgeft.json").read_text())
    assert meta["labels"] == ["negative", "positive"]

    # plain PEFT loads it, head included, and gives the adapter's predictions
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, out / "adapter")
    saved = load_file(out / "adapter/adapter_model.safetensors")
    head = [k for k in saved if "classifier" in k]
    assert head, sorted(saved)
    assert any(torch.equal(saved[k], p) for k in head for n, p in model.named_parameters() if "classifier" in n)


def test_overwrite_and_resume(tmp_path, cls_data, tiny_bert):
    out = tmp_path / "run"
    assert run(*train_args(tiny_bert, cls_data, out)).exit_code == 0
    assert run(*train_args(tiny_bert, cls_data, out, "--overwrite")).exit_code == 0
    r = run("train", "--resume", out, "--max-steps", 4, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 4
    steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in row]
    assert steps == [1, 2, 3, 4]
    r = run("train", "--resume", tmp_path / "nothing", "--quiet")
    assert r.exit_code == 2


def test_causal_chat_masks_prompt_and_learns(tmp_path, tiny_llama, chat_rows):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows)
    out = tmp_path / "run"
    r = run("train", "--model", tiny_llama, "--data", data, "--task", "causal-lm", "--out", out, "--max-steps", 30,
            "--batch-size", 4, "--lr", 1e-2, "--quiet", "--json", "--quant", "int4-g32")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"] - 0.5


def test_prompts_that_fill_max_seq_len_are_refused(tmp_path, tiny_llama):
    """Rows cut before their answer teach nothing and score a loss of 0: training on them would be
    a silent no-op (Qwen2.5's template and a GSM8K question fill 64 tokens), so it is refused."""
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    rows = [{"prompt": f"{long_prompt} {i}?", "completion": " yes"} for i in range(12)]
    data, out = write_jsonl(tmp_path / "long.jsonl", rows), tmp_path / "run"
    r = run("train", "--model", tiny_llama, "--data", data, "--task", "causal-lm", "--out", out, "--max-seq-len", 16,
            "--max-steps", 1, "--quiet")
    assert r.exit_code == 3 and "no row keeps an answer token within 16 tokens" in r.output and "--max-seq-len" in r.output
    assert not out.exists()
    short = [{"prompt": f"q{i}?", "completion": " yes"} for i in range(6)]
    mixed, val = write_jsonl(tmp_path / "mixed.jsonl", rows[:6] + short), write_jsonl(tmp_path / "val.jsonl", short)
    r = run("train", "--model", tiny_llama, "--data", mixed, "--eval-data", val, "--task", "causal-lm", "--out", out,
            "--max-seq-len", 16, "--max-steps", 1, "--quiet")
    assert r.exit_code == 0 and "training data: 6 of 12 rows keep no answer token within 16 tokens" in r.output, r.output


def test_early_stopping(tmp_path, cls_data, tiny_bert):
    out = tmp_path / "run"
    r = run(*train_args(tiny_bert, cls_data, out, "--max-steps", 40, "--eval-every", 1, "--patience", 1, "--lr", 0, "--json"))
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["stopped_early"] and s["steps"] < 40


def test_torchrun_two_processes(tmp_path, cls_data, tiny_bert):
    """DDP without any change by the user: torchrun sets the env, edgeft picks it up."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "edgeft", "train", "--model", str(tiny_bert),
           "--data", str(cls_data), "--task", "classify", "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--quiet", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (out / "adapter/adapter_model.safetensors").is_file()
