"""QLoRA for every scheme: the frozen base is held packed (codes + scales) while it trains, and
rebuilt when each layer runs to exactly the values the device computes."""

import pytest
import torch

from edgeft.schemes import parse_scheme
from edgeft.workstation.packed import PackedLinear, PackedWeight, is_packed, pack_module, packed_stats, unpack_model
from edgeft.workstation.quantize import dequantize, nf4_dequantize, nf4_quantize, quantize

SCHEMES = ["int8", "int8-asym", "int4-g128", "int4-g32", "int3-g32", "int2-g32", "int4-g32-asym", "int5-g32", "int6-g64-asym"]


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("shape", [(48, 200), (7, 576), (5, 33)])  # ragged last groups, odd widths
def test_packed_weight_rebuilds_dequantize_bit_for_bit(name, shape):
    s = parse_scheme(name)
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.05
    q = quantize(w, s)
    packed = PackedWeight.from_int(q, s)
    assert torch.equal(packed.dequantize(), dequantize(q))
    rows = torch.tensor([3, 0, 3, 1])
    assert torch.equal(packed.dequantize(rows), dequantize(q)[rows])
    lane = 2 if s.bits <= 2 else 4 if s.bits <= 4 else 8
    n_groups = q.scale.shape[1]
    expected = -(-shape[0] // (8 // lane)) * shape[1] + 4 * shape[0] * n_groups + (shape[0] * n_groups if not s.symmetric else 0)
    assert packed.nbytes() == expected  # codes in their lanes (8/lane rows a byte row), fp32 scales, uint8 zero points: nothing else


def test_nf4_table_rebuilds_bitsandbytes_bit_for_bit():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    w = torch.randn(96, 128)
    state = nf4_quantize(w)
    packed = PackedWeight.from_nf4(state, tuple(w.shape))
    assert torch.equal(packed.dequantize(), nf4_dequantize(state))
    assert torch.equal(packed.dequantize(torch.tensor([5, 2])), nf4_dequantize(state)[[5, 2]])
    assert packed.nbytes() == 96 * 64 + 96 * 2 * 4 + 256 * 8  # 4-bit codes, fp32 absmax per 64, the byte table
    assert PackedWeight.from_nf4(nf4_quantize(torch.randn(4, 96)), (4, 96)) is None  # 64-blocks across rows: stays fp32


@pytest.mark.parametrize("name", ["int4-g32", "int3-g32", "int8"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_packed_linear_forward_and_backward_equal_the_dequantized_linear(name, bias, keep):
    """Forward bit for bit; grad_input too (the same matmul on the same rebuilt W). The weight
    itself is not saved for backward (the packed tensors are held already), except by the
    vocabulary projection (keep_for_backward), which must give the very same gradient."""
    s = parse_scheme(name)
    torch.manual_seed(2)
    plain = torch.nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        q = quantize(plain.weight, s)
        plain.weight.copy_(dequantize(q))
    plain.requires_grad_(False)
    packed = torch.nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        if bias:
            packed.bias.copy_(plain.bias)
    packed.requires_grad_(False)
    pack_module(packed, PackedWeight.from_int(q, s))
    packed.packed.keep_for_backward = keep
    assert isinstance(packed, PackedLinear) and "weight" not in dict(packed.named_parameters())
    x = torch.randn(3, 7, 96, requires_grad=True)
    y_ref = plain(x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = packed(x)
    assert torch.equal(y, y_ref)
    assert not any(t.dtype == torch.float32 and t.shape == (40, 96) for t in saved)
    g = torch.randn_like(y)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, gx_ref)
    assert torch.equal(packed.weight, plain.weight)  # .weight still reads (rebuilt on access)
    with torch.no_grad():
        assert torch.equal(packed(x), y_ref)


def test_packed_buffers_keep_their_dtype():
    s = parse_scheme("int4-g32")
    packed = PackedWeight.from_int(quantize(torch.randn(8, 64), s), s)
    before = packed.dequantize()
    packed.to(torch.bfloat16)
    assert packed.scale.dtype == torch.float32 and torch.equal(packed.dequantize(), before)


@pytest.mark.parametrize("scheme", ["int4-g32", "int3-g32", "int8", "nf4"])
def test_base_is_held_packed_and_tied_head_shares_it(tiny_llama, scheme):
    from edgeft.workstation.load import inspect_model_dir, load_base, quantized_weight_names

    s = parse_scheme(scheme)
    info = inspect_model_dir(tiny_llama, "causal-lm")
    model = load_base(info, "causal-lm", s, "cpu")
    modules = dict(model.named_modules())
    names = quantized_weight_names(model, info.head)
    assert model.lm_head.packed is model.model.embed_tokens.packed  # tied: one packed table
    assert [n for n in names if is_packed(modules[n]) and modules[n].packed.keep_for_backward] == ["model.embed_tokens", "lm_head"]
    packed_layers = [n for n in names if is_packed(modules[n])]
    assert packed_layers == (names if s.kind == "int" else ["model.embed_tokens", "lm_head"])  # nf4 linears: bitsandbytes
    fp32_weights = sum(p.numel() for n, p in model.named_parameters() if p.dtype == torch.float32 and n.endswith(".weight") and p.dim() == 2)
    assert fp32_weights == 0 or s.kind == "nf4"
    n_params, n_bytes = packed_stats(model)
    tables = {id(m.packed): m.packed for m in modules.values() if is_packed(m)}
    assert n_params == sum(p.shape[0] * p.shape[1] for p in tables.values())
    lane = 2 if s.bits <= 2 else 4 if s.bits <= 4 else 8
    expected = 0
    for p in tables.values():
        out_f, in_f = p.shape
        groups = -(-in_f // (s.group_size or in_f)) if s.kind == "int" else in_f // 64
        code_bytes = out_f * in_f // 2 if s.kind == "nf4" else -(-out_f // (8 // lane)) * in_f
        expected += code_bytes + (4 + (not s.symmetric)) * out_f * groups + (256 * 8 if s.kind == "nf4" else 0)
    assert n_bytes == expected  # codes in their lanes, fp32 scales, uint8 zero points (asymmetric): the packed size, nothing else
    assert n_bytes < n_params * 1.1


def test_peft_wraps_packed_layers_and_device_model_unpacks_for_merge(tmp_path, tiny_llama):
    """LoRA attaches to packed layers like to nn.Linear; unpack_model gives plain fp32 layers with
    the same values (what export traces and merge folds into), tie kept."""
    from edgeft.workstation.load import inspect_model_dir, load_base
    from edgeft.workstation.lora import attach_lora

    info = inspect_model_dir(tiny_llama, "causal-lm")
    model = attach_lora(load_base(info, "causal-lm", parse_scheme("int4-g32"), "cpu"), info, "causal-lm", 4, 8, 0.0, None).eval()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, PackedLinear)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    unpack_model(model)
    assert not any(is_packed(m) for m in model.modules())
    assert type(q.base_layer) is torch.nn.Linear and not q.base_layer.weight.requires_grad
    hf = model.get_base_model()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_training_losses_equal_the_fp32_dequantized_base(tmp_path, tiny_llama, monkeypatch):
    """End to end through the Trainer (int4-g32): the packed base trains exactly as the fp32
    dequantized base did before it was packed (same batches, same init, same dropout masks)."""
    from conftest import write_jsonl

    from edgeft.workstation import load
    from edgeft.workstation.train import TrainConfig, Trainer

    pairs = [("what is two plus two?", " four"), ("where did the cat sit?", " on the mat")] * 6
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "completion": a} for q, a in pairs])

    def losses(out):
        torch.manual_seed(0)
        cfg = TrainConfig(model=str(tiny_llama), data=str(data), task="causal-lm", out=str(out), scheme="int4-g32", max_seq_len=32,
                          batch_size=4, max_steps=4, warmup_ratio=0.0, device="cpu", lora_r=4, lora_alpha=8)
        trainer = Trainer(cfg, progress=False)
        trainer.prepare_data()
        trainer.build_model()
        return [trainer.train_step(i)[0] for i in range(4)], trainer

    packed, trainer = losses(tmp_path / "packed")
    assert any(is_packed(m) for m in trainer.model.modules())
    original = load.load_base

    def fp32_base(*args, **kwargs):
        model = original(*args, **kwargs)
        unpack_model(model)
        return model

    monkeypatch.setattr(load, "load_base", fp32_base)
    fp32, trainer = losses(tmp_path / "fp32")
    assert not any(is_packed(m) for m in trainer.model.modules())
    assert packed == fp32  # bit for bit, every step: the same matmuls on the same rebuilt values


