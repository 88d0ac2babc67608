"""Run a test function on N local processes joined by a gloo process group.

``spawn(fn, *args, world_size=2, backend="gloo")`` starts ``world_size`` processes
(torch.multiprocessing, spawn start method), initialises ``backend`` on a free port, calls ``fn(rank, world_size, *args)``
and destroys the group. ``fn`` must be a module-level (picklable) function; an exception in any
rank fails the call with that rank's traceback. Workers use one thread each: the tests run on
small CPU machines.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, world_size: int = 2, backend: str = "gloo") -> None:
    mp.spawn(_entry, args=(fn, world_size, free_port(), args, backend), nprocs=world_size,
             join=True)


def megatron_tp_groups(rank: int, world: int):
    """Initialise megatron-core with all ranks in one tensor-parallel group; returns
    ``(solo, tp)``: this rank's own one-rank group (a TP=1 reference in the same process) and
    the tensor-parallel group."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    solo = [dist.new_group([i]) for i in range(world)][rank]
    return solo, parallel_state.get_tensor_model_parallel_group()


def gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """``t``'s shards over ``group`` concatenated along ``dim`` (detached)."""
    n = group.size()
    if n == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim)
