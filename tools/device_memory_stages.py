#!/usr/bin/env python
"""Where a device training process's memory goes, stage by stage: resident memory after the imports,
the tokenizer, the engine (packed base + the step's session), each of a few training steps and the
eval step. Run it with the torch-free device venv, so what it measures is what a device holds:

    .venv-device/bin/python tools/device_memory_stages.py --bundle /tmp/b-smollm-zero

The steps run on random tokens, every position labelled (the worst case for the vocabulary projection).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    sys.modules["torch"] = None  # a device has no torch
    print(f"{'start':<40}{rss_mib():8.0f} MiB")
    import numpy as np
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from edgeft.bundle import read_manifest
    from edgeft.device.backends import PortableBackend
    from edgeft.device.tokenizer import read_tokenizer_json

    print(f"{'python + numpy + onnxruntime + edgeft':<40}{rss_mib():8.0f} MiB")
    m = read_manifest(args.bundle)
    tok = Tokenizer.from_str(read_tokenizer_json(args.bundle / "tokenizer"))
    print(f"{'tokenizer':<40}{rss_mib():8.0f} MiB")
    engine = PortableBackend(args.bundle, m)
    print(f"{'engine (packed base + step session)':<40}{rss_mib():8.0f} MiB")
    adapter = load_file(str(args.bundle / "adapter" / "adapter_model.safetensors"))
    engine.set_params({n: adapter[k] for n, k in m.trainable.items()})
    ids = np.random.default_rng(0).integers(0, min(tok.get_vocab_size(), 30000), (m.train_shape.batch, m.train_shape.seq))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
    for i in range(args.steps):
        engine.forward_backward(batch)
        engine.take_grads()
        print(f"{f'training step {i + 1}':<40}{rss_mib():8.0f} MiB   (peak {hwm_mib():.0f})")
    engine.eval_loss(batch)
    print(f"{'eval step':<40}{rss_mib():8.0f} MiB   (peak {hwm_mib():.0f})")


if __name__ == "__main__":
    main()
