#!/usr/bin/env python
"""Image classification end to end, on real weights and real data (BENCHMARKS.md, section 12).

  story  EfficientNet-Lite0 (ImageNet) fine-tuned on the workstation for solar-cell defects on
         monocrystalline cells (elpv, CC-BY-NC-SA-4.0), exported for a device profile, then adapted
         on the device, without torch, to polycrystalline cells it never saw, in two generations
         (two folders of new images). Accuracy on both test sets after each step; export time,
         bundle size, parity; each device generation's time and peak RSS.
  step   one device training step (the portable standard-op step and the onnxruntime-training
         build, as `edgeft device train` runs them) against PyTorch on the CPU doing the same step:
         the same model (the bundle's int8 base values + LoRA), the same image batch, AdamW, the
         same threads. Each side in its own process, so its peak RSS is its own.

    .venv/bin/python tools/prepare_assets.py            # assets/models/efficientnet-lite0, assets/data/elpv
    .venv/bin/python tools/bench_vision.py story --out runs/elpv --json runs/elpv-story.json
    .venv/bin/python tools/bench_vision.py step --bundle runs/elpv/bundle --json runs/elpv-step.json

Every command the story runs is printed before it runs; together they are the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "models" / "efficientnet-lite0"
DATA = ROOT / "assets" / "data" / "elpv"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optimum")


def edgeft(python: str, *args, timed: bool = False) -> tuple[dict, float, float]:
    """(its --json output, wall seconds, peak RSS MiB) of one edgeft command, run as a user runs it."""
    cmd = [python, "-m", "edgeft", *map(str, args), "--json"]
    print("$", " ".join(str(a) for a in cmd[1:]).replace(str(ROOT) + "/", ""), flush=True)
    if timed:
        cmd = ["/usr/bin/time", "-f", "%M", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = float(proc.stderr.strip().splitlines()[-1]) / 1024 if timed else 0.0
    return json.loads(proc.stdout), wall, rss


def story(args) -> dict:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ws, dev = args.python, args.device_python
    tests = {"mono_test": DATA / "test.jsonl", "poly_test": DATA / "poly_test.jsonl"}
    result: dict = {"target": args.target, "image_size": args.image_size, "epochs": args.epochs, "reference_loss_rise": args.reference_loss_rise,
                    "rows": {}}
    s, wall, rss = edgeft(ws, "train", "--model", MODEL, "--task", "image-classify", "--data", DATA / "train.jsonl", "--eval-data",
                          DATA / "val.jsonl", "--target", args.target, "--image-size", args.image_size, "--epochs", args.epochs,
                          "--lora-r", args.lora_r, "--out", out / "run", "--quiet", timed=True)
    result["train"] = {"seconds": round(wall, 1), "peak_rss_mib": round(rss), "steps": s["steps"], "s_per_step": s["seconds_per_step"],
                       "trainable_params": s["trainable_params"], "val_before": s["before"], "val_best": s["best"], "scheme": s["scheme"]}
    rows = result["rows"]
    for name, path in tests.items():
        m, _, _ = edgeft(ws, "eval", "--adapter", out / "run", "--data", path)
        rows.setdefault("workstation (int8 base, torch)", {})[name] = m["accuracy"]
    for quant in args.also_quant:
        for name, path in tests.items():
            m, _, _ = edgeft(ws, "eval", "--adapter", out / "run", "--data", path, "--quant", quant)
            rows.setdefault(f"same adapter on a {quant} base (torch)", {})[name] = m["accuracy"]
    e, wall, rss = edgeft(ws, "export", "--run", out / "run", "--target", args.target, "--out", out / "bundle", timed=True)
    result["export"] = {"seconds": round(wall, 1), "export_seconds": e["export_seconds"], "peak_rss_mib": round(rss),
                        "bundle_mib": round(e["bundle_bytes"] / 2**20, 2), "base_bytes_per_param": e["base_bytes_per_param"],
                        "parity": e["parity"], "plan_mib": round(e["memory_plan"]["total_mib"])}
    bundle, state = out / "bundle", out / "state"

    def device_eval(label: str, generation: int | None = None) -> None:
        for name, path in tests.items():
            extra = ["--generation", generation] if generation is not None else []
            m, _, _ = edgeft(dev, "device", "eval", "--bundle", bundle, "--state", state, "--data", path, *extra)
            rows.setdefault(label, {})[name] = m["accuracy"]

    device_eval("device generation 0 (the bundle)")
    result["generations"] = []
    for gen in ("gen1", "gen2"):
        g, wall, rss = edgeft(dev, "device", "train", "--bundle", bundle, "--state", state, "--data", DATA / gen, "--eval-data",
                              DATA / "poly_val.jsonl", "--epochs", args.device_epochs, "--reference-loss-rise", args.reference_loss_rise,
                              "--quiet", timed=True)
        result["generations"].append({"data": gen, "generation": g["generation"], "promoted": g["promoted"], "reason": g.get("reason"),
                                      "steps": g["steps"], "seconds": round(wall, 1), "peak_rss_mib": round(rss),
                                      "train_seconds": g.get("seconds"), "process_peak_rss_mib": g.get("peak_rss_mib"), "plan_mib": g.get("plan_mib")})
        device_eval(f"device generation {g['generation']} ({gen}: {'promoted' if g['promoted'] else 'rejected'})", g["generation"])
    print_story(result)
    return result


def print_story(r: dict) -> None:
    t, e = r["train"], r["export"]
    print(f"\nEfficientNet-Lite0 on elpv (defective vs functional), {r['image_size']} px, target {r['target']} ({t['scheme']})")
    print(f"workstation: {t['steps']} steps in {t['seconds']} s ({t['s_per_step']} s/step), peak {t['peak_rss_mib']} MiB; "
          f"val accuracy {t['val_before']['accuracy']:.3f} (new head) -> {t['val_best']:.3f}")
    print(f"export: {e['seconds']} s (peak {e['peak_rss_mib']} MiB), bundle {e['bundle_mib']} MiB, parity grad rel "
          f"{e['parity']['grad_rel']:.1e} / portable {e['parity']['portable_grad_rel']:.1e} (vs torch float64)")
    print(f"{'':<52}{'mono test':>10}{'poly test':>10}")
    for name, acc in r["rows"].items():
        print(f"{name:<52}{acc['mono_test']:>10.3f}{acc['poly_test']:>10.3f}")
    for g in r.get("generations", []):
        print(f"device {g['data']}: generation {g['generation']} {'promoted' if g['promoted'] else 'rejected'} ({g['reason']}), "
              f"{g['steps']} steps, {g['seconds']} s, peak RSS {g['peak_rss_mib']} MiB (plan {g['plan_mib']})")


# -- step: device vs torch --------------------------------------------------------------
def image_batches(bundle: Path, n: int, data: Path):
    """(n batches, made one at a time as `device train` collates them, and the manifest): the first
    4 x batch images of `data` as the device decodes and crops them, cycled."""
    from edgeft.bundle import read_manifest
    from edgeft.datasets import load_task_rows
    from edgeft.images import ImageEncoder

    m = read_manifest(bundle)
    rows = load_task_rows(data, m.task, m.labels)
    enc = ImageEncoder.for_manifest(m)
    b = m.train_shape.batch
    items = enc.encode(rows[: b * min(n, 4)], m.labels)
    return (enc.collate_items([items[(i * b + j) % len(items)] for j in range(b)]) for i in range(n)), m


def side_engine(args) -> dict:
    for name in HEAVY:
        sys.modules[name] = None
    from bench_device import device_steps  # tools/ is this script's folder

    bundle = Path(args.bundle)
    data, m = image_batches(bundle, args.steps + args.warmup, Path(args.data))
    times, losses = device_steps(bundle, m, data, args.side, args.warmup)
    losses = [round(float(loss), 5) for loss in losses]
    return {"s_per_step": statistics.median(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses[:3]}


def side_torch(args) -> dict:
    import torch
    from peft import PeftModel

    from edgeft.schemes import parse_scheme
    from edgeft.workstation.vision_model import load_vision_base

    bundle = Path(args.bundle)
    data, m = image_batches(bundle, args.steps + args.warmup, Path(args.data))
    torch.set_num_threads(args.threads)
    base = load_vision_base(MODEL, parse_scheme(m.scheme), m.labels)
    model = PeftModel.from_pretrained(base, str(bundle / "adapter"), is_trainable=True)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0  # the device graph has none either
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, eps=1e-8)
    times, losses = [], []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(b["pixel_values"])), torch.from_numpy(b["labels"]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 5))
    return {"s_per_step": statistics.median(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses[:3]}


def step(args) -> dict:
    def child(side: str, python: str) -> dict:
        cmd = [python, __file__, "_side", side, "--bundle", args.bundle, "--data", args.data, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        env = {**os.environ, "EDGEFT_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{side} side failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}", file=sys.stderr)
            return {"error": f"exit {proc.returncode}", "s_per_step": float("nan"), "peak_rss_mib": float("nan"), "losses": []}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    sides = {"portable": child("portable", args.device_python), "onnxruntime-training": child("onnxruntime-training", args.device_python),
             "torch": child("torch", args.python)}
    pt = sides["torch"]
    from edgeft.bundle import read_manifest

    m = read_manifest(Path(args.bundle))
    result = {"bundle": args.bundle, "batch": m.train_shape.batch, "image_size": m.train_shape.seq, "threads": args.threads, **sides}
    print(f"{Path(args.bundle).name}: batch {m.train_shape.batch} x 3 x {m.train_shape.seq} x {m.train_shape.seq}, {args.threads} threads, "
          f"{args.steps} timed steps (median)")
    print(f"{'side':<36}{'s/step':>9}{'peak RSS':>12}{'time/torch':>12}{'RSS/torch':>11}")
    for name, r in sides.items():
        r["time/torch"], r["rss/torch"] = r["s_per_step"] / pt["s_per_step"], r["peak_rss_mib"] / pt["peak_rss_mib"]
        print(f"{name:<36}{r['s_per_step']:>9.3f}{r['peak_rss_mib']:>8.0f} MiB{r['time/torch']:>12.3f}{r['rss/torch']:>11.3f}")
    print("first losses: " + "  ".join(f"{k} {v['losses']}" for k, v in sides.items()))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    python = str(ROOT / ".venv" / "bin" / "python")
    device_python = str(ROOT / ".venv-device" / "bin" / "python")
    for name in ("story", "step", "_side"):
        p = sub.add_parser(name)
        p.add_argument("--python", default=python if Path(python).exists() else sys.executable, help="the workstation's Python")
        p.add_argument("--device-python", default=device_python if Path(device_python).exists() else sys.executable,
                       help="a torch-free Python with edgeft[device] (default .venv-device)")
        p.add_argument("--json", help="write the result here")
        if name == "story":
            p.add_argument("--out", default="runs/elpv")
            p.add_argument("--target", default="raspberry-pi-5-8gb")
            p.add_argument("--image-size", type=int, default=160)
            p.add_argument("--epochs", type=float, default=2.0)
            p.add_argument("--device-epochs", type=float, default=1.0)
            p.add_argument("--lora-r", type=int, default=16)
            p.add_argument("--also-quant", nargs="*", default=["int4-g32"], help="score the adapter on these bases too")
            # the device moves to a visibly new kind of cell and the old kind is judged on accuracy: the guard's default
            # (0.05, set for tweets) rejects both generations here (BENCHMARKS.md section 12)
            p.add_argument("--reference-loss-rise", type=float, default=0.25)
        else:
            if name == "_side":
                p.add_argument("side")
            p.add_argument("--bundle", required=True)
            p.add_argument("--data", default=str(DATA / "gen1"))
            p.add_argument("--steps", type=int, default=5)
            p.add_argument("--warmup", type=int, default=1)
            p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "_side":
        print(json.dumps(side_torch(args) if args.side == "torch" else side_engine(args)))
        return
    result = story(args) if args.cmd == "story" else step(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
