#!/usr/bin/env python
"""Benchmark the device runtime.

  step    one on-device training step, as `edgeft device train` runs it, on each engine (the
          onnxruntime-training build, and the portable standard-op step on plain ONNX Runtime)
          against PyTorch on the CPU doing the same step: same model (fp32 base + the bundle's
          LoRA), same token batches at the bundle's batch x sequence length, same thread count,
          AdamW. Each side runs in its own process so its peak RSS is its own; the device
          processes cannot import torch. Also FLOP/s achieved against the fp32 matmul peak, each
          side counting its own work (the device projects onto the vocabulary only where a label is).
  curves  N steps of `edgeft device train` on each engine (same bundle, data and seed), and torch
          on the same batches and schedule with the bundle's exact base: the loss curves' largest
          relative differences.
  process one whole `edgeft device train` (data, training, the promotion check) and one `edgeft device
          eval`: each process's peak RSS (the kernel's) against its memory plan, and the share of the
          generation's wall time spent in the promotion check. Default options unless --max-steps /
          --check-rows are given.
  faults  SIGKILL `edgeft device train` at random moments, N times, resuming after each; check that
          no state is ever corrupt, that at most one checkpoint interval is lost each time, and that
          the final weights equal those of an uninterrupted run bit for bit.

    .venv/bin/python tools/bench_device.py step --bundle runs/quickstart-sentiment.bundle --data assets/data/sentiment/shard1.jsonl
    .venv/bin/python tools/bench_device.py curves --bundle runs/quickstart-sentiment.bundle --data assets/data/sentiment/shard1.jsonl --steps 50
    .venv/bin/python tools/bench_device.py process --bundle runs/smollm-pi5.bundle --data assets/data/gsm8k/chat_train.jsonl --rows 100
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
import threading
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
    b, s = m.train_shape.batch, m.train_shape.seq
    tok = DeviceTokenizer(bundle / "tokenizer")
    rows = load_task_rows(data, m.task, m.labels)
    enc = encode_rows(rows, m.task, tok, m.labels, s, warn=lambda _: None)
    enc.sort(key=lambda e: -len(e.input_ids))  # longest rows first: the step the plan must survive
    return [collate(enc[(i * b) % len(enc):(i * b) % len(enc) + b], tok.pad_token_id, pad_to=s) for i in range(n)], m


def side_engine(args) -> dict:
    """The device's own training step (engine + shared AdamW graph), exactly as `device train` runs it."""
    for name in HEAVY:
        sys.modules[name] = None  # the device has none of these
    from edgeft.device.runtime import threads

    if args.ort_defaults:
        ort_defaults()

    bundle = Path(args.bundle)
    data, m = batches(bundle, args.data, args.steps + args.warmup)
    times, losses = device_steps(bundle, m, data, args.side, args.warmup)
    return {"s_per_step": statistics.median(times), "peak_rss_mib": peak_mib(), "losses": losses[:3], "threads": threads(m)}


def device_steps(bundle: Path, m, data: list, side: str, warmup: int) -> tuple[list, list]:
    """(seconds per step after `warmup`, losses): `device train`'s step (engine + AdamW graph) from the bundle's adapter."""
    from safetensors.numpy import load_file

    from edgeft.device.backends import BACKEND_CLASSES, AdamW, Layout

    peft = load_file(str(bundle / "adapter" / "adapter_model.safetensors"))
    start = {onnx: peft[key] for onnx, key in m.trainable.items()}
    layout = Layout({n: v.shape for n, v in start.items()})
    engine = BACKEND_CLASSES[side](bundle, m)
    opt = AdamW(bundle, m, layout, start)
    engine.set_params(layout.views(opt.params))
    times, losses = [], []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        loss = engine.forward_backward(b)
        opt.update(engine.take_grads(), 1e-4)
        engine.set_params(layout.views(opt.params))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    return times, losses


