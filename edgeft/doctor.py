"""`edgeft doctor`: what this machine has, which commands can run, what to install.

Probes by metadata and import specs where possible, so it stays fast and never
drags in a heavy library just to learn its version.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
import sys


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _onnxruntime() -> dict:
    """Which ONNX Runtime is installed: the training build or stock (they share one folder)."""
    builds = {d: _version(d) for d in ("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime", "onnxruntime-gpu")}
    present = {k: v for k, v in builds.items() if v}
    spec = importlib.util.find_spec("onnxruntime")
    training = spec is not None and importlib.util.find_spec("onnxruntime.training") is not None
    return {"distributions": present, "importable": spec is not None, "training_build": training}


def _torch() -> dict:
    if importlib.util.find_spec("torch") is None:
        return {"version": None}
    import torch

    info = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
    return info


def diagnose() -> dict:
    torch_info = _torch()
    ort = _onnxruntime()
    libs = {d: _version(d) for d in ("transformers", "peft", "bitsandbytes", "accelerate", "optimum", "safetensors", "onnx", "tokenizers", "numpy")}
    bnb_backend = None
    if libs["bitsandbytes"] and torch_info["version"]:
        bnb_backend = "cuda" if torch_info.get("cuda_available") else "cpu"
    can_train = all(libs[k] for k in ("transformers", "peft", "bitsandbytes", "safetensors")) and bool(torch_info["version"])
    can_export = can_train and bool(libs["onnx"]) and ort["training_build"]
    can_device = ort["importable"] and bool(libs["tokenizers"])
    commands = {"train": can_train, "export": can_export, "device": can_device}
    install = []
    if not can_train:
        install.append('pip install "edgeft[train]"  # for edgeft train')
    if not can_export:
        install.append('pip install "edgeft[export]"  # for edgeft export (x86-64, Python <= 3.12)')
    if not can_device:
        install.append('pip install "edgeft[device]"  # for edgeft device')
    return {
        "edgeft": _version("edgeft"), "python": sys.version.split()[0], "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch_info, "bitsandbytes_backend": bnb_backend, "onnxruntime": ort, "libraries": libs,
        "commands": commands, "install": install,
    }


def render(r: dict) -> str:
    t = r["torch"]
    ort = r["onnxruntime"]
    ort_line = ", ".join(f"{k} {v}" for k, v in ort["distributions"].items()) or "not installed"
    if ort["importable"]:
        ort_line += " (training build)" if ort["training_build"] else " (stock: inference only)"
    cuda = "no CUDA" if not t["version"] else (f"CUDA {t['cuda_build']}: " + ", ".join(t.get("gpus", [])) if t.get("cuda_available") else "CUDA not available")
    lines = [
        f"edgeft        {r['edgeft']}",
        f"python        {r['python']} on {r['platform']}",
        f"torch         {t['version'] or 'not installed'} ({cuda})",
        f"bitsandbytes  {r['libraries']['bitsandbytes'] or 'not installed'}" + (f" (backend: {r['bitsandbytes_backend']})" if r["bitsandbytes_backend"] else ""),
        f"onnxruntime   {ort_line}",
        "libraries     " + ", ".join(f"{k} {v}" for k, v in r["libraries"].items() if v and k not in ("bitsandbytes",)),
        "commands      " + ", ".join(f"{k}: {'yes' if ok else 'no'}" for k, ok in r["commands"].items()),
    ]
    lines += [f"to enable     {line}" for line in r["install"]]
    return "\n".join(lines)
