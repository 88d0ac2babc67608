"""Resume changes take effect: a checkpoint's optimizer and scheduler state restored the way
DeepSpeed restores it (the client optimizer's ``load_state_dict``, the scheduler's, ZeRO's
``clip_grad``), wrapped in :func:`dsq.train.schedule.hold` / ``reapply`` as the trainer's
checkpointer does, leaves every hyperparameter the README lets a resume change at its new
value, keeps the saved moments, and with an unchanged config continues bit for bit. One test
per key, for torch AdamW and QAdamW; the same through DeepSpeed and the CLI:
tests/e2e/test_long_runs.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dsq.config import flatten, load_config, to_dict
from dsq.optim import build_optimizer
from dsq.run.rundir import _frozen
from dsq.train.schedule import hold, lr_lambda, reapply

K = 3  # steps before the checkpoint
BASE = ["optim.lr=2e-3", "optim.min_lr=1e-4", "optim.warmup_steps=2", "train.steps=10",
        "optim.weight_decay=0.1", "optim.grad_clip=1.0", "optim.kernel=reference",
        "optim.block_size=64"]
# key -> its new value on resume
CHANGES = {"optim.lr": 1e-3, "optim.min_lr": 5e-4, "optim.warmup_steps": 5, "train.steps": 20,
           "optim.weight_decay": 0.05, "optim.beta1": 0.8, "optim.beta2": 0.95,
           "optim.eps": 1e-6, "optim.grad_clip": 0.5, "optim.schedule": "wsd",
           "optim.decay_fraction": 0.8}
# what both the old and the new config of a key's test set too (decay_fraction acts under wsd)
WITH = {"optim.decay_fraction": ["optim.schedule=wsd"]}
# the other keys a resume may change: read from the config as the run starts, nothing of them
# is restored from a checkpoint (the cadences are checked through the CLI in
# tests/e2e/test_long_runs.py)
FROM_CONFIG = {
    "optim.kernel", "train.steps", "train.eval_every", "train.eval_samples", "train.ckpt_every",
    "train.keep_ckpts", "train.async_ckpt", "train.log_every", "train.peak_flops",
    "train.spike_factor",
    "train.spike_window",
    "train.max_skipped_steps", "train.out_dir", "train.progress", "train.recompute",
    "train.reshard", "parallel.timeout_s", "deepspeed.overlap_comm",
    "deepspeed.reduce_bucket_size", "deepspeed.allgather_bucket_size", "data.cache_dir", "data.workers",
    "data.tokenizer_sample_bytes", "data.prepare_limit_bytes", "tracking.enabled",
    "tracking.uri", "tracking.experiment", "tracking.run_name", "tracking.recipe",
    "tracking.close_timeout_s", "tracking.system_metrics"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Net(nn.Module):
    """One parameter group of each kind: linear (64x64: quantized moments), embedding,
    no_decay."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(16, 64)
        self.fc = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        return self.norm(self.fc(self.embedding(x))).pow(2).mean()


def _cfg(*overrides):
    return load_config([], [*BASE, *overrides])


def _build(cfg):
    """Model, optimizer, scheduler, and an engine-like object as DeepSpeed's ZeRO holds them."""
    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.train.steps))
    wrapper = SimpleNamespace(optimizer=opt, clip_grad=cfg.optim.grad_clip)
    return model, SimpleNamespace(optimizer=wrapper, lr_scheduler=sched)


