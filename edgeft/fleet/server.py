"""The Flower ServerApp `edgeft fleet serve` runs. Torch-free (numpy, ONNX Runtime for the held-out check).

Flower drives the rounds (its FedAvg strategy's loop: sample the connected nodes with
`fraction_train`, at least `min_train_nodes`, waiting for `min_available_nodes`; send; wait for the
replies at most `timeout` seconds, so a device that drops out costs the round its update, never
the round). edgeft replaces what is done with the replies (`FleetStrategy.aggregate_train`):

- each reply is checked (validate.problems: base fingerprint, round, tensor names, shapes, fp32,
  NaN/inf, the sha256 the device sent, a positive sample count); a refused or failed reply is
  logged with its reason and left out, the round goes on with the others;
- the accepted adapters are aggregated, weighted by samples (aggregate.py; fedavg by default: with the
  devices carrying AdamW's moments between rounds, it keeps the coordinates those moments refer to,
  where exact's SVD re-factoring gives every layer a new basis each round; BENCHMARKS.md section 11);
- bytes down and up per client are logged (Flower's ArrayRecord payload count).

After each round the server scores the adapter on held-out rows it owns (the bundle's inference
graph, as `edgeft device eval`), and writes it (outputs.py) as an adapter-only update for the bundle
and as a PEFT adapter.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

serverapp = ServerApp()

DEFAULTS = {"rounds": 3, "steps": 20, "lr": 0.0, "aggregation": "fedavg", "min-clients": 2, "fraction": 1.0, "round-timeout": 600.0,
            "compare": False, "replay-ratio": -1.0, "eval-data": "", "server-lr": 1.0, "schedule": "run", "moments": "keep"}


def to_numpy(record: ArrayRecord) -> dict:
    return {name: a.numpy() for name, a in record.items()}


def to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({name: Array(a) for name, a in arrays.items()})


class Fleet:
    """The server's side of the fleet, without Flower: the bundle, the checks, the aggregation, the
    held-out evaluation, the outputs. FleetStrategy feeds it Flower's replies."""

    def __init__(self, bundle: Path, out: Path, settings: dict, log=print):
        from ..bundle import verify_bundle
        from ..device.state import DeviceState
        from ..update import bundle_shapes
        from .outputs import FleetOutput

        self.bundle, self.settings, self.log = Path(bundle), settings, log
        self.manifest = verify_bundle(self.bundle)
        self.shapes = bundle_shapes(self.bundle, self.manifest)
        self.initial = DeviceState(Path(out) / "state", self.bundle, self.manifest).bundle_params()
        self.output = FleetOutput(out, self.bundle, self.manifest)
        self.eval_rows = self.read_eval(settings.get("eval-data") or None)
        self.predictor = None
        self.rounds: list[dict] = []

    def read_eval(self, path):
        if not path:
            return None
        from ..datasets import load_task_rows
        from ..device.data import encode_rows
        from ..device.tokenizer import DeviceTokenizer

        m = self.manifest
        self.tokenizer = DeviceTokenizer(self.bundle / "tokenizer")
        rows = load_task_rows(path, m.task, m.labels)
        return encode_rows(rows, m.task, self.tokenizer, m.labels, m.max_seq_len, where=str(path), warn=self.log)

    def evaluate(self, arrays: dict) -> dict:
        """Held-out metrics of an adapter (the bundle's inference graph, its weights swapped in)."""
        if self.eval_rows is None:
            return {}
        from ..device.infer import Predictor

        if self.predictor is None:
            self.predictor = Predictor(self.bundle, self.manifest, arrays, self.tokenizer)
        else:
            self.predictor.set_params(arrays)
        return {k: round(float(v), 6) for k, v in self.predictor.evaluate(self.eval_rows).items() if isinstance(v, (int, float))}

    def screen(self, rnd: int, replies: list[dict]) -> list[dict]:
        """Each reply {node, device, arrays, meta, bytes_down, bytes_up, error}: accepted or refused (logged)."""
        from .validate import problems

        accepted = []
        for r in replies:
            reasons = [r["error"]] if r.get("error") else problems(r["arrays"], self.shapes, self.manifest.base.fingerprint,
                                                                   {**r["meta"], "expected_round": rnd})
            self.output.event("reply", round=rnd, node=r["node"], device=r.get("device"), accepted=not reasons, reasons=reasons,
                              samples=r.get("meta", {}).get("num-examples"), sha256=r.get("meta", {}).get("sha256"),
                              bytes_down=r.get("bytes_down"), bytes_up=r.get("bytes_up"),
                              **{k: r["meta"][k] for k in ("steps", "first-loss", "last-loss", "seconds", "best-step", "moments-carried", "schedule-offset")
                                 if k in r.get("meta", {})})
            if reasons:
                self.log(f"round {rnd}: refused the reply of node {r['node']}: {'; '.join(reasons)}")
            else:
                accepted.append(r)
        return accepted

    def aggregate(self, rnd: int, accepted: list[dict]) -> dict | None:
        from .aggregate import METHODS, aggregate, product_error

        if not accepted:
            self.log(f"round {rnd}: no update accepted; the adapter stays as it was")
            return None
        adapters = [r["arrays"] for r in accepted]
        weights = [float(r["meta"]["num-examples"]) for r in accepted]
        method, step = self.settings["aggregation"], float(self.settings.get("server-lr", 1.0))
        start = getattr(self, "current", None)  # the adapter this round started from
        t0 = time.perf_counter()
        agg = aggregate(method, adapters, weights, start, step)
        seconds = round(time.perf_counter() - t0, 3)

        def errors(m: str, a: dict) -> dict:  # how far the method's B·A is from the mean of the devices' (without the server step)
            a = a if step == 1.0 else aggregate(m, adapters, weights)
            return {"product_error": round(product_error(a, adapters, weights), 6),
                    **({"update_error": round(product_error(a, adapters, weights, start), 6)} if start is not None else {})}

        info = {"method": method, "server_lr": step, "seconds": seconds, **errors(method, agg)}
        if self.settings.get("compare"):  # the other method on the same updates, scored on the same rows
            for other in METHODS:
                if other != method:
                    alt = aggregate(other, adapters, weights, start, step)
                    info[other] = {**errors(other, alt), "heldout": self.evaluate(alt)}
        self.pending = {"round": rnd, "clients": len(accepted), "samples": sum(weights),
                        "nodes": [r["node"] for r in accepted], **info}
        return agg

    def finish_round(self, rnd: int, arrays: dict) -> dict:
        """Score the round's adapter and write it. Round 0: the bundle's adapter, scored only."""
        metrics = self.evaluate(arrays)
        if rnd == 0:
            self.output.event("start", round=0, heldout=metrics, settings=self.settings, bundle=str(self.bundle))
            self.rounds.append({"round": 0, "heldout": metrics})
            return metrics
        info = getattr(self, "pending", None) or {}
        if info.get("round") != rnd:  # nothing accepted this round: the adapter did not change
            info = {"round": rnd, "clients": 0}
        written = self.output.write_round(rnd, arrays, metrics, {"aggregation": info.get("method"), "clients": info.get("clients")})
        record = {**info, "heldout": metrics, "update": written["update"], "adapter": written["adapter"], "update_bytes": written["update_bytes"]}
        self.output.event("aggregate", **record)
        self.rounds.append(record)
        return metrics


