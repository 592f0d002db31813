"""Shared fixtures: tiny models built from configs and saved as real HF folders.

No hub: the tokenizer is trained here on a few sentences with the `tokenizers`
library, and carries a small chat template so chat rows work end to end.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# An unexpected exception propagates instead of becoming a tidy "internal error" (exit 1) or an
# export-stage error (exit 10), so run() below sees it and fails the test (edgeft/stages.py).
os.environ["EDGEFT_DEBUG"] = "1"
os.environ.setdefault("EDGEFT_LOG_DIR", tempfile.mkdtemp(prefix="edgeft-test-logs-"))  # not the user's ~/.cache

CORPUS = [
    "the movie was great and i loved it", "what a terrible day, i hate this", "the weather is fine today",
    "i am so happy with the result", "this is awful and sad", "nothing special, just an ordinary afternoon",
    "question: what is two plus two? answer: four", "the cat sat on the mat", "numbers 0 1 2 3 4 5 6 7 8 9",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def build_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(path: Path, kind: str) -> Path:
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_tokenizer(kind)
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(config)
    else:
        config = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, pad_token_id=tok.pad_token_id)
        model = BertModel(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny-bert", "bert")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def sentiment_rows() -> list[dict]:
    pos = ["i loved it", "so happy today", "great result", "what a great movie", "happy and fine"]
    neg = ["i hate this", "terrible day", "awful and sad", "this is terrible", "sad movie"]
    return [{"text": t, "label": "positive"} for t in pos * 4] + [{"text": t, "label": "negative"} for t in neg * 4]


@pytest.fixture
def chat_rows() -> list[dict]:
    qa = [("what is two plus two?", "four"), ("where did the cat sit?", "on the mat"), ("how is the weather?", "fine today")]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa * 6]


TINY_TARGET = """
name = "tiny-{budget}"
arch = "aarch64"
[memory]
ram_mb = 4096
budget_mb = {budget}
[compute]
threads = 2
execution_providers = ["CPUExecutionProvider"]
[quantization]
scheme = "{scheme}"
[training]
max_seq_len = 32
batch_size = 2
"""


def run(*args, internal_ok: bool = False):
    """Invoke the CLI in-process. Any exception other than SystemExit is a bug (a user would see a
    traceback, or with EDGEFT_DEBUG unset an "internal error"), and fails the test with its traceback:
    CliRunner keeps it in result.exception, where an exit-code check alone can mistake it for a
    deliberate failure. `internal_ok`: the test provokes the internal-error path on purpose."""
    from click.testing import CliRunner

    from edgeft.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    check_result(result, internal_ok)
    return result


def check_result(result, internal_ok: bool = False) -> None:
    e = result.exception
    if e is not None and not isinstance(e, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(f"the command raised {type(e).__name__} (a bug: no exception may escape a command)\n{tb}\noutput:\n{result.output}")
    assert "Traceback" not in result.output, result.output
    if not internal_ok:
        assert "internal error" not in result.output, result.output


def device(*args):
    """`edgeft device ...` in-process: (result, parsed --json output or None)."""
    r = run("device", *args)
    return r, (json.loads(r.stdout) if "--json" in args and r.exit_code == 0 else None)


def target(tmp_path, scheme="int4-g32", budget=4096):
    p = tmp_path / f"tiny-{scheme}-{budget}.toml"
    p.write_text(TINY_TARGET.format(scheme=scheme, budget=budget))
    return p


def tiny_run(tmp: Path, model: Path, task: str, rows: list[dict], scheme: str) -> Path:
    """A 3-step `edgeft train` run on a tiny model: what export and device tests start from."""
    data = write_jsonl(tmp / "d.jsonl", rows)
    r = run("train", "--model", model, "--data", data, "--task", task, "--out", tmp / "run", "--max-steps", 3,
            "--batch-size", 4, "--quant", scheme, "--quiet")
    assert r.exit_code == 0, r.output
    return tmp / "run"


def tiny_bundle(tmp: Path, run_dir: Path, scheme: str) -> Path:
    r = run("export", "--run", run_dir, "--target", target(tmp, scheme), "--out", tmp / "bundle")
    assert r.exit_code == 0, r.output
    return tmp / "bundle"


@pytest.fixture(scope="session")
def cls_run(tmp_path_factory, tiny_bert):
    pairs = [("i loved it", "pos"), ("great result", "pos"), ("terrible day", "neg"), ("sad movie", "neg")] * 5
    return tiny_run(tmp_path_factory.mktemp("cls"), tiny_bert, "classify", [{"text": t, "label": y} for t, y in pairs], "int4-g32")


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, tiny_llama):
    pairs = [("what is two plus two?", " four"), ("where did the cat sit?", " on the mat")] * 6
    return tiny_run(tmp_path_factory.mktemp("lm"), tiny_llama, "causal-lm", [{"prompt": q, "completion": a} for q, a in pairs], "int3-g32")


@pytest.fixture(scope="session")
def cls_bundle(tmp_path_factory, cls_run):
    return tiny_bundle(tmp_path_factory.mktemp("clsb"), cls_run, "int4-g32")


@pytest.fixture(scope="session")
def lm_bundle(tmp_path_factory, lm_run):
    return tiny_bundle(tmp_path_factory.mktemp("lmb"), lm_run, "int3-g32")
