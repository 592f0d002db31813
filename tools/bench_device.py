#!/usr/bin/env python
"""Benchmark the device runtime.

  step    one on-device training step (ONNX Runtime, the bundle's artifacts) against PyTorch on
          the CPU doing the same step: same model (fp32 base + the bundle's LoRA), same token
          batches at the bundle's batch x sequence length, same thread count, AdamW. Each side
          runs in its own process so its peak RSS is its own; the ORT process cannot import torch.
          Also FLOP/s achieved against the measured fp32 matmul peak of this CPU.
  faults  SIGKILL `edgeft device train` at random moments, N times, resuming after each; check that
          no state is ever corrupt, that at most one checkpoint interval is lost each time, and that
          the final weights equal those of an uninterrupted run bit for bit.

    .venv/bin/python tools/bench_device.py step --bundle runs/quickstart-sentiment.bundle --data assets/data/sentiment/shard1.jsonl
    .venv/bin/python tools/bench_device.py faults --bundle runs/quickstart-sentiment.bundle --data assets/data/sentiment/shard1.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optimum")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(bundle: Path, data: str, n: int) -> tuple[list[dict], dict]:
    """n full-size batches (batch x seq, padded to seq) of real rows, tokenized as the device does."""
    from edgeft.bundle import read_manifest
    from edgeft.datasets import load_task_rows
    from edgeft.device.data import encode_rows
    from edgeft.device.tokenizer import DeviceTokenizer
    from edgeft.encode import collate

    m = read_manifest(bundle)
    b, s = m["train_shape"]["batch"], m["train_shape"]["seq"]
    tok = DeviceTokenizer(bundle / "tokenizer")
    rows = load_task_rows(data, m["task"], m["labels"])
    enc = encode_rows(rows, m["task"], tok, m["labels"], s, warn=lambda _: None)
    enc.sort(key=lambda e: -len(e.input_ids))  # longest rows first: the step the plan must survive
    return [collate(enc[(i * b) % len(enc):(i * b) % len(enc) + b], tok.pad_token_id, pad_to=s) for i in range(n)], m


def side_ort(args) -> dict:
    for name in HEAVY:
        sys.modules[name] = None  # the device has none of these
    from edgeft.device.runtime import training_api, training_session

    bundle = Path(args.bundle)
    data, m = batches(bundle, args.data, args.steps + args.warmup)
    api = training_api(m)
    state = api.CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
    device, options = training_session(m)
    module = api.Module(str(bundle / "training_model.onnx"), state, str(bundle / "eval_model.onnx"), device=device, session_options=options)
    opt = api.Optimizer(str(bundle / "optimizer_model.onnx"), module)
    opt.set_learning_rate(1e-4)
    times, losses = [], []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        loss = module(b["input_ids"], b["attention_mask"], b["labels"])
        opt.step()
        module.lazy_reset_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"s_per_step": statistics.median(times), "peak_rss_mib": peak_mib(), "losses": losses[:3], "threads": options.intra_op_num_threads}


def side_torch(args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    bundle = Path(args.bundle)
    data, m = batches(bundle, args.data, args.steps + args.warmup)
    torch.set_num_threads(args.threads)
    if m["task"] == "classify":
        base = AutoModelForSequenceClassification.from_pretrained(m["base_model"], num_labels=len(m["labels"]), dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(m["base_model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(bundle / "adapter"), is_trainable=True)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0  # the device graph has no dropout either
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-8)
    linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    if m["task"] != "classify" and model.get_base_model().config.tie_word_embeddings:
        linear += model.get_base_model().get_input_embeddings().weight.numel()  # the tied LM head is a matmul too
    cfg = model.get_base_model().config
    times, losses = [], []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        ids, mask, y = (torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits
        if m["task"] == "classify":
            loss = torch.nn.functional.cross_entropy(logits, y)
        else:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    bsz, seq = data[0]["input_ids"].shape
    # forward 2N per token, backward 2N (input gradients only: the base is frozen), attention QK^T and AV
    flops = 4 * linear * bsz * seq + 3 * 4 * bsz * seq * seq * cfg.hidden_size * cfg.num_hidden_layers
    return {"s_per_step": statistics.median(times), "peak_rss_mib": peak_mib(), "losses": losses[:3], "flops_per_step": flops,
            "linear_params": linear, "batch": bsz, "seq": seq}


def matmul_peak(threads: int) -> float:
    """Achievable fp32 GFLOP/s on this CPU: large square matmuls through numpy's BLAS."""
    code = ("import numpy as np, time\n"
            "a = np.random.rand(2048, 2048).astype(np.float32); b = a.copy(); a @ b\n"
            "t = time.perf_counter(); n = 10\n"
            "for _ in range(n): a @ b\n"
            "print(2 * 2048**3 * n / (time.perf_counter() - t) / 1e9)")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout)