class FleetStrategy(FedAvg):
    """Flower's FedAvg loop and sampling; edgeft's checks, aggregation and byte accounting."""

    def __init__(self, fleet: Fleet, **kwargs):
        super().__init__(fraction_evaluate=0.0, min_evaluate_nodes=0, **kwargs)
        self.fleet = fleet
        self.sent: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        size = arrays.count_bytes()
        self.sent = {m.metadata.dst_node_id: size for m in messages}
        self.messages = messages  # Flower stamps their message ids when it pushes them
        self.fleet.current = to_numpy(arrays)
        self.fleet.log(f"round {server_round}: sending the adapter ({size} bytes) to {len(messages)} nodes")
        return messages

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        # an error the SuperLink answers for a node (unavailable) comes from the SuperLink: name the node it was sent to
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in getattr(self, "messages", [])}
        entries = []
        for msg in replies:
            node = to_node.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                entries.append({"node": node, "error": f"the device failed or dropped out: {msg.error.reason}", "bytes_down": self.sent.get(node)})
                continue
            try:
                content = msg.content
                meta = {**dict(content["metrics"]), **dict(content["edgeft"])}
                record = content["arrays"]
                entries.append({"node": node, "device": meta.get("device"), "arrays": to_numpy(record), "meta": meta,
                                "bytes_down": self.sent.get(node), "bytes_up": record.count_bytes()})
            except (KeyError, TypeError, ValueError) as e:
                entries.append({"node": node, "error": f"malformed reply ({type(e).__name__}: {e})", "bytes_down": self.sent.get(node)})
        answered = {e["node"] for e in entries}
        for node in self.sent:
            if node not in answered:
                entries.append({"node": node, "error": "no reply before the round's timeout", "bytes_down": self.sent[node], "bytes_up": 0})
        accepted = self.fleet.screen(server_round, entries)
        agg = self.fleet.aggregate(server_round, accepted)
        metrics = MetricRecord({"clients": len(accepted), "refused": len(entries) - len(accepted)})
        return (to_record(agg) if agg is not None else None), metrics


