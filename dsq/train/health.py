"""The divergence policy: bad steps are counted, reported, and a run that keeps taking them stops.

A step is *bad* when its training loss or its global gradient norm is not finite, or when
DeepSpeed skipped its update (ZeRO's overflow check: ``OVERFLOW! Skipping step``, the weights
stay as they were). Every bad step is counted (``train/nonfinite_steps``,
``train/skipped_steps`` in ``metrics.jsonl`` and MLflow, where a bad step is sent at once,
and in ``summary.json``) and warned about on the console; ``train.max_skipped_steps`` bad
steps in a row stop the run with :class:`Diverged` (``dsq train`` prints one ``dsq: error:``
line naming the steps and what to try, and exits 1).

Contracts the trainer keeps with it: :meth:`StepHealth.raise_diverged` runs after the step
is logged and before any checkpoint of that step; while a run of bad steps is under way
(:attr:`StepHealth.healthy` is False) no checkpoint is written on the ``train.ckpt_every``
cadence, so a diverged state never replaces the checkpoints before it; a checkpoint written
anyway (the end of the run, a stop signal) is marked not finite, and pruning keeps the newest
finite one (:mod:`dsq.run.checkpoint`). The counts travel in the checkpoint's client state,
so they (and a run of bad steps) go on across a resume. Every rank decides the same: the
loss is the mean over ranks, the gradient norm global, and ZeRO's overflow flag agreed by all
ranks.
"""

from __future__ import annotations

import math
from typing import Dict, Optional


class Diverged(RuntimeError):
    """``train.max_skipped_steps`` bad steps in a row; the message says which and what to try."""

    def __init__(self, msg: str, step: int):
        super().__init__(msg)
        self.step = step


def _finite(x: Optional[float]) -> bool:
    return x is None or math.isfinite(x)


class StepHealth:
    """``check(step, loss, grad_norm, applied)`` after every step; once it is logged,
    ``raise_diverged(step)`` when :attr:`diverged` (see the module docstring)."""

    def __init__(self, max_bad: int, hints: str):
        """``max_bad``: ``train.max_skipped_steps``; ``hints``: what to try, for the error."""
        self.max_bad, self.hints = max_bad, hints
        self.nonfinite = self.skipped = 0  # totals over the run
        self.streak = 0  # bad steps in a row, up to the current one
        self.last_good: Optional[int] = None  # the newest step that was not bad
        self._what = ""

    @property
    def healthy(self) -> bool:
        """Whether the newest step was good (a checkpoint of it may be written)."""
        return self.streak == 0

    def state(self) -> Dict:
        """For the checkpoint's client state."""
        return {"nonfinite": self.nonfinite, "skipped": self.skipped, "streak": self.streak,
                "last_good": self.last_good}

    def load(self, state: Optional[Dict], step: int) -> None:
        """Restore :meth:`state` (a checkpoint written before it existed: a good ``step``)."""
        state = state or {"last_good": step}
        self.nonfinite, self.skipped = int(state.get("nonfinite", 0)), int(state.get("skipped", 0))
        self.streak, self.last_good = int(state.get("streak", 0)), state.get("last_good")

    def metrics(self) -> Dict[str, float]:
        return {"train/nonfinite_steps": self.nonfinite, "train/skipped_steps": self.skipped}

    def check(self, step: int, loss: float, grad_norm: Optional[float], applied: bool
              ) -> Optional[str]:
        """Count this step; returns a warning line for a bad step, None for a good one.
        ``grad_norm`` None: not known (ZeRO-0 keeps none), only the loss counts."""
        finite = _finite(loss) and _finite(grad_norm)
        if finite and applied:
            self.streak, self.last_good = 0, step
            return None
        self.streak += 1
        self.nonfinite += not finite
        self.skipped += not applied
        what = [] if _finite(loss) else [f"loss {loss:g}"]
        what += [] if _finite(grad_norm) else [f"gradient norm {grad_norm:g}"]
        self._what = ", ".join(what + ([] if applied else ["DeepSpeed skipped the update"]))
        return (f"step {step}: {self._what} ({self.streak} bad in a row; the run stops at "
                f"train.max_skipped_steps={self.max_bad})")

    @property
    def diverged(self) -> bool:
        """``max_bad`` steps in a row were bad."""
        return self.streak >= self.max_bad

    def raise_diverged(self, step: int) -> None:
        """Raise :class:`Diverged` for the run of bad steps ending at ``step`` (call when
        :attr:`diverged`, after the step is logged, before it may be checkpointed)."""
        first = step - self.streak + 1
        good = (f"the last good step was {self.last_good}" if self.last_good is not None
                else "no step of this run was good")
        raise Diverged(f"training diverged at step {step}: steps {first}-{step} (train."
                       f"max_skipped_steps={self.max_bad} in a row) had a non-finite loss or "
                       f"gradient norm or were skipped by DeepSpeed (step {step}: {self._what});"
                       f" {good}. Try {self.hints}", step)


def hints(cfg) -> str:
    """What to try after a divergence, for this config."""
    tips = [f"a lower optim.lr (now {cfg.optim.lr:g})",
            f"a longer optim.warmup_steps (now {cfg.optim.warmup_steps})"]
    if cfg.optim.grad_clip == 0:
        tips.append("optim.grad_clip=1.0")
    if cfg.deepspeed.precision == "bf16":
        tips.append("deepspeed.precision=fp32 to rule out bf16 range or rounding")
    tips.append("checking the data of these steps")
    return ", ".join(tips) + "; then rerun the same command (it resumes from the latest " \
        "checkpoint)"
