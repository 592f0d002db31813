"""`edgeft device watch` and `edgeft device install-service`. Torch-free; heavy imports inside."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_output import emit


def watch_options(f):
    for opt in reversed([
        click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle folder from `edgeft export`."),
        click.option("--state", "state_dir", type=click.Path(path_type=Path), help="Device state folder (default: BUNDLE/state)."),
        click.option("--inbox", required=True, type=click.Path(path_type=Path), help="Folder where complete .jsonl files appear (by rename)."),
        click.option("--min-rows", type=int, default=100, show_default=True, help="Train a generation once this many new rows wait."),
        click.option("--interval", type=float, default=10.0, show_default=True, help="Seconds between looks at the inbox."),
        click.option("--max-wait", type=float, help="Also train fewer rows once the oldest has waited this many seconds."),
        click.option("--max-steps", type=int, help="Optimizer steps per generation (default: one epoch of the new rows)."),
        click.option("--epochs", type=float, default=1.0, show_default=True),
        click.option("--tolerance", type=float, default=0.01, show_default=True, help="Allowed regression, as for device train."),
        click.option("--log", "log_file", type=click.Path(path_type=Path), help="Append JSON log lines here (default: stderr)."),
        click.option("--nice", type=int, default=10, show_default=True, help="Lower the CPU priority by this much (0: unchanged)."),
    ]):
        f = opt(f)
    return f


def check_watch_args(inbox: Path, min_rows: int, interval: float, max_wait: float | None, max_steps: int | None, epochs: float) -> None:
    from ..errors import UsageError

    if not inbox.is_dir():
        raise UsageError(f"inbox {inbox} is not a folder", f"create it first: mkdir -p {inbox}")
    if min_rows < 1 or interval <= 0 or (max_wait is not None and max_wait < 0) or (max_steps is not None and max_steps < 1) or epochs <= 0:
        raise UsageError("--min-rows, --interval, --max-steps and --epochs must be positive (--max-wait at least 0)", "e.g. --min-rows 100 --interval 10")


@click.command()
@watch_options
@click.option("--settle", type=float, default=2.0, show_default=True, help="Take a file only when unmodified this many seconds (0: at once).")
@click.option("--once", is_flag=True, help="One pass (ingest, train if due), print a JSON summary, exit.")
def watch(bundle, state_dir, inbox, min_rows, interval, max_wait, max_steps, epochs, tolerance, log_file, nice, settle, once):
    """Learn from files dropped into INBOX, as a long-running service.

    \b
    edgeft device watch --bundle bundle --inbox /var/lib/edgeft/inbox --min-rows 200
    Producers write x.jsonl.tmp and rename it to x.jsonl. Each file is ingested once, moved to
    INBOX/done/ (bad ones to INBOX/rejected/), and a generation trains when --min-rows new rows
    wait; it is promoted only if it does not regress. SIGKILL-safe at any moment.
    """
    import os

    from .learner import Learner
    from .watch import JsonLog, Watcher

    check_watch_args(inbox, min_rows, interval, max_wait, max_steps, epochs)
    log = JsonLog(log_file)
    if nice:
        os.nice(nice)
    learner = Learner(bundle, state_dir, log=lambda m: log("trainer", message=m))
    options = {"max_steps": max_steps, "epochs": epochs, "tolerance": tolerance}
    out = Watcher(learner, inbox, min_rows, max_wait, settle, options, log).run(interval, once)
    if once:
        emit(out, True, "")


@click.command("install-service")
@watch_options
@click.option("--user/--system", "user", default=True, show_default=True, help="A user unit (~/.config/systemd/user) or a system one (/etc/systemd/system).")
@click.option("--name", default="edgeft-watch", show_default=True, help="Unit name.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the unit file here instead.")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def install_service(bundle, state_dir, inbox, min_rows, interval, max_wait, max_steps, epochs, tolerance, log_file, nice, user, name, out,
                    overwrite, as_json):
    """Write a systemd unit that runs `edgeft device watch` (restart on failure, low priority).

    \b
    edgeft device install-service --bundle bundle --inbox ~/inbox
    systemctl --user daemon-reload && systemctl --user enable --now edgeft-watch
    """
    import getpass
    import sys

    from ..bundle import read_manifest
    from ..errors import OutputError
    from ..fsutil import atomic_write_text, check_output
    from .watch import unit_path, unit_text

    read_manifest(bundle)  # a clear error now rather than a service that fails at boot
    check_watch_args(inbox, min_rows, interval, max_wait, max_steps, epochs)
    args = [sys.executable, "-m", "edgeft", "device", "watch", "--bundle", str(bundle.resolve()), "--inbox", str(inbox.resolve()),
            "--min-rows", str(min_rows), "--interval", str(interval), "--epochs", str(epochs), "--tolerance", str(tolerance), "--nice", "0"]
    for flag, value in (("--state", state_dir and state_dir.resolve()), ("--max-wait", max_wait), ("--max-steps", max_steps),
                        ("--log", log_file and log_file.resolve())):
        if value is not None:
            args += [flag, str(value)]
    path = out or unit_path(name, user)
    unit = unit_text(args, nice, user, None if user else getpass.getuser(), f"edgeft: learn on-device from {inbox.resolve()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {path.parent}: {e.strerror or e}", "run with sudo for --system, or pass --user / --out") from None
    check_output(path, overwrite)
    atomic_write_text(path, unit)
    ctl = "systemctl --user" if user else "sudo systemctl"
    enable = f"{ctl} daemon-reload && {ctl} enable --now {path.stem}"
    emit({"unit": str(path), "enable": enable, "user": user, "exec": args}, as_json,
         f"{path}\nenable it: {enable}" + (f"\nkeep it running after logout: sudo loginctl enable-linger {getpass.getuser()}" if user else ""))
