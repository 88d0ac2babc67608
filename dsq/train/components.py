"""The trainer's components, each owning its cadence: the loop asks them, it does no arithmetic
on steps itself.

* :class:`EvalSchedule`: which steps evaluate (``train.eval_every``, and the last), shared by
  the validation loss and the SQNR capture of quantized layers.
* :class:`Checkpointer`: ``maybe_save(step, last)`` writes a checkpoint on
  ``train.ckpt_every`` (in the background with ``train.async_ckpt``) and at the end (or on a
  stop, waiting for every write), never twice for one step and never of a bad state on the
  cadence; ``load`` restores one under this run's hyperparameters.
* :class:`StepLogger`: rank 0's record of a step: ``metrics.jsonl``, MLflow (every
  ``train.log_every`` steps and at every evaluation), the progress bar or plain lines, and the
  loss-spike guard.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from dsq.log import warn
from dsq.run import checkpoint
from dsq.run.async_ckpt import BackgroundWriter
from dsq.train.progress import Progress, SpikeGuard
from dsq.train.schedule import hold, reapply


@dataclass(frozen=True)
class EvalSchedule:
    every: int
    """``train.eval_every`` (0: only at the end)."""
    last: int
    """``train.steps``."""

    def due(self, step: int) -> bool:
        """Whether ``step`` is an evaluation step (the last step always is)."""
        return step == self.last or bool(self.every and step % self.every == 0)

    def mid_run(self, step: int) -> bool:
        """An evaluation inside the loop (the final one runs after it)."""
        return step < self.last and self.due(step)


class Checkpointer:
    """Complete-or-absent checkpoints of one run (:mod:`dsq.run.checkpoint`), on all ranks."""

    def __init__(self, engine, root: Path, every: int, last: int, keep: int,
                 state: Callable[[int], Dict], files: Callable[[], Dict[str, object]],
                 background: Optional[bool] = False):
        """``state(step)``: the client state to save; ``files()``: extra files of the tag
        (name -> text or bytes, written by rank 0 before the tag is marked complete);
        ``background`` (``train.async_ckpt``): saves on the cadence are written by a thread
        (:mod:`dsq.run.async_ckpt`), a ``last`` save waits for every write."""
        self.engine, self.root = engine, root
        self.every, self.last, self.keep = every, last, keep
        self._state, self._files = state, files
        if background is None:  # train.async_ckpt's default: where the host CPU is idle
            background = torch.cuda.is_available()
        self.writer = BackgroundWriter() if background else None
        self.stalls: List[float] = []
        """Seconds each save blocked the training loop."""

    def exists(self, step: int) -> bool:
        return (self.root / checkpoint.tag_for(step) / checkpoint.MARKER).exists()

    def due(self, step: int, last: bool = False) -> bool:
        """On the cadence, or (``last``: the end of the run, a stop) unless saved already."""
        return (not self.exists(step)) if last else bool(
            self.every and step % self.every == 0 and step < self.last)

    def maybe_save(self, step: int, last: bool = False, loss: Optional[float] = None,
                   finite: bool = True) -> bool:
        """Save when :meth:`due`. ``finite``: whether the state is a good one (not inside a run
        of bad steps, :mod:`dsq.train.health`): the cadence skips bad states, a ``last`` save
        writes it marked not finite, and pruning keeps the newest finite one. Returns whether
        a checkpoint was written."""
        t0 = time.perf_counter()
        if last and self.writer is not None:
            self.writer.wait()  # a pending write of this step counts as saved
        if not self.due(step, last) or not (finite or last):
            return False
        args = (self.engine, self.root, step, self._state(step), self.keep, self._files(),
                loss, finite)
        if self.writer is not None and not last:
            self.writer.submit(*args)
        else:
            checkpoint.save(*args)
        self.stalls.append(time.perf_counter() - t0)
        return True

    def close(self) -> None:
        """Wait for a pending background write (a run that fails for another reason: its
        failure is only reported, the run's own error goes on)."""
        if self.writer is not None:
            try:
                self.writer.wait()
            except Exception as e:
                warn(str(e))

    def load(self, tag: str) -> Dict:
        """Restore ``tag`` under this run's config: the model and optimizer state and the
        schedule's position come from the checkpoint, the hyperparameters (learning-rate
        schedule, betas, eps, weight decay, gradient clipping) from the config the optimizer
        and scheduler were built with (:func:`dsq.train.schedule.reapply`)."""
        held = hold(self.engine)
        state = checkpoint.load(self.engine, self.root, tag)
        reapply(self.engine, held)
        return state


class StepLogger:
    """Rank 0's per-step record; on other ranks every method is a no-op."""

    def __init__(self, out_dir: Path, tracker, cfg, start_step: int, enabled: bool,
                 vocab_size: int):
        self.out_dir, self.tracker, self.enabled = out_dir, tracker, enabled
        self.log_every, self.last_step = cfg.log_every, cfg.steps
        self.spike_factor = cfg.spike_factor
        self.guard = SpikeGuard(cfg.spike_factor, cfg.spike_window, bound=math.log(vocab_size))
        self.bar: Optional[Progress] = (Progress(cfg.steps, start_step, cfg.log_every,
                                                 enabled=cfg.progress) if enabled else None)

    @property
    def spikes(self) -> List[int]:
        return self.guard.spikes

    def spike(self, step: int, loss: float, metrics: Dict[str, float]) -> None:
        """Run the spike guard on this step's loss (every rank keeps the same history); a spike
        is warned about and added to ``metrics`` as ``train/loss_spike``."""
        ratio = self.guard.check(step, loss)
        if ratio is None:
            return
        metrics["train/loss_spike"] = ratio
        ref = ("the median of the steps before" if self.guard.by_median else
               "ln(vocabulary size), an untrained model's loss")
        self.warn(f"loss spike at step {step}: {loss:.4f} is {ratio:.2f}x {ref} "
                  f"(train.spike_factor={self.spike_factor:g})")

    def warn(self, msg: str) -> None:
        """A ``dsq: warning:`` line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(f"dsq: warning: {msg}")

    def log(self, step: int, metrics: Dict[str, float], force: bool = False) -> None:
        """Append to ``metrics.jsonl``; MLflow every ``log_every`` steps, at the last step, at
        evaluations and SQNR measurements, and when ``force`` (a bad step)."""
        if not self.enabled:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if (force or step % self.log_every == 0 or step == self.last_step
                or any(k.startswith(("val/", "sqnr_db/")) for k in metrics)):
            self.tracker.log_metrics(metrics, step)

    def progress(self, step: int, post: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(step, post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
