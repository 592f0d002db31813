"""What `edgeft fleet serve` writes, round by round. Torch-free.

OUT/
  log.jsonl                 one JSON line per event: each client's reply in each round (node, device,
                            samples, bytes down and up, sha256, accepted or the reason it was refused),
                            each aggregate (method, clients, product error, held-out metrics)
  state/                    the server's generations (device/state.py's layout): generation N is round N's
                            adapter, so `edgeft device status --bundle BUNDLE --state OUT/state` lists them
  rounds/rNNNN/update/      round N's adapter as an adapter-only update for the bundle (update.py's format:
                            `edgeft device apply-update --bundle BUNDLE OUT/rounds/rNNNN/update` on any device)
  rounds/rNNNN/adapter/     the same weights as a PEFT adapter (`edgeft import`, `PeftModel.from_pretrained`)
  latest.json               the last round written: its folders and metrics
  summary.json              the whole run, written when it ends
"""

from __future__ import annotations

import time
from pathlib import Path

from ..fsutil import append_jsonl, atomic_write_json


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FleetOutput:
    def __init__(self, out: Path, bundle: Path, manifest):
        from ..device.state import DeviceState

        self.out, self.bundle, self.manifest = Path(out), Path(bundle), manifest
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = DeviceState(self.out / "state", self.bundle, manifest)

    def event(self, kind: str, **fields) -> dict:
        record = {"at": now(), "event": kind, **fields}
        append_jsonl(self.out / "log.jsonl", record)
        return record

    def write_round(self, rnd: int, weights: dict, metrics: dict, source: dict) -> dict:
        """Round `rnd`'s adapter: a generation of the server's state, an update folder, a PEFT folder."""
        from ..device.adapter_out import export_adapter

        with self.state.lock():
            gen = self.state.next_id()
            self.state.add_generation({"id": gen, "parent": self.state.current, "status": "promoted", "reason": f"fleet round {rnd}",
                                       "created": now(), "source": "fleet", "data": None, "fleet": {"round": rnd, **source},
                                       "metrics": {"candidate": {"server": metrics}} if metrics else {}}, weights, promote=True)
        folder = self.out / "rounds" / f"r{rnd:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        update = write_update(self.bundle, self.manifest, weights, folder / "update", {"name": f"fleet round {rnd}", "step": rnd,
                                                                                      "metrics": metrics, **source})
        export_adapter(self.state, folder / "adapter", gen, overwrite=True)
        latest = {"round": rnd, "generation": gen, "update": str(folder / "update"), "adapter": str(folder / "adapter"),
                  "update_bytes": update, "metrics": metrics}
        atomic_write_json(self.out / "latest.json", latest)
        return latest

    def summary(self, d: dict) -> None:
        atomic_write_json(self.out / "summary.json", d)


def write_update(bundle: Path, manifest, weights: dict, out: Path, source: dict) -> int:
    """An adapter-only update (update.py's format, what `edgeft export --update-for` writes) for `bundle`.
    Its parity figures say it was not checked against torch: the server holds the bundle, not a torch model;
    every device checks it against its bundle (base, shapes, hashes) when it applies it."""
    from .. import update

    record = {"task": manifest.task, "labels": manifest.labels, "scheme": manifest.scheme, "base": manifest.base.to_dict(), "source": source}
    parity = {"checked": False, "why": "a fleet aggregate: made on the server from device adapters, not from a torch run"}
    _, size = update.write_update(out, bundle, manifest, weights, bundle / "adapter" / "adapter_config.json", record,
                                  update.read_lora_signature(bundle / "adapter"), source, parity)
    return size
