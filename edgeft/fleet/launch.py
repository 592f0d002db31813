"""Starting Flower's processes for `edgeft fleet serve` and `edgeft device fleet-join`. Torch-free.

Flower 1.42's deployment runtime: a SuperLink (the server: one HTTP(S) port for the Fleet API the
devices call and the Control API runs are submitted to) runs the ServerApp; each device runs a
SuperNode that connects to it and runs the ClientApp for each message. A run is a Flower App (a FAB:
here only a pyproject.toml naming edgeft's two apps, which live in the installed edgeft package)
submitted with `flwr run`. This module writes that app folder and the Flower configuration file
(under OUT/flower, never the user's ~/.flwr), and starts the Flower executables of this Python
environment as child processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ResourceError, UsageError

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgeft-fleet"
version = "{version}"
description = "edgeft fleet learning: LoRA adapters trained on devices with ONNX Runtime, aggregated by the server"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgeft"

[tool.flwr.app.components]
serverapp = "edgeft.fleet.server:serverapp"
clientapp = "edgeft.fleet.client:clientapp"
"""


def flower_bin(name: str) -> str:
    """A Flower executable of this Python environment (never another one on PATH)."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found:
        return found
    raise ResourceError(f"Flower is not installed in this Python environment ({name} not found)",
                        "pip install 'edgeft[fleet]' (with [device] on a device): it brings flwr 1.42, without torch")


def flower_env(home: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # Flower spawns its helpers by name
    # numpy's BLAS on one thread: the aggregation's small QR/SVDs ran 300x slower with OpenBLAS's threads
    # spinning against ONNX Runtime's on a busy 2-core machine (0.1 s against 34 s, measured); ORT keeps its own pool
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"{address!r} is not HOST:PORT", "e.g. --server 192.168.1.10:9092")
    return host.strip("[]"), int(port)


def reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_reachable(host: str, port: int, seconds: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if reachable(host, port, 1.0):
            return True
        time.sleep(0.3)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_app(folder: Path) -> Path:
    from .. import __version__

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__), encoding="utf-8")
    return folder


def write_connection(home: Path, address: str, ca_certfile: Path | None) -> None:
    """The Flower configuration file `flwr run` reads: one SuperLink connection, the default."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "edgeft"', "", "[superlink.edgeft]", f'address = "{address}"']
    lines += [f'root-certificates = "{Path(ca_certfile).resolve()}"'] if ca_certfile else ["insecure = true"]
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tls_args(insecure: bool, ca: Path | None, cert: Path | None, key: Path | None) -> list[str]:
    if insecure:
        if ca or cert or key:
            raise UsageError("--insecure and the --ssl-* files exclude each other", "pass one or the other")
        return ["--insecure"]
    if not (ca and cert and key):
        raise UsageError("the server needs TLS files, or --insecure for a test on a trusted network",
                         "pass --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile (README, 'Fleet learning'), or --insecure")
    for p in (ca, cert, key):
        if not Path(p).is_file():
            raise UsageError(f"TLS file not found: {p}", "pass the files made as the README's 'Fleet learning' section shows")
    return ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]


def stop(proc: subprocess.Popen, seconds: float = 10.0) -> None:
    """SIGTERM to the process group (Flower's helpers die with it), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(seconds)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
