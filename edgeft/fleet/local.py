"""One fleet round on a device: the server's adapter in, the locally trained adapter out. Torch-free,
Flower-free (client.py wraps it in a Flower ClientApp).

1. The server's adapter is checked against this device's bundle (base fingerprint, tensor names and
   shapes, fp32, finite) and becomes a new generation, promoted: the fleet's adapter is what the
   device now runs, as an `apply-update` would make it (source "fleet", with the round).
2. `device train`'s own trainer (DeviceTrainer: same data loading, rehearsal, schedule, AdamW graph,
   promotion check) trains a generation on the device's local rows from it.
3. That generation's weights go back, whether or not the device's own guard promoted it (the guard
   decides what the device runs; the server decides what the fleet runs, on its held-out data), with
   the number of local rows trained on, the sha256 of the weights and the base they are for.

The rows themselves never leave: only the adapter, counts and losses do. An interrupted round (the
device was killed, the server moved on) is discarded when the next round starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import BundleError, UsageError
from .validate import digest


def check_incoming(arrays: dict, shapes: dict, manifest, base_fingerprint: str | None) -> None:
    if base_fingerprint is not None and base_fingerprint != manifest.base.fingerprint:
        raise BundleError(f"the fleet's server trains base {base_fingerprint}, this device's bundle holds {manifest.base.fingerprint}",
                          "install the bundle the server was started from")
    if set(arrays) != set(shapes):
        odd = sorted(set(arrays) ^ set(shapes))
        raise BundleError(f"the server's adapter does not have this bundle's trainable tensors ({len(odd)} differ, first: {odd[0]})",
                          "install the bundle the server was started from")
    for n, a in arrays.items():
        if a.dtype != np.float32 or tuple(a.shape) != tuple(shapes[n]) or not np.isfinite(a).all():
            raise BundleError(f"the server's adapter tensor {n} is not finite fp32 of shape {tuple(shapes[n])}", "check the server")


def train_round(bundle: Path, data: Path, state_dir: Path | None, arrays: dict, options: dict, log=print) -> tuple[dict, dict]:
    """(trained adapter by ONNX name, metadata) for one round. `options`: round, base_fingerprint,
    max_steps (or epochs), lr, replay_ratio, seed."""
    from ..bundle import read_manifest
    from ..device.state import default_state_dir
    from ..device.trainer import DeviceTrainConfig, DeviceTrainer
    from ..update import bundle_shapes

    t0 = time.perf_counter()
    bundle, data = Path(bundle), Path(data)
    if not Path(data).is_file():
        raise UsageError(f"local data not found: {data}", "pass the device's rows with --data FILE (.jsonl or .csv)")
    manifest = read_manifest(bundle)  # hashes: the trainer verifies every file before it trains
    shapes = bundle_shapes(bundle, manifest)
    check_incoming(arrays, shapes, manifest, options.get("base_fingerprint"))
    rnd = int(options.get("round", 0))
    state_dir = Path(state_dir) if state_dir else default_state_dir(bundle)
    cfg = DeviceTrainConfig(data=str(data), max_steps=options.get("max_steps") or None, epochs=float(options.get("epochs") or 1.0),
                            lr=options.get("lr") or None, seed=int(options.get("seed", rnd)), restart=True, force=bool(options.get("force")),
                            blend=1.0,  # the trained adapter goes back as is: averaging is the server's (aggregate.py)
                            **({"replay_ratio": float(options["replay_ratio"])} if options.get("replay_ratio") is not None else {}))
    trainer = DeviceTrainer(bundle, state_dir, cfg, log=log, progress=False)  # checks options, bundle hashes and the memory plan
    trainer.prepare_data()  # the rows are read and checked before the state is touched
    state = trainer.state
    with state.lock():
        if (state.job_dir / "job.json").is_file():
            log("discarding an interrupted fleet round")
            state.clear_job()
        gen = state.next_id()
        state.add_generation({"id": gen, "parent": state.current, "status": "promoted", "reason": f"fleet round {rnd}: the server's adapter",
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": "fleet", "data": None,
                              "fleet": {"round": rnd, "sha256": digest(arrays)}, "metrics": {}}, arrays, promote=True)
    summary = trainer.run()  # reads the rows again (cheap): run() is what `device train` calls
    trained = state.params(summary["generation"])
    meta = {"round": rnd, "num-examples": len(trainer.train_rows), "base_fingerprint": manifest.base.fingerprint, "sha256": digest(trained),
            "steps": summary["steps"], "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
            "promoted_locally": summary["promoted"], "generation": summary["generation"], "train_seconds": summary["seconds"],
            "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": summary["peak_rss_mib"]}
    return trained, meta
