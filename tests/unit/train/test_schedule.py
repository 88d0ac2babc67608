"""The learning-rate schedules of ``optim.schedule`` (dsq.train.schedule.lr_lambda) against
values computed by hand at the steps that matter: the warmup's first and last step, the
stable region, the start of the decay, its middle and its end, and past the end."""

from __future__ import annotations

import math

import pytest

from dsq.config import ConfigError, load_config
from dsq.train.schedule import lr_lambda

# lr 1e-3, min_lr 1e-4: floor = 0.1; warmup W = 10 steps; T = 110 steps
BASE = ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=10"]
T = 110


def _fn(*overrides, steps=T):
    cfg = load_config([], [*BASE, *overrides])
    return lr_lambda(cfg.optim, steps)


def _check(fn, want):
    got = {k: fn(k) for k in want}
    assert got == pytest.approx(want, abs=1e-12)


def test_warmup_is_the_same_for_every_schedule():
    for kind in ("cosine", "wsd", "linear", "constant"):
        # step k uses (k + 1) / W during warmup: 0.1 at the first step, 1 at the last (k = 9)
        _check(_fn(f"optim.schedule={kind}"), {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0})


def test_cosine():
    # p = (k - 10) / 100; factor = 0.1 + 0.9 * (1 + cos(pi p)) / 2
    _check(_fn(), {10: 1.0,                                       # p = 0
                   35: 0.1 + 0.45 * (1 + math.sqrt(0.5)),         # p = 1/4: 0.86819805
                   60: 0.55,                                      # p = 1/2
                   85: 0.1 + 0.45 * (1 - math.sqrt(0.5)),         # p = 3/4: 0.23180195
                   110: 0.1, 200: 0.1})
    assert _fn()(35) == pytest.approx(0.868198052, abs=1e-9)


def test_linear():
    # factor = 0.1 + 0.9 * (1 - (k - 10) / 100)
    _check(_fn("optim.schedule=linear"), {10: 1.0, 35: 0.775, 60: 0.55, 109: 0.109, 110: 0.1,
                                          200: 0.1})


def test_wsd():
    # decay over the last round(0.2 * 110) = 22 steps: it starts at D = 88;
    # factor = 0.1 + 0.9 * (1 - (k - 88) / 22) from there
    fn = _fn("optim.schedule=wsd", "optim.decay_fraction=0.2")
    _check(fn, {10: 1.0, 50: 1.0, 87: 1.0, 88: 1.0, 99: 0.55, 109: 0.1 + 0.9 / 22, 110: 0.1,
                200: 0.1})
    # the default decay_fraction is 0.2
    assert _fn("optim.schedule=wsd")(99) == pytest.approx(0.55, abs=1e-12)
    # a decay longer than what follows the warmup starts at the warmup's end: linear
    full, lin = _fn("optim.schedule=wsd", "optim.decay_fraction=1"), _fn("optim.schedule=linear")
    assert [full(k) for k in range(T + 1)] == [lin(k) for k in range(T + 1)]
    # decay_fraction 0.5 of 110: D = 55
    _check(_fn("optim.schedule=wsd", "optim.decay_fraction=0.5"), {54: 1.0, 55: 1.0,
                                                                    82: 0.1 + 0.9 * 28 / 55})


def test_constant_and_no_warmup():
    _check(_fn("optim.schedule=constant"), {10: 1.0, 60: 1.0, 110: 1.0, 200: 1.0})
    # no warmup: the cosine starts at step 0, p = k / 110
    _check(_fn("optim.warmup_steps=0"), {0: 1.0, 50: 0.1 + 0.45 * (1 + math.cos(math.pi * 50
                                                                                 / 110)),
                                         110: 0.1})


@pytest.mark.parametrize("override, key", [("optim.schedule=step", "optim.schedule"),
                                           ("optim.decay_fraction=0", "optim.decay_fraction"),
                                           ("optim.decay_fraction=1.5", "optim.decay_fraction")])
def test_bad_schedule_keys_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config([], [override])
