"""`edgeft fleet serve` and `edgeft device fleet-join`: the checks a user's mistake should meet before
any Flower process starts, then the processes (launch.py).

serve: bundle (hashes), held-out rows, output folder; writes the Flower App with this run's settings
as its config, starts a SuperLink on --host:--port, submits the run with `flwr run` and follows its
log (OUT/server.log) until the ServerApp ends, then stops the SuperLink.

join: bundle (hashes), local rows (read and checked with the bundle's labels), the server reachable;
then a SuperNode with this device's settings as its node config, until it is stopped. The SuperNode
reconnects by itself when the server restarts; a device restarted with the same command rejoins.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..errors import DataError, OutputError, ResourceError
from .launch import flower_bin, flower_env, free_port, split_address, stop, tls_args, wait_reachable, write_app, write_connection


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def check_rows(path: Path, manifest, what: str) -> int:
    from ..datasets import load_task_rows

    if not Path(path).is_file():
        raise DataError(f"{what} not found: {path}", "pass a .jsonl or .csv file with the bundle's rows ({'text', 'label'} for classify)")
    return len(load_task_rows(path, manifest.task, manifest.labels))  # names the file and line of a bad row


def serve(bundle: Path, out: Path, settings: dict, host: str, port: int, tls: dict, overwrite: bool, log, timeout: float | None = None) -> dict:
    from ..bundle import verify_bundle

    bundle, out = Path(bundle).resolve(), Path(out).resolve()
    manifest = verify_bundle(bundle)
    if settings.get("eval-data"):
        settings["eval-data"] = str(Path(settings["eval-data"]).resolve())
        check_rows(Path(settings["eval-data"]), manifest, "held-out data")
    security = tls_args(tls.get("insecure", False), tls.get("ca"), tls.get("cert"), tls.get("key"))
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out} exists and is not empty", "pass another --out, or --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    flower = out / "flower"
    app = write_app(flower / "app")
    config = {"bundle": str(bundle), "out": str(out), **settings}
    with open(app / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write("\n[tool.flwr.app.config]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    write_connection(flower / "home", f"{connect_host}:{port}", tls.get("ca"))
    env = flower_env(flower / "home")
    link_log = open(out / "superlink.log", "w", encoding="utf-8")
    link = subprocess.Popen([flower_bin("flower-superlink"), *security, "--host", host, "--port", str(port),
                             "--disable-runtime-dependency-installation"],
                            stdout=link_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    t0 = time.perf_counter()
    try:
        if not wait_reachable(connect_host, port, 60, link):
            raise ResourceError(f"the Flower SuperLink did not start on {host}:{port} (see {out / 'superlink.log'})",
                                "is the port in use? pass another --port")
        log(f"SuperLink listening on {host}:{port}; devices join with: edgeft device fleet-join --bundle BUNDLE --data ROWS "
            f"--server {connect_host if host in ('0.0.0.0', '::') else host}:{port}" + (" --insecure" if tls.get("insecure") else " --root-certificates CA"))
        previous = signal.signal(signal.SIGTERM, _interrupt)  # killed or Ctrl-C: the SuperLink and `flwr run` go too
        with open(out / "server.log", "w", encoding="utf-8") as server_log:
            run = subprocess.Popen([flower_bin("flwr"), "run", str(app), "edgeft", "--stream"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=env, cwd=str(flower), text=True, start_new_session=True)
            try:
                for line in run.stdout:
                    server_log.write(line)
                    server_log.flush()
                    if "[edgeft]" in line or "ERROR" in line:
                        log(line.rstrip().split("[edgeft] ", 1)[-1])
                    if timeout and time.perf_counter() - t0 > timeout:
                        break
            finally:
                try:
                    run.wait(5)  # `flwr run` ends once the run has (its log stream closed)
                except subprocess.TimeoutExpired:
                    pass
                stop(run)
                signal.signal(signal.SIGTERM, previous)
    finally:
        stop(link)
        link_log.close()
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise ResourceError(f"the fleet run ended without a result (see {out / 'server.log'} and {out / 'superlink.log'})",
                            "check the log; rerun with --overwrite")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    summary["out"] = str(out)
    return summary


def join(bundle: Path, data: Path, server: str, state: Path | None, name: str | None, insecure: bool, root_certificates: Path | None,
         max_wait: float | None, log) -> int:
    from ..bundle import verify_bundle
    from .launch import reachable

    bundle = Path(bundle).resolve()
    manifest = verify_bundle(bundle)
    rows = check_rows(Path(data), manifest, "local data")
    host, port = split_address(server)
    if not insecure and not root_certificates:
        raise ResourceError("a TLS connection needs the server's CA certificate", "pass --root-certificates CA.pem, or --insecure for a test")
    if root_certificates and not Path(root_certificates).is_file():
        raise ResourceError(f"CA certificate not found: {root_certificates}", "copy the server's ca.crt to the device")
    if not reachable(host, port, 5.0):
        raise ResourceError(f"cannot reach the fleet server at {host}:{port}", "is `edgeft fleet serve` running there, and the port open?")
    node_config = {"bundle": str(bundle), "data": str(Path(data).resolve()), "name": name or socket_name()}
    if state:
        node_config["state"] = str(Path(state).resolve())
    cmd = [flower_bin("flower-supernode"), *(["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]),
           "--superlink", f"{host}:{port}", "--port", str(free_port()),
           "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())]
    if max_wait:
        cmd += ["--max-wait-time", str(max_wait)]
    log(f"joining the fleet at {host}:{port} with {rows} local rows ({data}); they stay on this device. Ctrl-C to leave.")
    proc = subprocess.Popen(cmd, env=flower_env(), start_new_session=True)  # its own group: stop() ends it with its helpers
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `systemctl stop`, kill: leave the fleet cleanly too
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def socket_name() -> str:
    import socket

    return socket.gethostname()
