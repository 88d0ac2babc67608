"""dsq's host-side collective helpers on NCCL groups with one GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsq import parallel as D
from tests.dist_utils import spawn

pytestmark = pytest.mark.gpu


def _helpers(rank: int, world: int) -> None:
    torch.cuda.set_device(rank)
    x = torch.ones(4, device="cuda")
    dist.all_reduce(x)  # device tensors on NCCL
    assert x.tolist() == [1.0] * 4
    assert D.all_reduce_host([2.5, 3.0], "sum") == [2.5, 3.0]
    assert D.all_reduce_max(7.0) == 7.0 and D.all_reduce_mean(4.0) == 4.0
    assert D.gather_ints(5 * 2**33) == [5 * 2**33]
    assert D.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}
    assert D.bcast_error("msg") == "msg"
    D.barrier()


@pytest.mark.parametrize("backend", ["cpu:gloo,cuda:nccl", "nccl"])
def test_host_helpers_on_nccl(backend):
    spawn(_helpers, world_size=1, backend=backend)


def test_host_device_follows_the_backend():
    spawn(_device_check, world_size=1, backend="cpu:gloo,cuda:nccl")


def _device_check(rank: int, world: int) -> None:
    torch.cuda.set_device(rank)
    assert D.host_device().type == "cpu"
    nccl = dist.new_group([0], backend="nccl")
    assert D.host_device(nccl).type == "cuda"
    assert D.all_reduce_host([1.0], "sum", group=nccl) == [1.0]
