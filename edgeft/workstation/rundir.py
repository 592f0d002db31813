"""Where a training run lives on disk, and how it survives crashes and --overwrite. Torch-free.

- **--overwrite never loses the previous run to a failed new one.** The new run trains in the
  hidden sibling `.NAME.new` and replaces NAME (`fsutil.swap_in`) only when training has
  finished. Swapping at the first checkpoint instead would trade a finished run, adapter and all,
  for one that has no adapter yet and may still diverge; the price of swapping at the end is that
  the run's files sit in `.NAME.new` while it trains (the log says so). If it fails, `.NAME.new`
  is deleted; if it is interrupted (Ctrl-C, a kill, power loss) with a checkpoint,
  `edgeft train --resume NAME` continues `.NAME.new` and swaps it in at the end: the last command
  given for NAME was to replace it. A new run without --overwrite refuses while `.NAME.new`
  waits; another --overwrite discards it.
- **A swap cut short is settled before the run is read or written** (`fsutil.recover_swap`): for
  the run folder and for its adapter/ and checkpoint/.
- **Paths in config.json are relative to the run folder**, so `--resume` and `edgeft export --run`
  work from any working directory, and a run moved together with its model and data still
  resolves them.
- **metrics.jsonl after a crash** holds rows past the last checkpoint, which the resumed run
  writes again; `truncate_metrics` drops them first.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from ..fsutil import atomic_write_text, old_name, recover_swap

PATH_FIELDS = ("model", "data", "eval_data", "reference_data", "init_adapter")


def staging_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.new")


def has_checkpoint(run: Path) -> bool:
    """checkpoint/, or its .old twin that recover_swap puts back."""
    return (run / "checkpoint").is_dir() or old_name(run / "checkpoint").is_dir()


def is_resumable(run: Path) -> bool:
    return (run / "config.json").is_file() and has_checkpoint(run)


@dataclass
class RunDir:
    """`final`: the folder the user named. `work`: where this process writes, `final` or its staging twin."""

    final: Path
    work: Path

    @property
    def staged(self) -> bool:
        return self.work != self.final


def plan_run_dir(final: Path, resume: bool, overwrite: bool, main: bool = True, log=print) -> RunDir:
    """Checked before any work, so a bad invocation never touches an earlier run.

    Only the main process repairs anything (`main`); under torchrun the others only work out the
    same answer, and read files after the process group has met, i.e. after the repairs.
    """
    final = Path(final)
    staging = staging_path(final)
    if main:
        _note(log, recover_swap(final))
    if resume:
        if is_resumable(staging):
            work = staging
            if main:
                log(f"resuming the unfinished --overwrite of {final} in {staging}; it replaces {final} when it finishes")
        else:
            if main and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
                log(f"removed {staging}: the --overwrite run writing it stopped before its first checkpoint")
            # the main process has put a swap cut short back by now; the others may still see its .old
            if not (is_resumable(final) or (not main and is_resumable(old_name(final)))):
                raise OutputError(f"{final} is not a resumable run (no config.json or checkpoint/)", "start a new run with --out")
            work = final
        if main:
            for sub in ("checkpoint", "adapter"):
                _note(log, recover_swap(work / sub))
        return RunDir(final, work)
    if final.exists() and not overwrite:
        raise OutputError(f"output folder {final} already exists", "pick another --out, pass --overwrite to replace it, or --resume to continue it")
    if staging.exists() and not overwrite:
        raise OutputError(f"an unfinished --overwrite of {final} waits in {staging}",
                          f"--resume {final} to finish it, or pass --overwrite to discard it")
    parent = final.parent if str(final.parent) else Path(".")
    if not os.access(parent if parent.exists() else Path("."), os.W_OK):
        raise OutputError(f"cannot write to {parent}", "choose an --out in a writable folder")
    return RunDir(final, staging if final.exists() else final)


def start_run_dir(run: RunDir, log=print) -> None:
    """Main process, once input is validated: an empty work folder (a stale staging one is discarded)."""
    staging = staging_path(run.final)
    if staging.exists():
        shutil.rmtree(staging)
        log(f"discarded {staging}, an earlier unfinished --overwrite of {run.final}")
    run.work.mkdir(parents=True)
    if run.staged:
        log(f"training into {run.work}; it replaces {run.final} when training ends")


def _note(log, message: str | None) -> None:
    if message:
        log(message)


# -- config.json paths ----------------------------------------------------------
def to_run_relative(value: str | None, run: Path) -> str | None:
    """`value` (relative to the working directory) as seen from the run folder."""
    if value is None:
        return None
    try:
        return os.path.relpath(Path(value).resolve(), Path(run).resolve())
    except ValueError:  # another drive (Windows): only an absolute path reaches it
        return str(Path(value).resolve())


def from_run_relative(value: str | None, run: Path) -> str | None:
    """A config.json path back to one usable from the working directory.

    `runs/x/../../models/m` is tidied to `models/m` only when both name the same folder (they do
    not when runs/x is a symlink). A config.json written before paths were run-relative held
    paths relative to the working directory of the time: when the run-relative reading names
    nothing and the old reading does, the old one is meant.
    """
    if value is None or Path(value).is_absolute():
        return value
    joined = Path(run) / value
    if not joined.exists():
        return value if Path(value).exists() else os.path.normpath(joined)
    tidy = Path(os.path.normpath(joined))
    return str(tidy if tidy.exists() and tidy.resolve() == joined.resolve() else joined)


def config_for_disk(cfg: dict, run: Path) -> dict:
    out = {**cfg, "out": "."}
    for name in PATH_FIELDS:
        if name in out:
            out[name] = to_run_relative(out[name], run)
    return out


def read_run_config(run: Path, folder: Path | None = None) -> dict:
    """config.json of the run `run` (read from `folder`, default `run`), paths usable from here."""
    folder = Path(folder or run)
    cfg = json.loads((folder / "config.json").read_text())
    for name in PATH_FIELDS:
        if name in cfg:
            cfg[name] = from_run_relative(cfg[name], folder)
    cfg["out"] = str(run)
    return cfg


def resume_folder(run: Path) -> Path | None:
    """The folder whose config.json `--resume run` continues, without changing anything on disk:
    the unfinished --overwrite, else the run, else the run's copy set aside by a swap cut short
    (plan_run_dir puts it back)."""
    run = Path(run)
    for folder in (staging_path(run), run, old_name(run)):
        if is_resumable(folder) or (folder == run and (run / "config.json").is_file()):
            return folder
    return None


# -- metrics.jsonl ------------------------------------------------------------------
def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows up to `step` (the checkpoint's; its evaluation row included), byte for byte.

    Rows past it were written after the checkpoint by a process that then died; the resumed run
    writes them again. A line torn by the crash goes too. Returns how many rows were dropped.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
            keep = line.endswith("\n") and int(row.get("step", 0)) <= step
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped
