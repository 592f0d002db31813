#!/usr/bin/env python
"""Estimate: does a 7B-class model train with `edgeft train` at int4-g128 on a 24 GB GPU?

Measured, not guessed, layer by layer: models of a 7B-class shape (random weights) are built
with 1 and 2 decoder layers and a small vocabulary, and with 1 layer and the real vocabulary.
Each holds its base packed (codes + scales) exactly as `edgeft train` does, gets LoRA r16 on the
seven projections, and runs one full training step (forward, backward through the packed base,
AdamW) at the device profile's batch x sequence (Raspberry Pi 5: 4 x 256, every position
labelled: the worst case) under torch's MemTracker, which follows every tensor's storage and
reports the peak by category (parameters, buffers = the packed base, gradients, optimizer
state, activations, temporaries).

    peak(L layers, vocab V) ~ peak(1 layer, V) + (L - 1) x [peak(2 layers, small V) - peak(1 layer, small V)]

The measurement runs on the CPU (no GPU on this machine); `--precision bf16` runs the step under
CPU autocast (bfloat16 matmuls, as `edgeft train` uses CUDA autocast bf16), fp32 without. What
a GPU adds on top (CUDA context, cuBLAS workspace, allocator rounding) is stated, not measured.

    .venv/bin/python tools/estimate_train_memory.py                 # Qwen2.5-7B shape, int4-g128, 4 x 256
    .venv/bin/python tools/estimate_train_memory.py --preset llama-2-7b --precision fp32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {
    # model_type, config fields, full depth
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                                 vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=4096), 28),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                                 vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096), 32),
}
GIB = 2**30


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenAwareTracker(MemTracker):
        """MemTracker hooks every parameter's gradient; a frozen base has parameters with none."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)

            def hook(grad) -> None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            for param in module.parameters():
                if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (param.register_hook(hook),
                                                               param.register_post_accumulate_grad_hook(lambda p: hook(p.grad)))
            return sizes

    return FrozenAwareTracker


def measure(model_type: str, fields: dict, layers: int, vocab: int, scheme_name: str, batch: int, seq: int, precision: str) -> dict:
    """One training step of a freshly built packed model under MemTracker: peak bytes by category."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeft.schemes import parse_scheme
    from edgeft.workstation.load import ModelInfo, quantize_frozen
    from edgeft.workstation.lora import attach_lora
    from edgeft.workstation.objective import make_objective
    from edgeft.workstation.packed import packed_stats

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**fields, "vocab_size": vocab, "num_hidden_layers": layers})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    quantize_frozen(model, parse_scheme(scheme_name), skip="lm_head")
    for m in model.modules():  # as on CUDA: the vocabulary projection rebuilds its weight for backward (packed.py)
        if hasattr(m, "keep_for_backward"):
            m.keep_for_backward = False
    info = ModelInfo(Path("."), model_type, [], MODULES, "lm_head")
    model = attach_lora(model, info, "causal-lm", 16, 32, 0.05, MODULES).train()
    objective = make_objective("causal-lm", model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, eps=1e-8)
    ids = torch.randint(0, vocab, (batch, seq))
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    tracker = _tracker_class()()
    tracker.track_external(model, opt)
    t0 = time.perf_counter()
    with tracker:
        for _ in range(2):  # the second step has AdamW's moments allocated: the steady state
            with autocast:
                loss, _ = objective(**batch_)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker.reset_mod_stats()  # per-module stats only; the peak is kept
    seconds = time.perf_counter() - t0
    peak = tracker.get_tracker_snapshot("peak")
    cpu = next(iter(peak.values()))
    packed_params, packed_bytes = packed_stats(model)
    return {"layers": layers, "vocab": vocab, "peak_bytes": cpu.get("Total", 0), "by_category": {getattr(k, "value", k): v for k, v in cpu.items()},
            "packed_base_bytes": packed_bytes, "packed_base_params": packed_params, "trainable": sum(p.numel() for p in params),
            "loss": loss.item(), "seconds_two_steps": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-7b")
    ap.add_argument("--scheme", default="int4-g128")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--gpu-gib", type=float, default=24.0)
    ap.add_argument("--small-vocab", type=int, default=512)
    ap.add_argument("--layers", type=int, help="override the preset's depth (e.g. a tiny smoke run)")
    ap.add_argument("--shrink", type=int, default=1, help=argparse.SUPPRESS)  # tests: divide the widths
    ap.add_argument("--out", default=str(ROOT / "bench-results/train-memory.json"))
    args = ap.parse_args()
    model_type, fields, depth = PRESETS[args.preset]
    depth = args.layers or depth
    if args.shrink > 1:
        fields = {k: (v // args.shrink if k in ("hidden_size", "intermediate_size", "vocab_size") else v) for k, v in fields.items()}
    run = lambda layers, vocab: measure(model_type, fields, layers, vocab, args.scheme, args.batch, args.seq_len, args.precision)  # noqa: E731
    one, two = run(1, args.small_vocab), run(2, args.small_vocab)
    head = run(1, fields["vocab_size"])
    per_layer = two["peak_bytes"] - one["peak_bytes"]
    total = head["peak_bytes"] + (depth - 1) * per_layer
    packed_layer = two["packed_base_bytes"] - one["packed_base_bytes"]
    base = head["packed_base_bytes"] + (depth - 1) * packed_layer
    params = head["packed_base_params"] + (depth - 1) * (two["packed_base_params"] - one["packed_base_params"])
    report = {"preset": args.preset, "scheme": args.scheme, "batch": args.batch, "seq_len": args.seq_len, "precision": args.precision,
              "depth": depth, "per_layer_peak_bytes": per_layer, "per_layer_packed_bytes": packed_layer, "estimated_peak_bytes": total,
              "estimated_packed_base_bytes": base, "base_params": params, "fits_gib": args.gpu_gib,
              "fits": total < args.gpu_gib * GIB, "runs": {"1-layer": one, "2-layer": two, "1-layer-full-vocab": head}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{args.preset} ({params / 1e9:.2f}B base parameters, {depth} layers), {args.scheme}, batch {args.batch}x{args.seq_len}, {args.precision}")
    print(f"  per decoder layer: peak +{per_layer / GIB:.3f} GiB, of which packed base {packed_layer / GIB:.3f} GiB")
    for name, r in (("1 layer, small vocab", one), ("2 layers, small vocab", two), ("1 layer, full vocab", head)):
        cats = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["by_category"].items() if k != "Total" and v)
        print(f"  {name:<22} peak {r['peak_bytes'] / GIB:6.2f} GiB ({cats})")
    print(f"  estimated peak at {depth} layers: {total / GIB:.2f} GiB (packed base {base / GIB:.2f} GiB) -> "
          f"{'fits' if report['fits'] else 'does NOT fit'} in {args.gpu_gib:g} GiB before the CUDA context and allocator slack")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