def ort_defaults() -> None:
    """ONNX Runtime's own buffer sharing and spinning pool threads instead of edgeft's session
    settings (edgeft.device.runtime), to measure what those settings are worth."""
    import edgeft.device.backends as backends
    import edgeft.device.runtime as runtime

    configure = runtime.configure_session

    def spinning(ort, options):
        configure(ort, options)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")

    for module in (backends, runtime):
        module.plan_for_training = lambda options: None
        module.configure_session = spinning


def base_folder(args, m) -> str:
    """The bundle's base model on this workstation: the manifest names it and holds its fingerprint, not its path."""
    from edgeft.basemodel import check_base

    folder = Path(args.model) if args.model else ROOT / "assets" / "models" / m.base.name.split("/")[-1]
    check_base(folder, m.base, f"the bundle {args.bundle}")
    return str(folder)


def side_torch(args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    bundle = Path(args.bundle)
    data, m = batches(bundle, args.data, args.steps + args.warmup)
    torch.set_num_threads(args.threads)
    if m.task == "classify":
        base = AutoModelForSequenceClassification.from_pretrained(base_folder(args, m), num_labels=len(m.labels), dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_folder(args, m), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(bundle / "adapter"), is_trainable=True)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0  # the device graph has no dropout either
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-8)
    linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    if m.task != "classify" and model.get_base_model().config.tie_word_embeddings:
        linear += model.get_base_model().get_input_embeddings().weight.numel()  # the tied LM head is a matmul too
    cfg = model.get_base_model().config
    times, losses = [], []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        ids, mask, y = (torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits
        if m.task == "classify":
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
    device_flops = flops
    if m.task != "classify":  # the device projects onto the vocabulary only where a label is
        head = model.get_base_model().get_output_embeddings().weight.numel()
        labelled = statistics.mean(int((b["labels"][:, 1:] != -100).sum()) for b in data[args.warmup:])
        device_flops -= 4 * head * (bsz * seq - labelled)
    return {"s_per_step": statistics.median(times), "peak_rss_mib": peak_mib(), "losses": losses[:3], "flops_per_step": flops,
            "device_flops_per_step": device_flops, "linear_params": linear, "batch": bsz, "seq": seq}


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
           "--warmup", str(args.warmup), "--threads", str(args.threads)] + (["--ort-defaults"] if args.ort_defaults else []) \
        + (["--model", args.model] if args.model else [])
    env = {**os.environ, "EDGEFT_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{side} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step(args) -> dict:
    ort, portable, pt = (child(side, args) for side in ("onnxruntime-training", "portable", "torch"))
    peak = matmul_peak(args.threads)
    result = {"bundle": args.bundle, "batch": pt["batch"], "seq": pt["seq"], "threads": args.threads, "matmul_peak_gflops": peak,
              "onnxruntime-training": ort, "portable": portable, "torch": pt}
    for name, r in (("onnxruntime-training", ort), ("portable", portable), ("torch", pt)):
        r["gflops"] = pt["flops_per_step" if name == "torch" else "device_flops_per_step"] / r["s_per_step"] / 1e9
    for name, r in (("onnxruntime-training", ort), ("portable", portable)):
        result[f"{name}/torch"] = {"time": r["s_per_step"] / pt["s_per_step"], "rss": r["peak_rss_mib"] / pt["peak_rss_mib"]}
    result["portable/onnxruntime-training"] = {"time": portable["s_per_step"] / ort["s_per_step"], "rss": portable["peak_rss_mib"] / ort["peak_rss_mib"]}
    print(f"{Path(args.bundle).name}: batch {pt['batch']} x seq {pt['seq']}, {args.threads} threads, {args.steps} timed steps")
    print(f"{'side':<36}{'s/step':>9}{'peak RSS':>12}{'GFLOP/s':>10}{'of peak':>9}")
    for name, r in (("device, onnxruntime-training", ort), ("device, portable (stock ops)", portable), ("PyTorch CPU, same step", pt)):
        print(f"{name:<36}{r['s_per_step']:>9.3f}{r['peak_rss_mib']:>8.0f} MiB{r['gflops']:>10.1f}{r['gflops'] / peak:>9.0%}")
    for key in ("onnxruntime-training/torch", "portable/torch", "portable/onnxruntime-training"):
        print(f"{'ratio ' + key:<36}{result[key]['time']:>9.3f}{result[key]['rss']:>12.3f}")
    print(f"first losses: training build {ort['losses']}  portable {portable['losses']}  torch {pt['losses']}  (fp32 matmul peak {peak:.1f} GFLOP/s)")
    return result


def side_torch_curve(args) -> dict:
    """torch on the device's own batches and schedule: the workstation model with the bundle's exact
    (dequantized) base, the bundle's adapter, torch.optim.AdamW."""
    import torch

    from edgeft.bundle import read_manifest
    from edgeft.device.trainer import DeviceTrainConfig, DeviceTrainer
    from edgeft.schedule import DEFAULT, lr_at
    from edgeft.schemes import parse_scheme
    from edgeft.workstation.device_model import LossGraph, device_model

    bundle = Path(args.bundle)
    m = read_manifest(bundle)
    torch.set_num_threads(args.threads)
    trainer = DeviceTrainer(bundle, Path(tempfile.mkdtemp()), DeviceTrainConfig(data=args.data, max_steps=args.steps), log=lambda _: None)
    trainer.prepare_data()
    model, _, _ = device_model(bundle / "adapter", parse_scheme(m.scheme), {}, base_folder(args, m), m.labels)
    graph = LossGraph(model, m.task).train()
    params = [p for p in graph.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.0, betas=tuple(m.optimizer["betas"]), eps=m.optimizer["eps"], weight_decay=m.optimizer["weight_decay"])
    peak_lr = 5e-4 if m.task == "classify" else 1e-4  # the device's defaults
    losses = []
    for i in range(args.steps):
        b = trainer.micro_batch(i, 1000 + 0)  # generation 1, seed 0: the device's batch order
        for g in opt.param_groups:
            sched = {**DEFAULT, **(m.schedule or {})}  # as the device trainer reads it
            g["lr"] = lr_at(i, args.steps, peak_lr, sched["name"], sched["warmup_ratio"])
        loss = graph(*(torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels")))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses}


def curves(args) -> dict:
    """`edgeft device train` on each engine, same bundle, data and seed, against torch."""
    work = Path(tempfile.mkdtemp(prefix="edgeft-curves-"))
    runs = {}
    for backend in ("onnxruntime-training", "portable"):
        cmd = [str(ROOT / ".venv/bin/edgeft"), "device", "train", "--bundle", args.bundle, "--data", args.data, "--max-steps", str(args.steps),
               "--backend", backend, "--state", str(work / backend), "--json", "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env={**os.environ, "EDGEFT_THREADS": str(args.threads)})
        if proc.returncode:
            sys.exit(f"{backend} failed:\n{proc.stderr[-3000:]}")
        s = json.loads(proc.stdout)
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
        runs[backend] = {"losses": s["losses"], "train_seconds": s["seconds"], "wall_seconds": time.perf_counter() - t0, "peak_rss_mib": rss}
    runs["torch"] = child("torch-curve", args)
    rel = lambda a, b: max(abs(x - y) / abs(y) for x, y in zip(a, b))  # noqa: E731
    ort, portable, pt = (runs[k]["losses"] for k in ("onnxruntime-training", "portable", "torch"))
    result = {"bundle": args.bundle, "steps": args.steps, "runs": runs,
              "max_rel": {"portable vs onnxruntime-training": rel(portable, ort), "onnxruntime-training vs torch": rel(ort, pt),
                          "portable vs torch": rel(portable, pt)}}
    print(f"{Path(args.bundle).name}: {args.steps} steps of `edgeft device train`, same data and seed")
    for k, v in result["max_rel"].items():
        print(f"  max relative loss difference, {k}: {v:.2e}")
    print(f"  loss: step 1 {ort[0]:.4f}, step {args.steps} {ort[-1]:.4f} (training build); {portable[-1]:.4f} (portable); {pt[-1]:.4f} (torch)")
    shutil.rmtree(work, ignore_errors=True)
    return result


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total / 1024


def timed(cmd: list[str], threads: int, sample: float = 0.0) -> tuple[dict, float, float, str, list]:
    """(JSON summary, wall seconds, the kernel's peak RSS in MiB, stderr, [(seconds, RSS MiB)] every
    `sample` seconds when asked) of one edgeft command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EDGEFT_THREADS": str(threads), "EDGEFT_PROGRESS_SECONDS": "0"})
    samples: list = []
    if sample:
        def watch():
            while proc.poll() is None:
                samples.append((round(time.perf_counter() - t0, 2), round(tree_rss_mib(proc.pid), 1)))
                time.sleep(sample)
        threading.Thread(target=watch, daemon=True).start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[1:4])} failed:\n{err[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024
    return json.loads(out), wall, rss, err, samples


def phase_peaks(samples: list, wall: float, check_seconds: float | None) -> dict:
    """Where a device train's peak was: the sampled RSS before its promotion check (loading and the steps)
    and during it (the check is the run's last `check_seconds`)."""
    split = wall - (check_seconds or 0.0)
    before = [r for t, r in samples if t < split]
    during = [r for t, r in samples if t >= split]
    return {"steps_peak_mib": max(before, default=None), "check_peak_mib": max(during, default=None), "samples": len(samples)}


def process(args) -> dict:
    """The whole `edgeft device train` process (data, training, the promotion check) on --rows rows,
    default engine and options, --generations times on successive slices of --data (the second
    generation's baseline reuses the first one's check of the reference rows), then `edgeft device eval`
    on the last slice: each process's peak RSS (the kernel's, /usr/bin/time) against its memory plan
    (plan.plan_process), and the share of each generation's wall time spent in the promotion check."""
    work = Path(tempfile.mkdtemp(prefix="edgeft-process-"))
    with open(args.data, encoding="utf-8") as f:
        lines = f.readlines()
    edgeft = str(ROOT / ".venv/bin/edgeft")
    gens = []
    for g in range(args.generations):
        data = work / f"data{g + 1}.jsonl"
        data.write_text("".join(lines[g * args.rows:(g + 1) * args.rows]), encoding="utf-8")
        train = [edgeft, "device", "train", "--bundle", args.bundle, "--data", str(data), "--state", str(work / "state"), "--json", "--quiet"]
        train += ["--max-steps", str(args.max_steps)] if args.max_steps else []
        train += ["--check-rows", str(args.check_rows)] if args.check_rows else []
        s, wall, rss, _, samples = timed(train, args.threads, args.sample)
        check = s.get("check") or {}
        gens.append({"generation": s["generation"], "steps": s["steps"], "backend": s["backend"], "train_seconds": s["seconds"],
                     "check": {k: v for k, v in check.items() if k != "correct"}, "check_seconds": check.get("seconds"),
                     "wall_seconds": round(wall, 1), "check_share": round(check["seconds"] / wall, 3) if check.get("seconds") is not None else None,
                     "plan": s["plan"], "plan_mib": s["plan_mib"], "peak_rss_mib": round(rss, 1), "peak_rss_mib_self": s["peak_rss_mib"],
                     "peak_over_plan": round(rss / s["plan_mib"], 3) if s["plan_mib"] else None, "promoted": s["promoted"], "reason": s["reason"]})
        if args.sample:
            gens[-1]["sampled"] = phase_peaks(samples, wall, check.get("seconds"))
        print(f"  generation {s['generation']} done: {json.dumps({k: v for k, v in gens[-1].items() if k != 'plan'})}", flush=True)
    e, e_wall, e_rss, *_ = timed([edgeft, "device", "eval", "--bundle", args.bundle, "--data", str(data), "--state", str(work / "state"),
                                 "--json"], args.threads)
    shutil.rmtree(work, ignore_errors=True)
    result = {"bundle": args.bundle, "rows": args.rows, "threads": args.threads, "generations": gens,
              "eval": {"plan": e.get("plan"), "plan_mib": e.get("plan_mib"), "peak_rss_mib": round(e_rss, 1), "wall_seconds": round(e_wall, 1),
                       "peak_over_plan": round(e_rss / e["plan_mib"], 3) if e.get("plan_mib") else None, "rows": e.get("rows")}}
    print(f"{Path(args.bundle).name}: `edgeft device train` on {args.rows} rows per generation ({gens[0]['backend']}), {args.threads} threads")
    print(f"  {'process':<16}{'steps':>6}{'plan':>10}{'peak RSS':>12}{'peak/plan':>11}{'wall':>9}{'check':>9}{'share':>8}  check rows")
    for r in gens:
        c = r["check"]
        drawn = ", ".join(f"{n} {k}/{c['of'][n]}" for n, k in c.get("drawn", {}).items())
        reused = f"; baseline reused: {', '.join(c['baseline_reused'])}" if c.get("baseline_reused") else ""
        print(f"  {'train, gen ' + str(r['generation']):<16}{r['steps']:>6}{r['plan_mib']:>6.0f} MiB{r['peak_rss_mib']:>8.0f} MiB"
              f"{r['peak_over_plan']:>11.2f}{r['wall_seconds']:>8.1f}s{r['check_seconds'] or 0:>8.1f}s{r['check_share'] or 0:>8.0%}  {drawn}{reused}")
        if r.get("sampled"):
            sp = r["sampled"]
            print(f"    RSS sampled every {args.sample} s: {sp['steps_peak_mib']} MiB before the check, {sp['check_peak_mib']} MiB during it")
    if e.get("plan_mib"):
        print(f"  {'device eval':<16}{'':>6}{e['plan_mib']:>6.0f} MiB{e_rss:>8.0f} MiB{e_rss / e['plan_mib']:>11.2f}{e_wall:>8.1f}s")
    print(f"  train plan: {', '.join(f'{k} {v:.0f}' for k, v in gens[0]['plan']['parts'].items())} (MiB); check: {gens[0]['check'].get('engine')}")
    return result


def faults(args) -> dict:
    """Random SIGKILLs; every resume is checked against the checkpoint on disk and the progress printed."""
    from safetensors.numpy import load_file

    work = Path(tempfile.mkdtemp(prefix="edgeft-faults-"))
    edgeft = str(ROOT / ".venv/bin/edgeft")
    common = ["device", "train", "--bundle", args.bundle, "--data", args.data, "--max-steps", str(args.max_steps or 1000),
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
    for name in ("step", "curves", "process", "faults", "_side"):
        p = sub.add_parser(name)
        if name == "_side":
            p.add_argument("side", choices=["onnxruntime-training", "portable", "torch", "torch-curve"])
        p.add_argument("--bundle", required=True)
        p.add_argument("--data", required=True)
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--kills", type=int, default=20)
        p.add_argument("--max-steps", type=int, default=None, help="faults: steps of each run (default 1000); process: default: one epoch")
        p.add_argument("--check-rows", type=int, help="process: the promotion check's rows per set (default: device train's)")
        p.add_argument("--max-delay", type=float, default=10.0)
        p.add_argument("--every", type=int, default=10)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--rows", type=int, default=200)
        p.add_argument("--generations", type=int, default=1, help="process: generations in a row, each on the next --rows rows")
        p.add_argument("--sample", type=float, default=0.0, help="process: sample the RSS every SAMPLE seconds and report "
                       "the peak before the promotion check and during it")
        p.add_argument("--out")
        p.add_argument("--model", help="the bundle's base model folder (default: assets/models/NAME, NAME from the manifest); "
                       "checked against the manifest's fingerprint")
        p.add_argument("--ort-defaults", action="store_true", help="step: the device sides with ONNX Runtime's default "
                       "buffer sharing and thread spinning, to measure what edgeft's session settings save")
    args = ap.parse_args()
    if args.cmd == "_side":
        sides = {"onnxruntime-training": side_engine, "portable": side_engine, "torch": side_torch, "torch-curve": side_torch_curve}
        print(json.dumps(sides[args.side](args)))
        return
    result = {"step": step, "curves": curves, "process": process, "faults": faults}[args.cmd](args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
