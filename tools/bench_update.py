#!/usr/bin/env python
"""Benchmark: adapter-only updates. Bytes of an update against its bundle, and the time to make it
(`edgeft export --update-for`, workstation) and to apply it (`edgeft device apply-update`, device).

Each command runs as its own process under /usr/bin/time -v (wall time and peak RSS include the
interpreter and library imports, as a user sees them); "inside" is the command's own figure
(`seconds` in its --json), without start-up. The device command runs in a scratch state folder,
so the bundle's own state is not touched. Needs a bundle and a second run on the same base, target
and LoRA options (BENCHMARKS.md section 4 gives the commands).

    .venv/bin/python tools/bench_update.py --bundle runs/quickstart-sentiment.bundle --run runs/sentiment-v2 [--name all-MiniLM-L6-v2]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> tuple[dict, float, float]:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time .*: (.+)", proc.stderr).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return json.loads(proc.stdout), seconds, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--run", required=True, help="a run on the bundle's base, target and LoRA options")
    ap.add_argument("--name", help="model name for the table (default: the bundle's base)")
    ap.add_argument("--out", default=str(ROOT / "bench-results/update.json"))
    args = ap.parse_args()
    edgeft = str(ROOT / ".venv/bin/edgeft")
    with tempfile.TemporaryDirectory() as work:
        update = Path(work) / "update"
        made, make_wall, make_rss = timed([edgeft, "export", "--run", args.run, "--update-for", args.bundle, "--out", str(update), "--json"])
        applied, apply_wall, apply_rss = timed([edgeft, "device", "apply-update", "--bundle", args.bundle, "--state", str(Path(work) / "state"),
                                                str(update), "--json"])
    row = {"model": args.name or made["base"]["name"], "scheme": made["scheme"], "target": made["target"], "tensors": made["tensors"],
           "trainable_params": made["trainable_params"], "update_bytes": made["update_bytes"], "bundle_bytes": made["bundle_bytes"],
           "ratio": made["ratio"], "make_wall_s": round(make_wall, 2), "make_inside_s": made["seconds"], "make_check_s": made["check_seconds"],
           "make_peak_rss_mib": round(make_rss), "apply_wall_s": round(apply_wall, 2), "apply_inside_s": applied["seconds"],
           "apply_peak_rss_mib": round(apply_rss), "logits_rel": made["parity"]["logits_rel"], "promoted": applied["promoted"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print("| model | scheme | trainable params | update | bundle | update/bundle | make (inside; parity check) | make peak RSS "
          "| apply (inside) | apply peak RSS | logits rel |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {row['model']} | {row['scheme']} | {row['trainable_params']:,} | {row['update_bytes'] / 2**20:.2f} MiB "
          f"| {row['bundle_bytes'] / 2**20:.1f} MiB | {row['ratio'] * 100:.1f}% | {row['make_wall_s']:.1f} s ({row['make_inside_s']:.1f} s; "
          f"{row['make_check_s']:.1f} s) | {row['make_peak_rss_mib']} MiB | {row['apply_wall_s']:.2f} s ({row['apply_inside_s']:.3f} s) "
          f"| {row['apply_peak_rss_mib']} MiB | {row['logits_rel']:.1e} |")


if __name__ == "__main__":
    main()
