"""The Flower ClientApp a device runs (`edgeft device fleet-join` starts the Flower SuperNode that runs it).

Torch-free: Flower, numpy, ONNX Runtime. The device's own settings come from the SuperNode's
--node-config (bundle, data, state); the round's from the server's message (round, base, steps, lr).
Each train message: local.train_round (device train's trainer on the local rows), and the reply
carries only the adapter (ArrayRecord, by ONNX name), a MetricRecord (num-examples: the sample
weight, losses, seconds) and a ConfigRecord (base fingerprint, sha256 of the adapter). An error
(wrong data, another base) is raised: Flower returns it to the server as an error reply, which the
server logs and leaves out of the round.

EDGEFT_FLEET_FAULT=nan|shape|base (tests only) corrupts the reply, to prove the server's guard.
"""

from __future__ import annotations

import os

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

clientapp = ClientApp()


def node_setting(context: Context, key: str, default=None):
    value = context.node_config.get(key, default)
    return None if value in ("", None) else value


def fault(arrays: dict, meta: dict, kind: str | None) -> tuple[dict, dict]:
    """Test hook: a device gone wrong."""
    import numpy as np

    from .validate import digest

    if not kind:
        return arrays, meta
    name = sorted(arrays)[0]
    arrays = dict(arrays)
    if kind == "nan":
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif kind == "shape":
        arrays[name] = arrays[name][..., :-1].copy()
    elif kind == "base":
        meta = {**meta, "base_fingerprint": "sha256:" + "0" * 64}
    return arrays, {**meta, "sha256": digest(arrays)}


@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    from .local import train_round

    bundle, data = node_setting(context, "bundle"), node_setting(context, "data")
    if not bundle or not data:
        raise ValueError("this SuperNode has no bundle/data in its --node-config; start it with `edgeft device fleet-join`")
    config = dict(msg.content["config"])
    arrays = {name: a.numpy() for name, a in msg.content["arrays"].items()}
    options = {"round": config.get("server-round", config.get("round")), **config}
    trained, meta = train_round(bundle, data, node_setting(context, "state"), arrays, options, log=lambda m: print(f"[edgeft] {m}", flush=True))
    trained, meta = fault(trained, meta, os.environ.get("EDGEFT_FLEET_FAULT"))
    metrics = {"num-examples": int(meta["num-examples"]), "steps": int(meta["steps"]), "seconds": float(meta["seconds"]),
               "promoted-locally": int(bool(meta["promoted_locally"])), "moments-carried": int(bool(meta.get("moments_carried"))),
               "schedule-offset": int(meta.get("schedule_offset") or 0)}
    for k in ("first_loss", "last_loss", "peak_rss_mib", "best_step"):
        if meta.get(k) is not None:
            metrics[k.replace("_", "-")] = float(meta[k])
    content = RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in trained.items()}), "metrics": MetricRecord(metrics),
                          "edgeft": ConfigRecord({"base_fingerprint": meta["base_fingerprint"], "sha256": meta["sha256"],
                                                  "round": int(meta["round"]), "device": str(node_setting(context, "name") or "")})})
    print(f"[edgeft] round {meta['round']}: {meta['steps']} steps on {meta['num-examples']} local rows, loss "
          f"{meta['first_loss']} -> {meta['last_loss']}, {meta['seconds']} s", flush=True)
    return Message(content=content, reply_to=msg)
