"""Process groups, megatron-core parallel state, and the host-side collectives (DeepSpeed's
engine and config: :mod:`dsq.parallel.engine`).

Launchers: ``deepspeed`` and ``torchrun`` set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; under ``srun`` they are derived from SLURM's variables; with no
launcher, ``dsq train`` runs as a single process.

Process groups: on CUDA the default group is PyTorch's multi-device backend
``cpu:gloo,cuda:nccl`` (:func:`backend_for`): device tensors (gradients, the model's
tensor-parallel statistics) travel over NCCL, host values over gloo. On CPU it is gloo.
megatron-core's groups inherit it.

Host-side collectives (losses, stop flags, byte counts, error messages, small objects) go
through the helpers at the end of this module (:func:`all_reduce_host`, :func:`all_reduce_mean`,
:func:`all_reduce_max`, :func:`broadcast_object`, :func:`gather_ints`, :func:`bcast_error`,
:func:`barrier`): each puts its tensor on :func:`host_device` of the group, the CPU when the
group has a CPU backend and the current CUDA device otherwise, so they work on every backend.
Nothing else in ``dsq`` calls ``torch.distributed`` collectives, except reductions of device
tensors inside the model and the optimizer (tested by ``tests/unit/test_architecture.py``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_launcher() -> DistEnv:
    """Ranks from the launcher's variables (deepspeed/torchrun, then SLURM), else one process."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHM_DIR = Path("/dev/shm")


def release_shm_names(rank: int) -> None:
    """Unlink this rank's ``/dev/shm`` segment of DeepSpeed's CPU all-reduce op.

    On CPUs DeepSpeed builds ``deepspeed_shm_comm`` and, at start-up, maps one ~66 MB
    shared-memory segment per rank (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``)
    that every peer opens by name. It never unlinks them, so each CPU run would leave its
    segments in ``/dev/shm``, i.e. in RAM, after it exits (a machine running many jobs fills
    up). Once all ranks have mapped their peers' segments the names are not needed: the
    mappings stay valid, and the memory is returned when the last rank exits. Collective: every
    rank of the default group calls it (a barrier first, so all have mapped their peers').
    """
    barrier()
    port = os.environ.get("MASTER_PORT", "")
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            path.unlink()
        except OSError:
            pass


def backend_for(cuda: bool) -> str:
    """The default group's backend: gloo on CPU; on CUDA, NCCL for device tensors and gloo for
    host tensors (``DSQ_DIST_BACKEND`` overrides, e.g. ``nccl`` alone)."""
    override = os.environ.get("DSQ_DIST_BACKEND", "").strip()
    if override:
        return override
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_distributed(env: DistEnv, tp: int, timeout_s: int = 600) -> None:
    """Start the default process group and megatron-core's tensor/data-parallel groups."""
    import datetime

    if "MASTER_PORT" not in os.environ and env.world_size > 1:
        raise RuntimeError("MASTER_PORT is not set: start multi-process runs with deepspeed, "
                           "torchrun, srun (slurm/pretrain.sbatch) or launch/local.sh")
    wanted = {"MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
              "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
              "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
              "LOCAL_RANK": str(env.local_rank)}
    # what this sets is undone by shutdown(): a process that evaluates or exports in-process
    # (and then starts ranks of its own) must not hand them its one-process rendezvous
    _ENV_BEFORE.update({k: os.environ.get(k) for k in wanted if k not in _ENV_BEFORE})
    os.environ.update(wanted)
    cuda = torch.cuda.is_available()
    if cuda:
        # NCCL communicators and object collectives use the current device: one GPU per rank
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend_for(cuda),
                                   timeout=datetime.timedelta(seconds=timeout_s))
        if not cuda:
            release_shm_names(env.rank)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


_ENV_BEFORE: dict = {}
"""The launcher variables as they were before :func:`init_distributed` set them."""


def shutdown() -> None:
    """Destroy megatron's and the default process group; restore the environment variables
    :func:`init_distributed` set."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in _ENV_BEFORE.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _ENV_BEFORE.clear()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- host collectives
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def host_device(group=None) -> torch.device:
    """Where a host value travels for a collective over ``group``: the CPU when the group has a
    CPU backend (gloo, or ``cpu:gloo`` in a multi-device backend), else the current CUDA device
    (an NCCL-only group)."""
    config = str(dist.get_backend_config(group)).lower()
    if config in ("gloo", "mpi") or "cpu:" in config:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_host(values: Sequence[float], op: str = "sum", group=None) -> List[float]:
    """Reduce a few host numbers (fp64) over ``group`` (default: all ranks); every rank gets
    the result as Python floats."""
    t = torch.tensor(list(values), dtype=torch.float64, device=host_device(group))
    dist.all_reduce(t, op=_OPS[op], group=group)
    return [float(v) for v in t.tolist()]


def all_reduce_mean(value: float, group=None) -> float:
    """Mean of one number over ``group``."""
    return all_reduce_host([value], "sum", group)[0] / dist.get_world_size(group=group)


def all_reduce_max(value: float, group=None) -> float:
    """Maximum of one number over ``group``."""
    return all_reduce_host([value], "max", group)[0]


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (object collectives pick the group's CPU
    backend when it has one; on NCCL alone they need the current CUDA device set, which
    :func:`init_distributed` does)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_ints(value: int, group=None) -> List[int]:
    """Every rank's ``value``, in rank order, on every rank."""
    out = [0] * dist.get_world_size(group=group)
    t = torch.tensor([int(value)], dtype=torch.int64, device=host_device(group))
    parts = [torch.empty_like(t) for _ in out]
    dist.all_gather(parts, t, group=group)
    return [int(p.item()) for p in parts]


def bcast_error(msg: Optional[str]) -> Optional[str]:
    """Rank 0's error message (or None) on every rank, so all ranks fail together."""
    return broadcast_object(msg, src=0)


def barrier(group=None) -> None:
    """Wait for every rank of ``group``."""
    dist.barrier(group=group)
