"""Rank 0's view of training: a progress bar on a terminal, plain lines elsewhere, and the
loss-spike guard.

:class:`Progress` shows tqdm's bar when stderr is a terminal; otherwise (a SLURM log, a pipe)
it prints one plain line every ``train.log_every`` steps, and at the first step it runs and the
last, so logs hold lines, not one bar redrawn thousands of times with carriage returns.

:class:`SpikeGuard` compares each step's training loss with the median of the previous
``window`` steps; a loss above ``factor`` x that median is a spike: it is reported once (a
``dsq: warning`` line) and returned as a ratio for the ``train/loss_spike`` metric. Until
``min_history`` steps are in the window it compares with an absolute bound instead, ``factor``
x ln(vocabulary size), the loss of a uniform guess that an untrained model starts near, so a
run that blows up in its first steps is flagged there (and such losses never become the
median later steps are compared with). Large runs watch for this: a spike is often the first
sign of a bad batch or an optimizer instability. Non-finite losses are the divergence
policy's (:mod:`dsq.train.health`), not spikes.
"""

from __future__ import annotations

import collections
import math
import statistics
import sys
from typing import Deque, Dict, Optional, TextIO


class SpikeGuard:
    """``check(step, loss)`` -> loss / reference when it exceeds ``factor``, else None: the
    reference is the median of the window once it holds ``min_history`` losses, before that
    ``bound`` (ln of the vocabulary size; None: no bound, those steps are never flagged).
    ``factor`` 0 disables."""

    def __init__(self, factor: float, window: int = 20, min_history: int = 5,
                 bound: Optional[float] = None):
        self.factor, self.min_history, self.bound = factor, min(min_history, window), bound
        self.recent: Deque[float] = collections.deque(maxlen=window)
        self.spikes: list = []
        self.by_median = False  # whether the last check compared with the median

    def check(self, step: int, loss: float) -> Optional[float]:
        if not math.isfinite(loss):
            return None
        filled = self.by_median = len(self.recent) >= self.min_history
        ref = statistics.median(self.recent) if filled else self.bound
        ratio = None
        if self.factor > 0 and ref is not None and ref > 0 and loss > self.factor * ref:
            ratio = loss / ref
            self.spikes.append(step)
        if filled or ratio is None:
            self.recent.append(loss)
        return ratio


class Progress:
    """tqdm on a terminal, else a line every ``log_every`` steps, at the first step after
    ``initial`` and at the last (on ``stream``, stderr)."""

    def __init__(self, total: int, initial: int, log_every: int, enabled: bool = True,
                 stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.first = initial + 1
        self.bar = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            desc="train", file=self.stream)

    def update(self, step: int, post: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.enabled and (step % self.log_every == 0 or step in (self.first, self.total)):
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
