"""Resume state for a run: everything a bit-exact resume needs, as safetensors + JSON.

trainable.safetensors  the trainable tensors (LoRA, and a classification head)
optimizer.safetensors  AdamW state flattened to `state.{param}.{key}`, and the RNG states
                       (`rng.cpu`, `rng.cuda`: LoRA dropout draws from them)
state.json             counters (step, best, best_step, bad_evals, elapsed, last_eval...),
                       AdamW param groups, and the fp16 GradScaler state when there is one

Never pickle. Batches and the learning rate follow from the step, so they need no state.
The folder is replaced atomically (fsutil.atomic_dir): a crash leaves the previous checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fsutil import atomic_dir


def save_checkpoint(path: Path, model, optimizer, counters: dict, scaler=None) -> None:
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
        meta = {"counters": counters, "param_groups": opt["param_groups"], "scaler": scaler.state_dict() if scaler else None}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(path: Path, model, optimizer, scaler=None) -> dict:
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
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta["counters"]
