#!/usr/bin/env python
"""Benchmark: `edgeft export` wall time, peak RSS, bundle size per scheme, and parity.

Each export runs as its own `edgeft export` process under /usr/bin/time -v, so the
peak RSS is the export's alone. Needs trained runs (the quickstart makes the MiniLM
one; --smollm-run names a SmolLM2 run; --run NAME=DIR adds any other causal-LM run, e.g.
Gemma-3-270M, exported at int4-g128 as SmolLM2 is; BENCHMARKS.md gives the train commands).

    .venv/bin/python tools/bench_export.py --minilm-run runs/quickstart-sentiment --smollm-run runs/smollm-pi5
    .venv/bin/python tools/bench_export.py --schemes --run gemma-3-270m=runs/gemma-270m-pi5

Each row also splits the bundle's bytes by what they hold (base, adapter, tokenizer, graphs, other)
per base parameter, read from the bundle's manifest. EDGEFT_PROFILE=1 in the environment passes on
to each export (its stage-by-stage memory goes to stderr, kept in the row as "profile").
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = """name = "bench-{scheme}"
arch = "aarch64"
[memory]
ram_mb = 8192
budget_mb = 8192
[compute]
threads = 4
execution_providers = ["CPUExecutionProvider"]
[quantization]
scheme = "{scheme}"
[training]
max_seq_len = 128
batch_size = 4
"""


def export(run: str, scheme: str, work: Path) -> dict:
    target = work / f"{scheme}.toml"
    target.write_text(TARGET.format(scheme=scheme))
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv/bin/edgeft"), "export", "--run", run, "--target", str(target),
           "--out", str(work / f"bundle-{scheme}"), "--overwrite", "--json", "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"export {run} {scheme} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        shutil.rmtree(work / f"bundle-{scheme}", ignore_errors=True)
        return {"failed": next((line for line in proc.stderr.splitlines() if line.startswith("Error")), f"exit {proc.returncode}"),
                "wall_seconds": _time_field(proc.stderr, r"Elapsed \(wall clock\) time .*: (.+)"),
                "peak_rss_mib": int(_time_field(proc.stderr, r"Maximum resident set size \(kbytes\): (\d+)")) / 1024,
                "profile": [line for line in proc.stderr.splitlines() if line.startswith("profile:")]}
    summary = json.loads(proc.stdout)
    summary["parts"] = bundle_parts(work / f"bundle-{scheme}", summary["base_params"])
    summary["profile"] = [line for line in proc.stderr.splitlines() if line.startswith("profile:")]
    shutil.rmtree(work / f"bundle-{scheme}")
    summary["wall_seconds"] = _time_field(proc.stderr, r"Elapsed \(wall clock\) time .*: (.+)")
    summary["peak_rss_mib"] = int(_time_field(proc.stderr, r"Maximum resident set size \(kbytes\): (\d+)")) / 1024
    return summary


def bundle_parts(bundle: Path, base_params: int) -> dict:
    """Bytes per base parameter by what the files hold (manifest's file list)."""
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    parts = dict.fromkeys(("base", "adapter", "tokenizer", "graphs", "other"), 0)
    for name, entry in files.items():
        if name in ("base.safetensors", "checkpoint", "portable/frozen.safetensors") or name.endswith(".onnx.data"):
            key = "base"  # (older bundles: the checkpoint and the portable copy held the base too)
        elif name.startswith(("adapter/", "tokenizer/")):
            key = name.split("/")[0]
        elif name.endswith(".onnx"):
            key = "graphs"
        else:
            key = "other"
        parts[key] += entry["bytes"]
    return {k: round(v / max(base_params, 1), 4) for k, v in parts.items()}


def _time_field(text: str, pattern: str):
    value = re.search(pattern, text).group(1)
    if ":" in value:
        parts = [float(x) for x in value.split(":")]
        return sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm-run", default=str(ROOT / "runs/quickstart-sentiment"))
    ap.add_argument("--smollm-run", help="a SmolLM2 run directory (edgeft train --task causal-lm)")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="another run to export at int4-g128")
    ap.add_argument("--schemes", nargs="*", default=["int8", "int4-g128", "int4-g32", "nf4", "int3-g32", "int2-g32"])
    ap.add_argument("--out", default=str(ROOT / "bench-results/export.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        jobs = [("all-MiniLM-L6-v2", args.minilm_run, s) for s in args.schemes]
        if args.smollm_run:
            jobs.append(("SmolLM2-135M", args.smollm_run, "int4-g128"))
        jobs += [(*spec.split("=", 1), "int4-g128") for spec in args.run]
        for model, run, scheme in jobs:
            s = export(run, scheme, Path(work))
            print("\n".join(s["profile"]), flush=True)
            if "failed" in s:
                rows.append({"model": model, "scheme": scheme, **s})
                print(f"{model:<18}{scheme:<11} FAILED after {s['wall_seconds']:.1f} s, peak RSS {s['peak_rss_mib']:.0f} MiB: {s['failed']}", flush=True)
                continue
            s["bundle_bytes_per_base_param"] = round(s["bundle_bytes"] / max(s["base_params"], 1), 4)
            rows.append({"model": model, **{k: s[k] for k in ("scheme", "wall_seconds", "peak_rss_mib", "export_seconds", "base_params",
                                                                "base_bytes_per_param", "bundle_bytes", "bundle_bytes_per_base_param",
                                                                "parts", "parity", "profile")}})
            p = s["parity"]
            print(f"{model:<18}{scheme:<11} wall {s['wall_seconds']:6.1f} s  RSS {s['peak_rss_mib']:6.0f} MiB  base {s['base_bytes_per_param']:.3f} B/param  "
                  f"bundle {s['bundle_bytes'] / 2**20:6.1f} MiB = {s['bundle_bytes_per_base_param']:.3f} B/param {s['parts']}  "
                  f"logits rel {p['logits_rel']:.1e}  grad rel {p['grad_rel']:.1e}  portable grad rel {p.get('portable_grad_rel', float('nan')):.1e}  "
                  f"step {p['step_max_abs']:.1e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