def settings_from(run_config: dict) -> dict:
    s = {**DEFAULTS, **{k: v for k, v in run_config.items()}}
    for key in ("bundle", "out"):
        if not s.get(key):
            raise ValueError(f"the run config has no {key!r}; start the run with `edgeft fleet serve`")
    return s


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    s = settings_from(dict(context.run_config))
    log = lambda m: print(f"[edgeft] {m}", flush=True)  # noqa: E731
    fleet = Fleet(Path(s["bundle"]), Path(s["out"]), s, log)
    strategy = FleetStrategy(fleet, fraction_train=float(s["fraction"]), min_train_nodes=int(s["min-clients"]),
                             min_available_nodes=int(s["min-clients"]))
    # rounds, schedule: each device continues one learning-rate schedule over the whole run (local.schedule_span);
    # fleet_id, moments: a device carries AdamW's moments from its previous round of this run (local.carried_moments)
    train_config = {"base_fingerprint": fleet.manifest.base.fingerprint, "max_steps": int(s["steps"]), "lr": float(s["lr"]),
                    "rounds": int(s["rounds"]), "schedule": str(s["schedule"]), "moments": str(s["moments"]),
                    "fleet_id": f"{context.run_id}-{uuid.uuid4().hex[:12]}",
                    **({"replay_ratio": float(s["replay-ratio"])} if float(s["replay-ratio"]) >= 0 else {})}
    t0 = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=to_record(fleet.initial), num_rounds=int(s["rounds"]), timeout=float(s["round-timeout"]),
                            train_config=ConfigRecord(train_config),
                            evaluate_fn=lambda rnd, arrays: MetricRecord(fleet.finish_round(rnd, to_numpy(arrays)) or {"none": 0.0}))
    summary = {"rounds": fleet.rounds, "seconds": round(time.perf_counter() - t0, 2), "settings": s, "bundle": str(fleet.bundle),
               "final": fleet.rounds[-1] if fleet.rounds else None}
    fleet.output.summary(summary)
    log(f"done: {len(fleet.rounds) - 1} rounds in {summary['seconds']} s; the last adapter: {fleet.output.out / 'latest.json'}")
    del result
