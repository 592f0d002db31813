#!/usr/bin/env python
"""Benchmark: edgeft's QLoRA training step vs a plain PEFT + bitsandbytes loop.

Same model, same data (the very same token batches), same LoRA (r16 on the seven
Llama linears), same optimizer, same steps. Each side runs in its own process so
peak RSS (ru_maxrss, which includes loading) is that side's own. Prints a table
and writes JSON.

    .venv/bin/python tools/bench_train.py            # SmolLM2-135M, GSM8K, batch 4x128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def edgeft_trainer(args, out: Path):
    from edgeft.cli import quiet_libraries
    from edgeft.workstation.train import Trainer, TrainConfig

    quiet_libraries()
    cfg = TrainConfig(model=args.model, data=args.data, task="causal-lm", out=str(out), eval_data=args.data, scheme="nf4",
                      max_seq_len=args.seq_len, batch_size=args.batch, max_steps=args.warmup + args.steps, lr=2e-4,
                      lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules=MODULES, warmup_ratio=0.0, seed=0, device="cpu")
    trainer = Trainer(cfg, progress=False)
    trainer.prepare_data()
    return trainer


def run_side(args) -> dict:
    """One side, in this process: time `steps` optimizer steps after `warmup`."""
    import torch

    torch.manual_seed(0)
    trainer = edgeft_trainer(args, Path(args.workdir) / "run")  # tokenized data only: identical batches for both sides
    batches = [{k: torch.as_tensor(v) for k, v in trainer.micro_batch(i).items()} for i in range(args.warmup + args.steps)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[args.warmup :])
    if args.side == "edgeft":
        trainer.build_model()
        step = lambda i: trainer.train_step(i)[0]  # noqa: E731
        trainable = trainer.trainable
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, device_map={"": "cpu"}, dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=MODULES, task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, eps=1e-8)
        model.train()

        def step(i):
            loss = model(**batches[i]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    losses = [step(i) for i in range(args.warmup, args.warmup + args.steps)]
    seconds = (time.perf_counter() - t0) / args.steps
    return {"side": args.side, "seconds_per_step": seconds, "tokens_per_second": tokens / (seconds * args.steps),
            "peak_rss_mib": peak_rss_mib(), "trainable_params": trainable, "losses": losses, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "assets/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--data", default=str(ROOT / "assets/data/gsm8k/train.jsonl"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench-results/train.json"))
    ap.add_argument("--side", choices=["edgeft", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    import tempfile

    results = {}
    for side in ("reference", "edgeft"):
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, __file__, "--side", side, "--workdir", work, "--model", args.model, "--data", args.data,
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode:
                sys.exit(f"{side} side failed:\n{proc.stderr[-3000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    e, r = results["edgeft"], results["reference"]
    ratios = {"time_ratio": e["seconds_per_step"] / r["seconds_per_step"], "rss_ratio": e["peak_rss_mib"] / r["peak_rss_mib"]}
    report = {"model": args.model, "data": args.data, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, **results, **ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"SmolLM2 QLoRA (nf4), batch {args.batch}x{args.seq_len}, {args.steps} timed steps, {r['threads']} threads")
    print(f"{'side':<28}{'s/step':>9}{'tokens/s':>10}{'peak RSS MiB':>14}")
    for name, x in (("plain PEFT+bitsandbytes", r), ("edgeft", e)):
        print(f"{name:<28}{x['seconds_per_step']:>9.3f}{x['tokens_per_second']:>10.1f}{x['peak_rss_mib']:>14.0f}")
    print(f"{'edgeft / plain':<28}{ratios['time_ratio']:>9.3f}{'':>10}{ratios['rss_ratio']:>14.3f}")
    print(f"first-step loss: plain {r['losses'][0]:.4f}, edgeft {e['losses'][0]:.4f}  (same batches, same init)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