def test_quantize_in_row_chunks_gives_the_same_codes(monkeypatch):
    """Large tensors are quantized a block of rows at a time (bounded temporaries): same result."""
    from edgeft.workstation import quantize as q

    w = torch.randn(300, 200)
    for name in ("int4-g128", "int3-g32", "int8", "int8-asym"):
        s = parse_scheme(name)
        whole = q.quantize(w, s)
        monkeypatch.setattr(q, "CHUNK", 1000)
        parts = q.quantize(w, s)
        monkeypatch.undo()
        assert torch.equal(whole.codes, parts.codes) and torch.equal(whole.scale, parts.scale)
        assert (whole.zero is None) == (parts.zero is None) and (whole.zero is None or torch.equal(whole.zero, parts.zero))


def test_backward_under_bf16_autocast():
    """`edgeft train` on CUDA runs under bf16 autocast; backward then receives bf16 gradients
    while the rebuilt W and the fused-dropout lora_A weight are fp32 (CPU autocast stands in)."""
    from edgeft.workstation.lora import DropoutLinear

    s = parse_scheme("int4-g32")
    base = torch.nn.Linear(64, 32, bias=False).requires_grad_(False)
    pack_module(base, PackedWeight.from_int(quantize(base.weight, s), s))
    lora_a = DropoutLinear.wrap(torch.nn.Linear(64, 8, bias=False), 0.1).train()
    x = torch.randn(2, 5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = base(x) + lora_a(x).sum(-1, keepdim=True)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and lora_a.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(lora_a.weight.grad).all()
