"""The preparation's progress: a bar on a terminal, a plain line every ``every_s`` elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def _size(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


class PrepareProgress:
    """``update(documents, text_bytes, tokens)`` with running totals of one pass."""

    def __init__(self, what: str, total_bytes: Optional[int], log: Callable[[str], None],
                 every_s: float = 30.0, stream=None):
        self.what, self.total, self.log, self.every_s = what, total_bytes, log, every_s
        self.stream = stream or sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.t0 = self.last = time.monotonic()
        self.base = (0, 0, 0)  # totals when this process started counting (a resumed pass)
        self.drawn = False

    def rebase(self, docs: int, nbytes: int, tokens: int) -> None:
        """Rates count from here (a resumed pass skipped what was written before)."""
        self.base, self.t0 = (docs, nbytes, tokens), time.monotonic()

    def line(self, docs: int, nbytes: int, tokens: int) -> str:
        b = self.base
        dt = max(1e-9, time.monotonic() - self.t0)
        rate = (nbytes - b[1]) / dt
        eta = ""
        if self.total and rate > 0 and nbytes < self.total:
            left = (self.total - nbytes) / rate
            eta = f", ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        pct = f" ({100 * min(1.0, nbytes / self.total):.0f}%)" if self.total else ""
        return (f"data: {self.what}: {_size(docs)} documents, {_size(nbytes)}B{pct}, "
                f"{_size(tokens)} tokens; {_size((docs - b[0]) / dt)} docs/s, "
                f"{_size(rate)}B/s, {_size((tokens - b[2]) / dt)} tokens/s{eta}")

    def update(self, docs: int, nbytes: int, tokens: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self.last >= 0.5:
                print("\r" + self.line(docs, nbytes, tokens) + "\033[K", end="",
                      file=self.stream, flush=True)
                self.drawn, self.last = True, now
        elif force or now - self.last >= self.every_s:
            self.log(self.line(docs, nbytes, tokens))
            self.last = now

    def close(self) -> None:
        if self.drawn:
            print(file=self.stream, flush=True)
