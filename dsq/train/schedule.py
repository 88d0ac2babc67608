"""The learning-rate schedule: a factor of ``optim.lr`` per step, for ``LambdaLR``."""

from __future__ import annotations

import math


def lr_lambda(optim_cfg, total_steps: int):
    """Linear warmup, then cosine decay from lr to min_lr at ``total_steps`` (a factor of lr)."""
    warm, floor = optim_cfg.warmup_steps, optim_cfg.min_lr / optim_cfg.lr

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
