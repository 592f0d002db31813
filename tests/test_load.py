"""The frozen base the workstation trains against is the device's base, tensor for tensor."""

import pytest
import torch
from safetensors.torch import load_file

from edgeft.schemes import parse_scheme
from edgeft.workstation.load import inspect_model_dir, load_base, quantized_weight_names
from edgeft.workstation.quantize import bnb_dequantized_weight, fake_quantize


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int3-g32", "nf4"])
def test_llama_base_embedding_and_linears_are_quantized(tiny_llama, scheme):
    s = parse_scheme(scheme)
    info = inspect_model_dir(tiny_llama, "causal-lm")
    model = load_base(info, "causal-lm", s, "cpu")
    original = load_file(tiny_llama / "model.safetensors")
    names = quantized_weight_names(model, info.head)
    assert names[0] == "model.embed_tokens" and names[-1] == "lm_head" and len(names) == 2 + 2 * 7
    modules = dict(model.named_modules())
    for name in names[:-1]:  # lm_head is tied to the embedding
        m = modules[name]
        got = bnb_dequantized_weight(m) if type(m).__name__ == "Linear4bit" else m.weight
        assert torch.equal(got, fake_quantize(original[f"{name}.weight"], s)), name
    assert all(not p.requires_grad for p in model.parameters())


def test_bert_classifier_head_stays_fp32(tiny_bert):
    info = inspect_model_dir(tiny_bert, "classify")
    model = load_base(info, "classify", parse_scheme("int4-g32"), "cpu", labels=["a", "b", "c"])
    names = quantized_weight_names(model, info.head)
    assert "classifier" not in names and "bert.embeddings.word_embeddings" in names
    assert "bert.embeddings.position_embeddings" not in names
