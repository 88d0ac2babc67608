"""Rank 0's view of training: a progress bar on a terminal, plain lines elsewhere, and the
loss-spike guard.

:class:`Progress` shows tqdm's bar when stderr is a terminal; otherwise (a SLURM log, a pipe)
it prints one plain line every ``train.log_every`` steps, so logs hold lines, not one bar
redrawn thousands of times with carriage returns.

:class:`SpikeGuard` compares each step's training loss with the median of the previous
``window`` steps; a loss above ``factor`` x that median is a spike: it is reported once (a
``dsq: warning`` line) and returned as a ratio for the ``train/loss_spike`` metric. Large runs
watch for this: a spike is often the first sign of a bad batch or an optimizer instability.
"""

from __future__ import annotations

import collections
import statistics
import sys
from typing import Deque, Dict, Optional, TextIO


class SpikeGuard:
    """``check(step, loss)`` -> loss / recent median when it exceeds ``factor``, else None.
    ``factor`` 0 disables; the first ``min_history`` steps are never flagged."""

    def __init__(self, factor: float, window: int = 20, min_history: int = 5):
        self.factor, self.min_history = factor, min_history
        self.recent: Deque[float] = collections.deque(maxlen=window)
        self.spikes: list = []

    def check(self, step: int, loss: float) -> Optional[float]:
        ratio = None
        if self.factor > 0 and len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:
                ratio = loss / median
                self.spikes.append(step)
        self.recent.append(loss)
        return ratio


class Progress:
    """tqdm on a terminal, else a line every ``log_every`` steps (on ``stream``, stderr)."""

    def __init__(self, total: int, initial: int, log_every: int, enabled: bool = True,
                 stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.bar = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            desc="train", file=self.stream)

    def update(self, step: int, post: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            fields = "  ".join(f"{k} {v}" for k, v in post.items())
            print(f"step {step}/{self.total}  {fields}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