def _train(model, engine, steps):
    opt = engine.optimizer.optimizer
    for s in range(steps):
        x = torch.randint(0, 16, (8,), generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        model(x).backward()
        opt.step()
        engine.lr_scheduler.step()


def _checkpoint(model, engine):
    return copy.deepcopy({"model": model.state_dict(),
                          "optim": engine.optimizer.optimizer.state_dict(),
                          "sched": engine.lr_scheduler.state_dict(),
                          "clip": engine.optimizer.clip_grad})


def _resume(cfg, ckpt):
    """A run of ``cfg`` restored from ``ckpt`` as DeepSpeed does, held and reapplied."""
    model, engine = _build(cfg)
    held = hold(engine)
    model.load_state_dict(ckpt["model"])
    engine.optimizer.optimizer.load_state_dict(ckpt["optim"])
    engine.lr_scheduler.load_state_dict(ckpt["sched"])
    engine.optimizer.clip_grad = ckpt["clip"]
    reapply(engine, held)
    return model, engine


def _in_effect(engine, cfg, step):
    """What the optimizer will use for the next step, as the config says it should be."""
    opt = engine.optimizer.optimizer
    lr = cfg.optim.lr * lr_lambda(cfg.optim, cfg.train.steps)(step)
    want = [{"lr": lr, "initial_lr": cfg.optim.lr, "betas": (cfg.optim.beta1, cfg.optim.beta2),
             "eps": cfg.optim.eps,
             "weight_decay": 0.0 if g["kind"] == "no_decay" else cfg.optim.weight_decay}
            for g in opt.param_groups]
    got = [{k: g[k] for k in want[0]} for g in opt.param_groups]
    return got, want


@pytest.fixture(scope="module", params=["adamw", "qadamw"])
def saved(request):
    cfg = _cfg(f"optim.name={request.param}")
    model, engine = _build(cfg)
    _train(model, engine, K)
    return request.param, _checkpoint(model, engine)


@pytest.mark.parametrize("key", list(CHANGES))
def test_a_changed_key_is_in_effect_after_resume(saved, key):
    name, ckpt = saved
    base = [f"optim.name={name}", *WITH.get(key, [])]
    old, new = _cfg(*base), _cfg(*base, f"{key}={CHANGES[key]}")
    model, engine = _resume(new, ckpt)
    got, want = _in_effect(engine, new, K)
    assert got == want
    assert got != _in_effect(engine, old, K)[1] or key == "optim.grad_clip"  # the test bites
    assert engine.lr_scheduler.base_lrs == [new.optim.lr] * len(got)
    assert engine.lr_scheduler.get_last_lr() == [g["lr"] for g in got]
    assert engine.optimizer.clip_grad == new.optim.grad_clip
    assert key != "optim.grad_clip" or ckpt["clip"] != new.optim.grad_clip
    # the saved state is kept: moments (codes and scales for QAdamW) and step counts
    opt = engine.optimizer.optimizer
    for st, ref in zip(opt.state.values(), ckpt["optim"]["state"].values()):
        assert st.keys() == ref.keys()
        for k, v in ref.items():
            assert torch.equal(torch.as_tensor(st[k]), torch.as_tensor(v)), k
    # and the schedule goes on from there with the new values
    _train(model, engine, 1)
    assert _in_effect(engine, new, K + 1)[0] == _in_effect(engine, new, K + 1)[1]


@pytest.mark.parametrize("name", ["adamw", "qadamw"])
def test_an_unchanged_config_resumes_bit_for_bit(name):
    cfg = _cfg(f"optim.name={name}")
    model, engine = _build(cfg)
    _train(model, engine, K)
    ckpt = _checkpoint(model, engine)
    _train(model, engine, 3)
    again, engine2 = _resume(cfg, ckpt)
    assert _in_effect(engine2, cfg, K)[0] == _in_effect(engine2, cfg, K)[1]
    _train(again, engine2, 3)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert engine.lr_scheduler.get_last_lr() == engine2.lr_scheduler.get_last_lr()


def test_qadamw_load_state_dict_keeps_its_own_hyperparameters():
    """Without the trainer's reapply too: QAdamW keeps the betas, eps, weight decay and base
    learning rate it was built with; ``lr`` (the schedule's current value) is the saved one.
    (torch AdamW restores every saved group key: the trainer's reapply covers it.)"""
    model, engine = _build(_cfg("optim.name=qadamw"))
    _train(model, engine, K)
    ckpt = _checkpoint(model, engine)
    new = _cfg("optim.name=qadamw", "optim.beta1=0.8", "optim.eps=1e-6",
               "optim.weight_decay=0.05", "optim.lr=1e-3")
    _, engine = _build(new)
    opt = engine.optimizer.optimizer
    opt.load_state_dict(ckpt["optim"])
    for g, sg in zip(opt.param_groups, ckpt["optim"]["param_groups"]):
        assert g["betas"] == (0.8, 0.999) and g["eps"] == 1e-6 and g["initial_lr"] == 1e-3
        assert g["weight_decay"] == (0.0 if g["kind"] == "no_decay" else 0.05)
        assert g["lr"] == sg["lr"]


def test_every_key_a_resume_may_change_is_accounted_for():
    """A new config key is either frozen (rundir.FROZEN) or listed here with how it takes
    effect on resume: a key added without that decision fails this test."""
    allowed = {k for k in flatten(to_dict(load_config([], []))) if not _frozen(k)}
    assert allowed == set(CHANGES) | FROM_CONFIG
