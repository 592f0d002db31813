#!/usr/bin/env python
"""Benchmark: edgeft's QLoRA training step vs a plain PEFT + bitsandbytes loop.

Same model, same data (the very same token batches), same LoRA (r16 on the seven
Llama linears), same optimizer, same steps. Each side runs in its own process so
peak RSS (ru_maxrss, which includes loading) is that side's own. Prints a table
and writes JSON.

`--scheme` is edgeft's base (nf4, or an int scheme such as int4-g128, held packed);
the plain side is always the standard QLoRA recipe, bitsandbytes NF4 with double quant
(there is no bitsandbytes int4-g128), so an int scheme is compared with what a user
would otherwise run.

    .venv/bin/python tools/bench_train.py            # SmolLM2-135M, GSM8K, batch 4x128, nf4
    .venv/bin/python tools/bench_train.py --model assets/models/Qwen2.5-Coder-0.5B-Instruct --scheme int4-g128
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


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def edgeft_trainer(args, out: Path):
    from edgeft.cli import quiet_libraries
    from edgeft.workstation.train import Trainer, TrainConfig

    quiet_libraries()
    cfg = TrainConfig(model=args.model, data=args.data, task="causal-lm", out=str(out), eval_data=args.data, scheme=args.scheme,
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
        from edgeft.workstation.packed import packed_stats

        packed_params, packed_bytes = packed_stats(trainer.model)
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
        packed_params = packed_bytes = 0
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, eps=1e-8)
        model.train()

        def step(i):
            loss = model(**batches[i]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

    loaded_rss = current_rss_mib()
    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    losses = [step(i) for i in range(args.warmup, args.warmup + args.steps)]
    seconds = (time.perf_counter() - t0) / args.steps
    return {"side": args.side, "seconds_per_step": seconds, "tokens_per_second": tokens / (seconds * args.steps),
            "peak_rss_mib": peak_rss_mib(), "loaded_rss_mib": loaded_rss, "trainable_params": trainable, "losses": losses,
            "threads": torch.get_num_threads(), "packed_base_params": packed_params, "packed_base_mib": packed_bytes / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "assets/models/SmolLM2-135M-Instruct"), help="a model folder, or several, comma-separated")
    ap.add_argument("--data", default=str(ROOT / "assets/data/gsm8k/train.jsonl"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scheme", default="nf4", help="edgeft's base: nf4 (bitsandbytes) or an int scheme held packed, e.g. int4-g128; "
                                                     "several, comma-separated, share one plain run per model")
    ap.add_argument("--repeat", type=int, default=1, help="run each side this many times, alternating; keep the fastest step time")
    ap.add_argument("--out", help="JSON report (default: bench-results/train-<model>-<scheme>.json, one per pair)")
    ap.add_argument("--side", choices=["edgeft", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    rows = []
    for model in args.model.split(","):
        schemes = args.scheme.split(",")
        runs: dict = {}
        for _ in range(args.repeat):  # alternate the sides, so load from other work on the machine falls on both
            runs.setdefault("reference", []).append(side_in_process(args, "reference", model, "nf4"))
            for scheme in schemes:
                runs.setdefault(scheme, []).append(side_in_process(args, "edgeft", model, scheme))
        reference = best(runs["reference"])
        for scheme in schemes:
            rows.append(report(args, model, scheme, reference, best(runs[scheme])))
    print(f"\nbatch {args.batch}x{args.seq_len}, {args.steps} timed steps after {args.warmup}, {rows[0][2]['threads']} threads, "
          f"best of {args.repeat}; plain = PEFT + bitsandbytes NF4 (double quant)")
    print(f"{'model':<30}{'edgeft base':<12}{'s/step plain':>13}{'edgeft':>8}{'ratio':>7}{'RSS MiB plain':>15}{'edgeft':>8}{'ratio':>7}")
    for model, scheme, r, e, ratios in rows:
        print(f"{Path(model).name:<30}{scheme:<12}{r['seconds_per_step']:>13.3f}{e['seconds_per_step']:>8.3f}{ratios['time_ratio']:>7.3f}"
              f"{r['peak_rss_mib']:>15.0f}{e['peak_rss_mib']:>8.0f}{ratios['rss_ratio']:>7.3f}")
    for model, scheme, r, e, _ in rows:
        packed = f"; {e['packed_base_params'] / 1e6:.0f}M base parameters packed in {e['packed_base_mib']:.0f} MiB" if e["packed_base_params"] else ""
        print(f"{Path(model).name} {scheme}: first-step loss plain {r['losses'][0]:.4f}, edgeft {e['losses'][0]:.4f}{packed}")


def best(runs: list[dict]) -> dict:
    """Of repeated runs of one side: the fastest step time (the least disturbed run), and the
    highest peak RSS (the conservative one); every run's figures are kept."""
    fastest = min(runs, key=lambda r: r["seconds_per_step"])
    return {**fastest, "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "runs": [{k: r[k] for k in ("seconds_per_step", "peak_rss_mib")} for r in runs]}


def side_in_process(args, side: str, model: str, scheme: str) -> dict:
    """One side in a fresh process, so its peak RSS is its own."""
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, __file__, "--side", side, "--workdir", work, "--model", model, "--data", args.data,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--scheme", scheme]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode:
            sys.exit(f"{side} side ({Path(model).name}, {scheme}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, model: str, scheme: str, r: dict, e: dict):
    ratios = {"time_ratio": e["seconds_per_step"] / r["seconds_per_step"], "rss_ratio": e["peak_rss_mib"] / r["peak_rss_mib"]}
    body = {"model": model, "data": args.data, "scheme": scheme, "reference_scheme": "nf4", "batch": args.batch,
            "seq_len": args.seq_len, "steps": args.steps, "reference": r, "edgeft": e, **ratios}
    out = Path(args.out or ROOT / f"bench-results/train-{Path(model).name}-{scheme}.json")
    if args.out and ("," in args.model or "," in args.scheme):
        out = out.with_name(f"{out.stem}-{Path(model).name}-{scheme}{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2))
    print(f"{Path(model).name} {scheme}: time ratio {ratios['time_ratio']:.3f}, RSS ratio {ratios['rss_ratio']:.3f}  (wrote {out})", flush=True)
    return model, scheme, r, e, ratios


if __name__ == "__main__":
    main()