def child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "_side", side, "--bundle", args.bundle, "--data", args.data, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "EDGEFT_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{side} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step(args) -> dict:
    ort, pt = child("ort", args), child("torch", args)
    peak = matmul_peak(args.threads)
    flops = pt["flops_per_step"]
    result = {"bundle": args.bundle, "batch": pt["batch"], "seq": pt["seq"], "threads": args.threads, "ort": ort, "torch": pt,
              "time_ratio": ort["s_per_step"] / pt["s_per_step"], "rss_ratio": ort["peak_rss_mib"] / pt["peak_rss_mib"],
              "matmul_peak_gflops": peak, "ort_gflops": flops / ort["s_per_step"] / 1e9, "torch_gflops": flops / pt["s_per_step"] / 1e9}
    print(f"{Path(args.bundle).name}: batch {pt['batch']} x seq {pt['seq']}, {args.threads} threads, {args.steps} timed steps")
    print(f"{'side':<28}{'s/step':>9}{'peak RSS':>12}{'GFLOP/s':>10}{'of peak':>9}")
    for name, r, g in (("edgeft device (ORT)", ort, result["ort_gflops"]), ("PyTorch CPU, same step", pt, result["torch_gflops"])):
        print(f"{name:<28}{r['s_per_step']:>9.3f}{r['peak_rss_mib']:>8.0f} MiB{g:>10.1f}{g / peak:>9.0%}")
    print(f"{'ratio ORT / torch':<28}{result['time_ratio']:>9.3f}{result['rss_ratio']:>12.3f}")
    print(f"first losses: ORT {ort['losses']}  torch {pt['losses']}  (fp32 matmul peak {peak:.1f} GFLOP/s)")
    return result


