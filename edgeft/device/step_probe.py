"""What a bundle's training step holds above the loaded engine, measured: one step at the bundle's
batch x seq, in a process of its own so nothing else (torch, the exporter) is counted.

Export runs it on the bundle it is writing, once with ONNX Runtime's arena and once lean, and the
memory plan takes the larger of this and its formula. The formula (per-token tensors fitted on
SmolLM2) missed architectures that keep more per token: Gemma-3-270M's step, with 4 heads of 256
and a decomposed GELU-tanh, held 1077 MiB against 629 planned (BENCHMARKS.md section 5).

    EDGEFT_MEMORY=fast|lean python -m edgeft.device.step_probe BUNDLE   # prints {"step_mib": ...}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


def probe(bundle: Path) -> float:
    """MiB the step adds at its peak: the rebuilt weights, the activations and, with an arena, its high-water mark.
    Random tokens, every position labelled: the worst case for the vocabulary projection."""
    import numpy as np
    from safetensors.numpy import load_file

    from ..bundle import read_manifest
    from .backends import PortableBackend

    m = read_manifest(bundle)
    engine = PortableBackend(bundle, m)
    adapter = load_file(str(Path(bundle) / "adapter" / "adapter_model.safetensors"))
    engine.set_params({n: adapter[k] for n, k in m.trainable.items()})
    rng = np.random.default_rng(0)
    shape = (m.train_shape.batch, m.train_shape.seq)
    ids = rng.integers(0, min((m.memory_plan or {}).get("vocab") or 1000, 1000), shape)
    labels = rng.integers(0, len(m.labels), shape[0]) if m.task == "classify" else ids.copy()
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak so far (building the sessions) is not the step's
    engine.forward_backward({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels})
    engine.take_grads()
    return max(0.0, _status_mib("VmHWM") - before)


def measure_step(bundle: Path) -> dict | None:
    """{"fast": MiB, "lean": MiB} from two child processes, or None where this cannot be measured
    (not Linux: no peak to reset). A child's failure is the export's: the step must run."""
    if not sys.platform.startswith("linux"):
        return None
    out = {}
    for mode in ("fast", "lean"):
        env = {**os.environ, "EDGEFT_MEMORY": mode}
        r = subprocess.run([sys.executable, "-m", "edgeft.device.step_probe", str(bundle)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"the device step could not run ({mode}): {r.stderr[-2000:]}")
        out[mode] = round(json.loads(r.stdout.strip().splitlines()[-1])["step_mib"], 1)
    return out


if __name__ == "__main__":
    sys.modules["torch"] = None  # a device has no torch: neither does this measurement
    print(json.dumps({"step_mib": probe(Path(sys.argv[1]))}))
