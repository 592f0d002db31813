"""`edgeft fleet serve` (the workstation) and `edgeft device fleet-join` (a device). Torch-free; Flower
is imported only when a command runs."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_errors import EdgeftGroup
from ..cli_output import emit


@click.group(cls=EdgeftGroup)
def fleet():
    """Fleet learning on Flower: devices train the adapter on their own rows, only adapters travel."""


@fleet.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="The bundle the devices hold (from `edgeft export`).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the rounds' adapters, the log and the summary.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Held-out rows the server owns: each round's adapter is scored on them.")
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="Optimizer steps per device per round.")
@click.option("--lr", type=float, help="Devices' peak learning rate (default: device train's, 5e-4 classify, 1e-4 causal-lm).")
@click.option("--replay-ratio", type=float, help="Devices' share of each batch replayed from the bundle's reference rows (default: device train's).")
@click.option("--aggregation", type=click.Choice(["exact", "fedavg"]), default="fedavg", show_default=True,
              help="fedavg: every tensor's sample-weighted mean, A and B separately (keeps the coordinates the devices' carried "
                   "AdamW moments refer to); exact: the weighted mean of each layer's B·A, re-factored to rank r by SVD.")
@click.option("--server-lr", type=float, default=1.0, show_default=True,
              help="Server step: the new adapter is start + S x (aggregate - start); 1 is plain averaging, above 1 takes the devices' mean step further.")
@click.option("--schedule", type=click.Choice(["run", "round"]), default="run", show_default=True,
              help="Devices' learning rate: run: one warmup and one cosine decay over all rounds' steps, each round continuing it; "
                   "round: every round warms up and decays afresh.")
@click.option("--moments", type=click.Choice(["keep", "reset"]), default="keep", show_default=True,
              help="keep: each device starts a round from the AdamW moments its previous round of this run left (in its state); reset: from zero.")
@click.option("--compare-aggregations", is_flag=True, help="Also score the other aggregation of the same updates each round (logged).")
@click.option("--min-clients", type=int, default=2, show_default=True, help="Wait for this many devices; train with at least this many per round.")
@click.option("--fraction", type=float, default=1.0, show_default=True, help="Share of the connected devices sampled each round.")
@click.option("--round-timeout", type=float, default=600.0, show_default=True,
              help="Seconds a round waits for replies; a device that has not answered by then is left out of the round.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface, for real devices).")
@click.option("--port", type=int, default=9092, show_default=True)
@click.option("--insecure", is_flag=True, help="No TLS (a test on one machine or a trusted network).")
@click.option("--ssl-ca-certfile", type=click.Path(path_type=Path), help="TLS: the CA certificate.")
@click.option("--ssl-certfile", type=click.Path(path_type=Path), help="TLS: the server certificate.")
@click.option("--ssl-keyfile", type=click.Path(path_type=Path), help="TLS: the server key.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary.")
def serve(bundle, out, eval_data, rounds, steps, lr, replay_ratio, aggregation, server_lr, schedule, moments, compare_aggregations, min_clients, fraction, round_timeout,
          host, port, insecure, ssl_ca_certfile, ssl_certfile, ssl_keyfile, overwrite, as_json):
    """Run the fleet's server: a Flower SuperLink and edgeft's ServerApp, from a bundle.

    \b
    edgeft fleet serve --bundle bundles/sentiment --eval-data held.jsonl --rounds 5 --out fleet/run1 --insecure
    then on each device: edgeft device fleet-join --bundle bundles/sentiment --data local.jsonl --server HOST:9092 --insecure

    Each round sends the current adapter to the devices, each trains it on its own rows with
    `device train`'s trainer and sends back only the adapter and its sample count. Updates for another
    base, of other shapes or holding NaN/inf are refused and logged; the rest are aggregated,
    weighted by samples, scored on --eval-data and written as an adapter-only update for the bundle
    (`edgeft device apply-update`) and as a PEFT adapter, under OUT/rounds/.
    """
    from ..errors import UsageError
    from .serve import serve as run_serve

    if rounds < 1 or steps < 1 or min_clients < 1 or not 0 < fraction <= 1 or round_timeout <= 0 or server_lr <= 0:
        raise UsageError("--rounds, --steps, --min-clients, --round-timeout and --server-lr must be positive and --fraction in (0, 1]",
                         "e.g. --rounds 3 --steps 20")
    settings = {"rounds": rounds, "steps": steps, "lr": lr or 0.0, "aggregation": aggregation, "server-lr": server_lr, "schedule": schedule, "moments": moments,
                "compare": compare_aggregations,
                "min-clients": min_clients, "fraction": fraction, "round-timeout": round_timeout,
                "replay-ratio": -1.0 if replay_ratio is None else replay_ratio, "eval-data": str(eval_data) if eval_data else ""}
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    s = run_serve(bundle, out, settings, host, port, {"insecure": insecure, "ca": ssl_ca_certfile, "cert": ssl_certfile, "key": ssl_keyfile},
                  overwrite, log)
    lines = [f"{len(s['rounds']) - 1} rounds in {s['wall_seconds']} s; adapters under {Path(s['out']) / 'rounds'}"]
    for r in s["rounds"]:
        acc = r.get("heldout", {}).get("accuracy")
        lines.append(f"round {r['round']}: " + (f"{r.get('clients', 0)} devices, " if r["round"] else "start, ")
                     + (f"held-out accuracy {acc:.4f}" if acc is not None else "no --eval-data"))
    emit(s, as_json, "\n".join(lines))


@click.command("fleet-join")
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle folder from `edgeft export` (the server's).")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="This device's rows; they never leave it.")
@click.option("--server", required=True, help="The fleet server's HOST:PORT (`edgeft fleet serve --host/--port`).")
@click.option("--state", "state_dir", type=click.Path(path_type=Path), help="Device state folder (default: BUNDLE/state).")
@click.option("--name", help="This device's name in the server's log (default: the host name).")
@click.option("--insecure", is_flag=True, help="No TLS (the server was started with --insecure).")
@click.option("--root-certificates", type=click.Path(path_type=Path), help="TLS: the CA certificate the server's certificate is signed with.")
@click.option("--max-wait", type=float, help="Give up after this many seconds without the server (default: keep retrying).")
def fleet_join(bundle, data, server, state_dir, name, insecure, root_certificates, max_wait):
    """Join a fleet: train the server's adapter on this device's rows each round (Flower SuperNode).

    \b
    edgeft device fleet-join --bundle bundles/sentiment --data local.jsonl --server 192.168.1.10:9092 --root-certificates ca.crt

    Each round runs `device train`'s trainer from the server's adapter (a new generation, as
    `apply-update` makes one) and sends back only the trained adapter, its sha256 and the number of
    local rows. Runs until stopped; a device restarted with the same command rejoins.
    """
    from .serve import join

    code = join(bundle, data, server, state_dir, name, insecure, root_certificates, max_wait, lambda m: click.echo(m, err=True))
    raise SystemExit(code)
