"""Every architecture the README names goes the whole way: train -> export (every graph, validated
against torch) -> device train on the portable step -> device export-adapter -> plain PEFT.

Each model is a tiny config built here (2 layers, hidden 64) with the quirks of its family kept:
GQA, sliding windows, q/k norms, Gemma's scaled embeddings and GELU-tanh, untied heads, biases.
The list must equal `load.ARCHITECTURES` and the README's, so a new entry cannot skip the matrix.
"""

import json
import re
from pathlib import Path

import pytest

from conftest import build_tokenizer, device, run, target, write_jsonl

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)

# model_type -> (config class, model class, config overrides); None overrides: DistilBERT names its fields differently
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=16, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=1, head_dim=16, sliding_window=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),
}
ENCODERS = {
    "bert": ("BertConfig", "BertModel", {}),
    "roberta": ("RobertaConfig", "RobertaModel", dict(max_position_embeddings=260)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", dict(max_position_embeddings=260)),
    "distilbert": ("DistilBertConfig", "DistilBertModel", None),
}
CASES = [(a, "causal-lm") for a in DECODERS] + [(a, "classify") for a in ENCODERS] + [("qwen2", "classify"), ("gemma3_text", "classify")]


def build_arch(path: Path, arch: str) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config_cls, model_cls, extra = {**DECODERS, **ENCODERS}[arch]
    tok = build_tokenizer("llama" if arch in DECODERS else "bert")
    ids = dict(pad_token_id=tok.pad_token_id)
    if arch in DECODERS:
        ids.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if extra is None:
        config = getattr(transformers, config_cls)(vocab_size=len(tok), dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=256, **ids)
    else:
        config = getattr(transformers, config_cls)(vocab_size=len(tok), **{**SMALL, **extra}, **ids)
    getattr(transformers, model_cls)(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_matrix_covers_exactly_what_edgeft_accepts_and_the_readme_lists():
    from edgeft.workstation.load import ARCHITECTURES

    assert set(DECODERS) | set(ENCODERS) == set(ARCHITECTURES)
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    line = re.search(r"Supported: (.*?)\(classify\)\.", readme, re.S).group(1)
    for name in ("Llama", "Mistral", "Qwen2/3", "Gemma 1–3", "Phi-3", "OLMo-2", "BERT", "RoBERTa", "XLM-R", "DistilBERT"):
        assert name in line, name


ROWS = {
    "classify": [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("great result", "pos"), ("terrible day", "neg"), ("sad movie", "neg")] * 5],
    "causal-lm": [{"prompt": q, "completion": a} for q, a in [("what is two plus two?", " four"), ("where did the cat sit?", " on the mat")] * 6],
}


@pytest.mark.parametrize("arch,task", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_architecture_end_to_end(tmp_path, arch, task):
    import numpy as np
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.set_num_threads(1)
    model = build_arch(tmp_path / f"tiny-{arch}", arch)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[task])
    r = run("train", "--model", model, "--data", data, "--task", task, "--out", tmp_path / "run", "--max-steps", 2, "--batch-size", 4,
            "--quant", "int4-g32", "--no-eval-before", "--quiet")
    assert r.exit_code == 0, r.output

    r = run("export", "--run", tmp_path / "run", "--target", target(tmp_path, "int4-g32"), "--out", tmp_path / "bundle", "--json")
    assert r.exit_code == 0, r.output
    parity = json.loads(r.stdout)["parity"]
    for key in ("logits_rel", "grad_rel", "portable_grad_rel", "loss_rel", "portable_loss_rel"):
        assert parity[key] < 1e-5, (key, parity)
    assert parity["step_rel"] < 1e-4 and parity["portable_step_rel"] < 1e-4, parity
    # the vocabulary (embedding, lm_head) is stored packed whatever name the exporter gives a tied
    # weight (Gemma's lm_head is quantized under its own name, the graph names the embedding)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bundle" / "base.safetensors"), "np") as f:
        fp32 = {k: f.get_slice(k).get_shape() for k in f.keys() if "::q." not in k}
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    if task == "causal-lm":  # classify: training leaves Gemma's embedding subclass unquantized (load.quantize_frozen)
        assert not [k for k, shape in fp32.items() if vocab in shape], fp32

    r, out = device("train", "--bundle", tmp_path / "bundle", "--data", data, "--max-steps", 3, "--backend", "portable",
                    "--tolerance", "1", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert out["backend"] == "portable" and out["steps"] == 3 and out["promoted"] is True, out
    assert all(np.isfinite(out["losses"])) and len(out["losses"]) == 3

    r, _ = device("export-adapter", "--bundle", tmp_path / "bundle", "--out", tmp_path / "gen1")
    assert r.exit_code == 0, r.output
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    kwargs = {"num_labels": 2} if task == "classify" else {}
    peft = PeftModel.from_pretrained(auto.from_pretrained(model, **kwargs), tmp_path / "gen1")
    device_weights = load_file(str(tmp_path / "gen1" / "adapter_model.safetensors"))
    loaded = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(peft).items()}
    assert set(loaded) == set(device_weights)  # every tensor the device trained landed in the PEFT model
    for key, value in device_weights.items():
        np.testing.assert_array_equal(loaded[key], value)
