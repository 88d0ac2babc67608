"""Process groups for both kinds of tensors: the backend asked for on CUDA (mocked), and the
host-side collective helpers on real gloo groups, single- and multi-device backend strings."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dsq import parallel as D
from tests.dist_utils import spawn


def _init_with(monkeypatch, cuda: bool, local_rank: int = 3):
    """Run ``init_distributed`` with DeepSpeed's and CUDA's entry points mocked; returns what
    DeepSpeed was asked for and the devices set."""
    import deepspeed
    from megatron.core import parallel_state

    asked, devices = {}, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: asked.update(kw))
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(D, "release_shm_names", lambda rank: None)
    monkeypatch.delenv("DSQ_DIST_BACKEND", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29999")
    before = dict(os.environ)
    D.init_distributed(D.DistEnv(rank=11, world_size=16, local_rank=local_rank), tp=1)
    assert os.environ["RANK"] == "11" and os.environ["WORLD_SIZE"] == "16"
    D.shutdown()  # (the process group is mocked) restores what init_distributed set
    assert dict(os.environ) == before
    return asked, devices


def test_cuda_default_group_is_gloo_for_host_and_nccl_for_device(monkeypatch):
    asked, devices = _init_with(monkeypatch, cuda=True, local_rank=11)
    assert asked["dist_backend"] == "cpu:gloo,cuda:nccl"
    assert devices == [11 % 8]  # one GPU per local rank, set before any communicator exists


def test_cpu_default_group_is_gloo(monkeypatch):
    asked, devices = _init_with(monkeypatch, cuda=False)
    assert asked["dist_backend"] == "gloo" and devices == []


def test_backend_override(monkeypatch):
    monkeypatch.setenv("DSQ_DIST_BACKEND", "nccl")
    assert D.backend_for(True) == "nccl"
    monkeypatch.delenv("DSQ_DIST_BACKEND")
    assert D.backend_for(True) == "cpu:gloo,cuda:nccl" and D.backend_for(False) == "gloo"


@pytest.mark.parametrize("config, expected", [
    ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("cuda:nccl,cpu:gloo", "cpu"),
    ("cuda:nccl", "cuda:5"), ("nccl", "cuda:5")])
def test_host_values_travel_on_the_cpu_backend_when_there_is_one(monkeypatch, config, expected):
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert str(D.host_device()) == expected


def _helpers(rank: int, world: int) -> None:
    assert dist.get_backend_config() in ("cpu:gloo", "gloo") or "cpu:gloo" in \
        dist.get_backend_config()
    assert D.all_reduce_host([rank + 1.5, 10.0 * rank], "sum") == [sum(r + 1.5 for r in
                                                                   range(world)),
                                                                  10.0 * sum(range(world))]
    assert D.all_reduce_host([rank, -rank], "max") == [world - 1, 0]
    assert D.all_reduce_mean(float(rank)) == sum(range(world)) / world
    assert D.all_reduce_max(7.0 if rank == 1 else 2.0) == 7.0
    big = 3 * 2**40 + rank  # byte counts beyond 32 bits
    assert D.gather_ints(big) == [3 * 2**40 + r for r in range(world)]
    assert D.broadcast_object({"tag": "step_00000010"} if rank == 0 else None) == {
        "tag": "step_00000010"}
    assert D.bcast_error("bad data" if rank == 0 else None) == "bad data"
    assert D.bcast_error(None if rank == 0 else "ignored") is None
    sub = dist.new_group([0, 1])
    assert D.all_reduce_host([1.0], "sum", group=sub) == [2.0]
    D.barrier()


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo"])
def test_host_helpers_on_real_groups(backend):
    spawn(_helpers, world_size=2, backend=backend)
