"""The learning-rate schedule, and the hyperparameters a resumed run takes from its config.

:func:`lr_lambda` is a factor of ``optim.lr`` per step, for ``LambdaLR`` (``optim.schedule``:
cosine, wsd, linear or constant, each after a linear warmup). A checkpoint holds
the optimizer's param groups (learning rate, betas, eps, weight decay) and the scheduler's
``base_lrs`` as they were when it was written, and DeepSpeed's ZeRO wrapper its gradient
clipping; restoring them as they are would silently keep the old values of the keys a resume
may change (README: resume). So a restore is wrapped: :func:`hold` takes this run's values
from the optimizer and scheduler built from its config before the checkpoint is loaded, and
:func:`reapply` puts them back after it, with the schedule rebuilt at the restored position
(``last_epoch``: the optimizer steps taken, which DeepSpeed does not advance on a skipped
step). The state tensors (moments, step counts) stay the checkpoint's. With an unchanged
config every value is the one restored, so the resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Dict

# param-group keys that come from the config (initial_lr: the scheduler's base learning rate)
HYPERPARAMETERS = ("initial_lr", "betas", "eps", "weight_decay")


SCHEDULES = ("cosine", "wsd", "linear", "constant")


def lr_lambda(optim_cfg, total_steps: int):
    """The learning rate of each step as a factor of ``optim.lr``: ``fn(k)`` for the step that
    follows ``k`` optimizer steps (``LambdaLR``'s ``last_epoch``), ``fn(total_steps)`` after
    the last one.

    Every schedule warms up linearly over ``optim.warmup_steps`` (``(k + 1) / warmup``), then
    with ``floor = min_lr / lr``:

    * ``cosine``: ``floor + (1 - floor) (1 + cos(pi p)) / 2`` with ``p = (k - W) / (T - W)``;
    * ``linear``: ``floor + (1 - floor) (1 - p)``, the same ``p``;
    * ``wsd`` (warmup-stable-decay): 1 until the decay starts at ``D = T - round(decay_fraction
      T)`` (not before the warmup ends), then linear to ``floor`` at ``T``:
      ``floor + (1 - floor) (1 - (k - D) / (T - D))``;
    * ``constant``: 1.

    (``W``: warmup steps, ``T``: ``total_steps``; ``p`` is clamped to 1 past ``T``.)
    """
    kind = optim_cfg.schedule
    warm, floor = optim_cfg.warmup_steps, optim_cfg.min_lr / optim_cfg.lr
    start = warm
    if kind == "wsd":
        start = max(warm, total_steps - round(optim_cfg.decay_fraction * total_steps))

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "constant" or step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return fn


def _client(engine):
    """The client optimizer (DeepSpeed's ZeRO / bf16 wrapper unwrapped)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def hold(engine) -> Dict:
    """This run's hyperparameters, read from ``engine``'s optimizer (built from the config)
    before a checkpoint is loaded into it."""
    return {"groups": [{k: g[k] for k in HYPERPARAMETERS if k in g}
                       for g in _client(engine).param_groups],
            "clip_grad": getattr(engine.optimizer, "clip_grad", None)}


def reapply(engine, held: Dict) -> None:
    """After a checkpoint is loaded into ``engine``: the values :func:`hold` took replace the
    restored ones, and the ``LambdaLR`` schedule (its function is this run's: functions are
    not saved) is rebuilt on this run's base learning rates at the restored ``last_epoch``."""
    groups = _client(engine).param_groups
    for g, h in zip(groups, held["groups"]):
        g.update(h)
    if held["clip_grad"] is not None:
        engine.optimizer.clip_grad = held["clip_grad"]
    sched = engine.lr_scheduler
    if sched is None:
        return
    sched.base_lrs = [g["initial_lr"] for g in groups]
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    sched._last_lr = list(lrs)
