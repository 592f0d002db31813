"""A one-line progress report for devices: no tqdm, one line per update when not on a TTY."""

from __future__ import annotations

import os
import sys
import time


class ProgressLine:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, every_s: float = 10.0):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.every = float(os.environ.get("EDGEFT_PROGRESS_SECONDS") or (0.2 if self.tty else every_s))
        self.t0 = self.last = time.perf_counter()

    def update(self, step: int, **fields) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every and step < self.total):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        parts = [f"step {step}/{self.total}", *(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()), f"{rate:.2f} steps/s"]
        line = "  ".join(parts)
        print(f"\r{line}\033[K" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)
