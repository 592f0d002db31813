"""The device side never imports torch, transformers, peft or bitsandbytes."""

import json
import os
import platform
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import device, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optimum")
BLOCK = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in HEAVY)


def device_venv(tmp_path, *installs: list[str]):
    """A fresh venv with only what `installs` (pip argument lists) bring; returns (python, run edgeft)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    for args in installs:
        pip = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True, text=True, timeout=900)
        assert pip.returncode == 0, pip.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": ""}

    def cli(*args):
        return subprocess.run([str(env_dir / "bin" / "edgeft"), *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    return py, cli


def test_device_commands_run_with_torch_unimportable(tmp_path, cls_bundle):
    """Same interpreter, but any import of a workstation library fails at once."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("sad movie", "neg")] * 6])
    code = BLOCK + f"""
from edgeft.cli import main
for args in (["device", "train", "--bundle", {str(cls_bundle)!r}, "--state", {str(tmp_path / 's')!r}, "--data", {str(data)!r}, "--max-steps", "2", "--quiet"],
             ["device", "eval", "--bundle", {str(cls_bundle)!r}, "--state", {str(tmp_path / 's')!r}, "--data", {str(data)!r}],
             ["device", "predict", "--bundle", {str(cls_bundle)!r}, "--state", {str(tmp_path / 's')!r}, "--text", "i loved it"],
             ["device", "export-adapter", "--bundle", {str(cls_bundle)!r}, "--state", {str(tmp_path / 's')!r}, "--out", {str(tmp_path / 'a')!r}],
             ["device", "status", "--bundle", {str(cls_bundle)!r}, "--state", {str(tmp_path / 's')!r}]):
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        assert not e.code, (args, e.code)
loaded = [m for m in {HEAVY!r} if sys.modules.get(m) is not None]
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.ci
def test_device_extra_installs_and_runs_without_torch(tmp_path, cls_bundle, lm_bundle):
    """A fresh venv with only `pip install edgeft[device]`, as on a Raspberry Pi or Jetson."""
    py, cli = device_venv(tmp_path, [f"{ROOT}[device]"])
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & set(HEAVY), names & set(HEAVY)
    # pyproject's markers decide which ONNX Runtime: the training build on x86-64 with Python <= 3.12, stock elsewhere; never both
    training = platform.machine() == "x86_64" and sys.version_info < (3, 13)
    ort, other = ("onnxruntime-training-cpu", "onnxruntime") if training else ("onnxruntime", "onnxruntime-training-cpu")
    assert {ort, "tokenizers", "numpy", "safetensors"} <= names and other not in names, sorted(names)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("sad movie", "neg")] * 6])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "what is two plus two?", "completion": " four"}] * 8)
    for args in (["device", "train", "--bundle", cls_bundle, "--state", tmp_path / "s", "--data", data, "--max-steps", "2", "--quiet", "--json"],
                 ["device", "predict", "--bundle", cls_bundle, "--state", tmp_path / "s", "--text", "i loved it", "--json"],
                 ["device", "export-adapter", "--bundle", cls_bundle, "--state", tmp_path / "s", "--out", tmp_path / "a"],
                 ["device", "train", "--bundle", lm_bundle, "--state", tmp_path / "l", "--data", chat, "--max-steps", "2", "--quiet"],
                 ["device", "generate", "--bundle", lm_bundle, "--state", tmp_path / "l", "--prompt", "what is two plus two?", "--max-new-tokens", "3"],
                 ["device", "status", "--bundle", lm_bundle, "--state", tmp_path / "l"],
                 ["--version"]):
        out = cli(*args)
        assert out.returncode == 0, (args, out.stdout[-1000:], out.stderr[-3000:])
    # the workstation-only commands explain what to install instead of crashing
    out = cli("train", "--model", tmp_path, "--task", "classify", "--data", data, "--out", tmp_path / "r")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "edgeft[train" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.ci
def test_stock_onnxruntime_trains_with_the_portable_step(tmp_path, cls_bundle, lm_bundle):
    """Stock onnxruntime (all aarch64 devices get) trains, evaluates and generates; the loss curve is
    the training build's, within 1e-4 relative."""
    deps = ["onnxruntime>=1.19", "numpy", "tokenizers", "jinja2", "safetensors", "click", "tqdm"]
    _, cli = device_venv(tmp_path, deps, ["--no-deps", str(ROOT)])
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("sad movie", "neg")] * 6])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "what is two plus two?", "completion": " four"}] * 8)
    curves = {}
    for name, bundle, rows in (("cls", cls_bundle, data), ("lm", lm_bundle, chat)):
        args = ["train", "--bundle", bundle, "--data", rows, "--max-steps", "6", "--quiet", "--json"]
        out = cli("device", *args, "--state", tmp_path / name)
        assert out.returncode == 0, out.stderr[-3000:]
        stock = json.loads(out.stdout)
        assert stock["backend"] == "portable"
        r, ref = device(*args, "--state", tmp_path / f"{name}-ref", "--backend", "onnxruntime-training")
        assert r.exit_code == 0 and ref["backend"] == "onnxruntime-training", r.output
        curves[name] = (stock["losses"], ref["losses"])
    for stock, ref in curves.values():
        assert len(stock) == len(ref) == 6
        assert max(abs(a - b) / abs(b) for a, b in zip(stock, ref)) < 1e-4, (stock, ref)
    for args in (["device", "eval", "--bundle", cls_bundle, "--state", tmp_path / "cls", "--data", data, "--json"],
                 ["device", "predict", "--bundle", cls_bundle, "--state", tmp_path / "cls", "--text", "i loved it"],
                 ["device", "generate", "--bundle", lm_bundle, "--state", tmp_path / "lm", "--prompt", "what is two plus two?", "--max-new-tokens", "3"],
                 ["device", "export-adapter", "--bundle", cls_bundle, "--state", tmp_path / "cls", "--out", tmp_path / "a"]):
        out = cli(*args)
        assert out.returncode == 0, (args, out.stderr[-3000:])
    out = cli("device", "train", "--bundle", cls_bundle, "--state", tmp_path / "s", "--data", data, "--max-steps", "1", "--backend", "onnxruntime-training")
    assert out.returncode == 12 and "stock build" in out.stderr and "onnxruntime-training" in out.stderr, out.stderr[-2000:]
