"""On-device training on arm64: the aarch64 wheels of stock onnxruntime, under qemu emulation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_training_on_emulated_arm64_matches_x86(tmp_path, cls_bundle):
    """Opt-in (minutes; builds a Debian arm64 root filesystem once): `edgeft device train` inside
    it gives the x86-64 loss curve, on both x86-64 engines, within 1e-4."""
    check = subprocess.run([str(ROOT / "tools" / "arm64-rootfs"), "check"], capture_output=True, text=True)
    if check.returncode:
        pytest.skip(f"no arm64 emulation on this machine: {check.stderr.strip()[-300:]}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("sad movie", "neg")] * 6])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "arm64-proof"), "--bundle", str(cls_bundle), "--data", str(data),
                          "--steps", "6", "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    arm = r["runs"]["arm64 (qemu), portable"]
    assert arm["machine"] == "aarch64" and arm["onnxruntime"] == "1.19.2" and arm["backend"] == "portable"
    assert len(arm["losses"]) == 6 and all(v < 1e-4 for v in r["max_rel"].values()), r["max_rel"]
