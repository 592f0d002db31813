"""Resume state for a run: trainable tensors, AdamW state and counters, as safetensors + JSON.

Never pickle: optimizer tensors are flattened to `state.{param}.{key}` safetensors
entries, the rest is JSON. The learning rate is recomputed from the step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fsutil import atomic_dir


def save_checkpoint(path: Path, model, optimizer, counters: dict) -> None:
    from safetensors.torch import save_file

    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    tensors = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"state.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with atomic_dir(path) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"counters": counters, "param_groups": opt["param_groups"]}, indent=2))


def load_checkpoint(path: Path, model, optimizer) -> dict:
    from safetensors.torch import load_file

    trainable = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta["counters"]