def faults(args) -> dict:
    """Random SIGKILLs; every resume is checked against the checkpoint on disk and the progress printed."""
    from safetensors.numpy import load_file

    work = Path(tempfile.mkdtemp(prefix="edgeft-faults-"))
    edgeft = str(ROOT / ".venv/bin/edgeft")
    common = ["device", "train", "--bundle", args.bundle, "--data", args.data, "--max-steps", str(args.max_steps),
              "--checkpoint-every", str(args.every), "--json"]
    env = {**os.environ, "EDGEFT_PROGRESS_SECONDS": "0"}
    t0 = time.perf_counter()
    clean = subprocess.run([edgeft, *common, "--quiet", "--state", str(work / "clean")], capture_output=True, text=True, env=env)
    if clean.returncode:
        sys.exit(clean.stderr[-3000:])
    clean_seconds = time.perf_counter() - t0
    rng = random.Random(args.seed)
    state = work / "killed"
    kills, records, finished = 0, [], None
    while kills < args.kills:
        proc = subprocess.Popen([edgeft, *common, "--state", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        delay = rng.uniform(0.5, args.max_delay)
        try:
            out, err = proc.communicate(timeout=delay)
            finished = (out, err)
            break  # it finished before this kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate()
        kills += 1
        done = [int(x) for x in re.findall(r"step (\d+)/", err)]
        resumed = [int(x) for x in re.findall(r"resuming generation \d+ at step (\d+)", err)]
        check = integrity(state)
        records.append({"kill": kills, "after_s": round(delay, 2), "steps_done": max(done) if done else None,
                        "started_at": resumed[0] if resumed else 0, "checkpoint_step": check["checkpoint_step"], "ok": check["ok"],
                        "problem": check.get("problem")})
    if finished is None:
        final = subprocess.run([edgeft, *common, "--quiet", "--state", str(state)], capture_output=True, text=True, env=env)
        if final.returncode:
            sys.exit(final.stderr[-3000:])
    # steps lost at kill k = steps done before it - the step the next run resumed at
    for k, r in enumerate(records):
        nxt = records[k + 1]["started_at"] if k + 1 < len(records) else None
        r["resumed_at"] = nxt if nxt is not None else (r["checkpoint_step"] or 0)
        r["lost"] = max(0, (r["steps_done"] or r["resumed_at"]) - r["resumed_at"])
    a = load_file(str(work / "clean" / "generations" / "g0001.safetensors"))
    b = load_file(str(state / "generations" / "g0001.safetensors"))
    identical = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    result = {"kills": kills, "corrupt": sum(not r["ok"] for r in records), "max_lost": max((r["lost"] for r in records), default=0),
              "interval": args.every, "within_interval": sum(r["lost"] <= args.every for r in records), "final_identical": bool(identical),
              "records": records}
    if kills < args.kills:
        print(f"note: the job finished after {kills} kills; raise --max-steps for more")
    print(f"{kills} SIGKILLs at random moments (0.5-{args.max_delay:.0f} s into each run; an uninterrupted run takes {clean_seconds:.0f} s), "
          f"checkpoint every {args.every} steps:")
    print(f"  resumed {kills - result['corrupt']}/{kills}, corrupt states {result['corrupt']}, "
          f"steps lost <= interval in {result['within_interval']}/{kills} (max lost {result['max_lost']})")
    print(f"  final generation bit-identical to an uninterrupted run: {identical}")
    shutil.rmtree(work, ignore_errors=True)
    return result


def integrity(state: Path) -> dict:
    """Everything a resume relies on must parse: state.json, each generation, the job and its checkpoint."""
    from safetensors.numpy import load_file

    out = {"ok": True, "checkpoint_step": None}
    try:
        if (state / "state.json").exists():
            json.loads((state / "state.json").read_text())
        for f in (state / "generations").glob("*.safetensors") if (state / "generations").exists() else []:
            load_file(str(f))
        if (state / "job" / "job.json").exists():
            json.loads((state / "job" / "job.json").read_text())
        ckpt = state / "job" / "last.safetensors"
        if ckpt.exists():
            from edgeft.device.state import load_checkpoint

            _, meta = load_checkpoint(ckpt)
            out["checkpoint_step"] = json.loads(meta["edgeft"])["step"]
    except Exception as e:  # noqa: BLE001 - any failure here is exactly what the benchmark counts
        out.update(ok=False, problem=str(e)[:300])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("step", "faults", "_side"):
        p = sub.add_parser(name)
        if name == "_side":
            p.add_argument("side", choices=["ort", "torch"])
        p.add_argument("--bundle", required=True)
        p.add_argument("--data", required=True)
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--kills", type=int, default=20)
        p.add_argument("--max-steps", type=int, default=1000)
        p.add_argument("--max-delay", type=float, default=10.0)
        p.add_argument("--every", type=int, default=10)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out")
    args = ap.parse_args()
    if args.cmd == "_side":
        print(json.dumps((side_ort if args.side == "ort" else side_torch)(args)))
        return
    result = step(args) if args.cmd == "step" else faults(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
