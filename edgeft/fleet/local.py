"""One fleet round on a device: the server's adapter in, the locally trained adapter out. Torch-free,
Flower-free (client.py wraps it in a Flower ClientApp).

1. The server's adapter is checked against this device's bundle (base fingerprint, tensor names and
   shapes, fp32, finite) and becomes a new generation, promoted: the fleet's adapter is what the
   device now runs, as an `apply-update` would make it (source "fleet", with the round).
2. `device train`'s own trainer (DeviceTrainer: same data loading, rehearsal, schedule, AdamW graph,
   promotion check) trains a generation on the device's local rows from it, as one stretch of the
   fleet's run: with the server's `schedule` "run" (its default), round r of R takes steps
   (r-1)*S .. r*S of one warmup-and-cosine schedule R*S steps long, so the devices warm up once and
   decay once over the whole run instead of every round; with `moments` "keep", AdamW starts from
   the moments this device's previous round of the same run left (MOMENTS in the device state,
   written atomically, tied to the generation that wrote them), not from zero. Its result is its last
   step's weights (not the checkpoint with the lowest loss on a few local held-out rows: the server
   judges the fleet's adapter), and its rehearsal leaves out the device's own rows that earlier
   rounds retained (they are this round's data already).
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

from ..errors import BundleError, StateError, UsageError
from .validate import digest

MOMENTS = "fleet-moments.safetensors"  # in the device state: AdamW's moments after this device's last fleet round


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


def schedule_span(options: dict, rnd: int) -> dict:
    """The round's place in the run's one schedule: {schedule_offset, schedule_total}, or {} (the round's own)."""
    steps, rounds = int(options.get("max_steps") or 0), int(options.get("rounds") or 0)
    if options.get("schedule", "round") != "run" or not steps or not 1 <= rnd <= rounds:
        return {}
    return {"schedule_offset": (rnd - 1) * steps, "schedule_total": rounds * steps}


def carried_moments(state, path: Path, fleet_id: str | None, rnd: int) -> tuple[bool, str]:
    """(use them, why): the moments saved by this device's last round, if it was an earlier round of
    the same fleet run and the generation that wrote them is in the state."""
    if not fleet_id:
        return False, "the server sent no run id"
    if not path.is_file():
        return False, "none saved yet"
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            gen = state.generation(int((f.metadata() or {})["generation"]))
        server = state.generation(gen["parent"]).get("fleet") or {}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, StateError):
        return False, "the saved ones belong to no generation of this state"
    if server.get("run") != fleet_id:
        return False, "the saved ones are from another fleet run"
    if int(server.get("round", rnd)) >= rnd:
        return False, f"the saved ones are from round {server.get('round')}"
    return True, f"AdamW's moments carried from round {server['round']}"


def train_round(bundle: Path, data: Path, state_dir: Path | None, arrays: dict, options: dict, log=print) -> tuple[dict, dict]:
    """(trained adapter by ONNX name, metadata) for one round. `options`: round, base_fingerprint,
    max_steps (or epochs), lr, replay_ratio, seed; rounds and schedule ("run": one schedule over all
    rounds, or "round"); fleet_id and moments ("keep": carry AdamW's moments between rounds, or "reset")."""
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
    fleet_id = str(options["fleet_id"]) if options.get("fleet_id") else None
    keep = options.get("moments", "reset") == "keep"
    moments = state_dir / MOMENTS
    cfg = DeviceTrainConfig(data=str(data), max_steps=options.get("max_steps") or None, epochs=float(options.get("epochs") or 1.0),
                            lr=options.get("lr") or None, seed=int(options.get("seed", rnd)), restart=True, force=bool(options.get("force")),
                            blend=1.0, blend_backoff=0,  # the trained adapter goes back as is: averaging is the server's (aggregate.py)
                            keep_best=False,  # the round's last step: the stretch of the run's schedule it was sent to take
                            moments_out=str(moments) if keep else None, **schedule_span(options, rnd),
                            **({"replay_ratio": float(options["replay_ratio"])} if options.get("replay_ratio") is not None else {}))
    trainer = DeviceTrainer(bundle, state_dir, cfg, log=log, progress=False)  # checks options, bundle hashes and the memory plan
    trainer.prepare_data()  # the rows are read and checked before the state is touched
    state = trainer.state
    with state.lock():
        if (state.job_dir / "job.json").is_file():
            log("discarding an interrupted fleet round")
            state.clear_job()
        if keep:
            use, why = carried_moments(state, moments, fleet_id, rnd)
            cfg.moments_in = str(moments) if use else None
            log(why if use else f"AdamW's moments start from zero ({why})")
        gen = state.next_id()
        state.add_generation({"id": gen, "parent": state.current, "status": "promoted", "reason": f"fleet round {rnd}: the server's adapter",
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": "fleet", "data": None,
                              "fleet": {"round": rnd, "run": fleet_id, "sha256": digest(arrays)}, "metrics": {}}, arrays, promote=True)
    summary = trainer.run()  # reads the rows again (cheap): run() is what `device train` calls
    trained = state.params(summary["generation"])
    meta = {"round": rnd, "num-examples": len(trainer.train_rows), "base_fingerprint": manifest.base.fingerprint, "sha256": digest(trained),
            "steps": summary["steps"], "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
            "promoted_locally": summary["promoted"], "generation": summary["generation"], "train_seconds": summary["seconds"],
            "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": summary["peak_rss_mib"],
            "moments_carried": bool(cfg.moments_in), "schedule_offset": cfg.schedule_offset, "best_step": summary.get("best_step")}
    return trained, meta
