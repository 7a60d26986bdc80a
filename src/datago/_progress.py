"""A one-line progress bar on stderr (redrawn in place on a terminal, a line every
few seconds otherwise)."""

from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: Optional[int], unit: str = "img"):
        self.total, self.unit = total, unit
        self.n, self.t0, self.last = 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, k: int) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self.last >= (0.2 if self.tty else 5.0):
            self.last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        if self.total:
            frac = min(1.0, self.n / self.total)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            text = f"[{bar}] {self.n}/{self.total} {self.unit} {rate:6.1f} {self.unit}/s"
        else:
            text = f"{self.n} {self.unit} {rate:6.1f} {self.unit}/s"
        sys.stderr.write(("\r" if self.tty else "") + text + (end or ("" if self.tty else "\n")))
        sys.stderr.flush()

    def close(self) -> None:
        self._draw(time.perf_counter(), end="\n")
