"""DeepSpeed runs of QAdamW on a tiny model, for tests/e2e/optim/test_deepspeed.py.

``spawn(jobs, out)`` starts two CPU processes (gloo) that run the list of ``jobs`` (dicts, see
:func:`run_job`; ``m_bits``, ``v_bits``, ``m_format``, ``v_format``, ``v_domain`` choose QAdamW's
state format) one after
another and write rank 0's results to ``out`` (a pickle: one result per job). A job with
``dp=1`` runs on each process separately (each in its own one-rank data-parallel group, given
to DeepSpeed through ``mpu``; saving to ``<save>.rank1`` on the second process); ``dp=2`` jobs
use both. ``{"reshard": ...}`` jobs run :func:`dsq.run.reshard.reshard_checkpoint` on rank 0
between runs. One launch pays the imports (torch, dynamo, DeepSpeed: most of the time) once.

Models: ``exact`` has only bias-free linear weights whose sizes are multiples of the block
size (every element has quantized moments), ``mixed`` adds weights of other sizes (fp32
moments inside the quantized group) and biases (fp32 ``no_decay`` group). In both the
partition boundary at DP=2 falls inside a block of ``l2``.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import types
from dataclasses import replace

import torch
import torch.multiprocessing as mp
from torch import nn

STEPS = 6
MICRO = 8


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        bias = kind == "mixed"
        if kind == "exact":  # 1536 + 3072 + 1024 + 256: all multiples of 256
            dims = [32, 48, 64, 16, 16]
        else:  # 1536 + 3072 + 960 + 120 (+ biases)
            dims = [32, 48, 64, 15, 8]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims, dims[1:]))
        self.out_dim = dims[-1]

    def forward(self, x, y):
        for i, lin in enumerate(self.layers):
            x = lin(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return ((x.float() - y) ** 2).mean()


def data(step: int, out_dim: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(2 * MICRO, 32, generator=g)
    y = torch.randn(2 * MICRO, out_dim, generator=g)
    return x, y


def ds_config(stage: int, dp: int, bf16: bool, clip: float, round_robin: bool,
              overlap: bool = False, bucket: int = 0) -> dict:
    """The DeepSpeed JSON of a job; its ``zero_optimization`` is dsq's
    (:func:`dsq.parallel.engine.zero_section`), with ``overlap_comm`` and, when ``bucket``,
    that many elements per reduce and allgather bucket."""
    from dsq.config.sections import DeepSpeedConfig
    from dsq.parallel.engine import zero_section

    sizes = dict(reduce_bucket_size=bucket, allgather_bucket_size=bucket) if bucket else {}
    zero = DeepSpeedConfig(zero_stage=stage, overlap_comm=overlap, **sizes)
    cfg = {
        "train_batch_size": MICRO * dp,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero_section(zero, cuda=False, round_robin=round_robin),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def shard_following(opt) -> None:
    """Test hook: let each rank scale a block cut by the partition boundary on its own part
    (what blocks following the shard would do): no exchange of maxima."""
    for lay in opt._layouts.values():
        lay.pieces = [replace(p, slot=-1) for p in lay.pieces]
        lay.n_slots = 0


class MPU:
    """The ``mpu`` DeepSpeed asks for: no model parallelism, the given data-parallel group."""

    def __init__(self, dp_group, mp_group):
        import torch.distributed as dist

        self.dp, self.mp, self.dist = dp_group, mp_group, dist

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_group(self):
        return self.mp

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.dist.get_rank()

    def get_data_parallel_rank(self):
        return self.dist.get_rank(group=self.dp)

    def get_data_parallel_world_size(self):
        return self.dist.get_world_size(group=self.dp)

    def get_data_parallel_group(self):
        return self.dp

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


def run_job(job: dict, mpu: MPU) -> dict:
    import deepspeed
    import torch.distributed as dist

    from dsq.optim import attach_to_engine, build_optimizer, optimizer_state_bytes

    rank, world = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    grank = dist.get_rank()
    if job.get("save") and world == 1 and grank:  # two DP=1 runs: two directories
        job = dict(job, save=f"{job['save']}.rank{grank}")

    torch.manual_seed(0)
    model = Net(job["model"])
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = types.SimpleNamespace(name="qadamw", lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.1, m_bits=job.get("m_bits", 8),
                                v_bits=job.get("v_bits", 8), block_size=256, quantize="linear",
                                v_domain=job.get("v_domain", "linear"),
                                m_format=job.get("m_format"), v_format=job.get("v_format"),
                                kernel=job.get("kernel", "auto"))
    opt = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, mpu=mpu,
        config=ds_config(job["stage"], world, job.get("bf16", False), job.get("clip", 0.0),
                         job.get("round_robin", False), job.get("overlap", False),
                         job.get("bucket", 0)))
    qopt = attach_to_engine(engine)
    assert qopt is opt
    if job.get("shard_following"):
        shard_following(opt)
    start = 0
    if job.get("load"):
        _, client = engine.load_checkpoint(job["load"], tag=job["tag"])
        start = client["step"]
    losses = {}
    for step in range(start, job.get("steps", STEPS)):
        x, y = data(step, model.out_dim)
        if job["data"] == "split":  # each rank its share of the global batch of 2 * MICRO
            n = 2 * MICRO // world
            x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        else:  # "same": every rank the same MICRO samples (gradients reduce exactly)
            x, y = x[:MICRO], y[:MICRO]
        if job.get("bf16"):
            x = x.bfloat16()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        t = loss.detach().float().reshape(1)
        dist.all_reduce(t, group=mpu.dp)
        losses[step] = float(t) / world
        if job.get("save") and step + 1 == job["save_at"]:
            engine.save_checkpoint(job["save"], tag=job["tag"], client_state={"step": step + 1})
    res = {"losses": losses,
           "state_bytes": _gather(optimizer_state_bytes(engine.optimizer), mpu.dp)}
    res["states"] = _states(engine, opt, names, mpu.dp)
    res["n_slots"] = [lay.n_slots for lay in opt._layouts.values()]
    res["overlap_comm"] = getattr(engine.optimizer, "overlap_comm", None)
    return res


def _gather(obj, group):
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _states(engine, opt, names, group) -> dict:
    """{param name: (m, v)} dequantized, gathered over ranks (ZeRO) or per parameter."""
    wrapper = engine.optimizer
    out = {}
    if wrapper is opt:
        for g in opt.param_groups:
            for p in g["params"]:
                m, v = opt.dequantized(p)
                out[names[id(p)]] = (m.clone(), v.clone())
        return out
    params = (wrapper.round_robin_bit16_groups if hasattr(wrapper, "round_robin_bit16_groups")
              else wrapper.bf16_groups)
    for gi, g in enumerate(opt.param_groups):
        flat = g["params"][0]
        m, v = opt.dequantized(flat)
        parts = _gather((m, v), group)
        fm = torch.cat([a for a, _ in parts])
        fv = torch.cat([b for _, b in parts])
        meta = opt.layout(flat).meta
        for p, n, off in zip(params[gi], meta["numels"], meta["offsets"]):
            out[names[id(p)]] = (fm[off:off + n].clone(), fv[off:off + n].clone())
    return out


def _entry(rank: int, world: int, port: int, jobs: list, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from dsq.parallel import release_shm_names

    release_shm_names(rank)  # DeepSpeed's CPU all-reduce segment: gone when the ranks exit
    singles = [dist.new_group([r]) for r in range(world)]
    mpu1 = MPU(singles[rank], singles[rank])
    mpu2 = MPU(dist.new_group(list(range(world))), singles[rank])
    results = []
    for job in jobs:
        if "reshard" in job:
            if rank == 0:
                from dsq.run.reshard import reshard_checkpoint

                reshard_checkpoint(**job["reshard"])
            dist.barrier()
            results.append(None)
            continue
        t0 = time.perf_counter()
        results.append(run_job(job, mpu1 if job["dp"] == 1 else mpu2))
        dist.barrier()
        results[-1]["seconds"] = time.perf_counter() - t0  # wall time of the job, both ranks
    if rank == 0:
        with open(out, "wb") as fh:
            pickle.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


def spawn(jobs: list, out: str, world: int = 2) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, jobs, out), nprocs=world, join=True)
    with open(out, "rb") as fh:
        return pickle.load(fh)
