"""The learning-rate schedule, and the hyperparameters a resumed run takes from its config.

:func:`lr_lambda` is a factor of ``optim.lr`` per step, for ``LambdaLR``. A checkpoint holds
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


def lr_lambda(optim_cfg, total_steps: int):
    """Linear warmup, then cosine decay from lr to min_lr at ``total_steps`` (a factor of lr)."""
    warm, floor = optim_cfg.warmup_steps, optim_cfg.min_lr / optim_cfg.lr

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

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
