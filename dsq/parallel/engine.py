"""The one place DeepSpeed is initialised: its JSON generated from the typed config, and the
``mpu`` object that maps DeepSpeed's parallel-state names onto megatron-core's."""

from __future__ import annotations

import json
from typing import Optional


class MegatronMPU:
    """The ``mpu`` object DeepSpeed expects, backed by megatron-core's ``parallel_state``."""

    # DeepSpeed's name -> megatron-core's (model parallelism is tensor parallelism here)
    NAMES = {
        "get_model_parallel_rank": "get_tensor_model_parallel_rank",
        "get_model_parallel_world_size": "get_tensor_model_parallel_world_size",
        "get_model_parallel_group": "get_tensor_model_parallel_group",
        **{n: n for n in ("get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size",
                          "get_tensor_model_parallel_group", "get_tensor_model_parallel_src_rank",
                          "get_data_parallel_rank", "get_data_parallel_world_size",
                          "get_data_parallel_group")},
    }

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def __getattr__(self, name: str):
        if name in MegatronMPU.NAMES:
            return getattr(self.ps, MegatronMPU.NAMES[name])
        raise AttributeError(name)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def zero_section(ds, cuda: bool, round_robin: bool = False) -> dict:
    """DeepSpeed's ``zero_optimization`` for the ``deepspeed`` section ``ds``: the stage, and
    for ZeRO 1/2 contiguous gradients, reduce-scatter, ``overlap_comm`` (``ds.overlap(cuda)``)
    and the bucket sizes."""
    out = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        out.update(contiguous_gradients=True, overlap_comm=ds.overlap(cuda), reduce_scatter=True,
                   round_robin_gradients=round_robin, reduce_bucket_size=ds.reduce_bucket_size,
                   allgather_bucket_size=ds.allgather_bucket_size)
    return out


def deepspeed_config(cfg, dp_size: int, cuda: Optional[bool] = None) -> dict:
    """The DeepSpeed JSON, generated from the typed config (never edited by hand). ``cuda``:
    whether the ranks run on GPUs (default: whether this process sees one), for
    ``deepspeed.overlap_comm: null``."""
    import torch

    t, ds = cfg.train, cfg.deepspeed
    cuda = torch.cuda.is_available() if cuda is None else cuda
    gas = t.global_batch // (t.micro_batch * dp_size)
    out = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero_section(ds, cuda),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def initialize_engine(cfg, model, optimizer, lr_scheduler, dp_size: int):
    """``deepspeed.initialize`` for dsq: the only call site in the code base."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, dp_size)
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_cfg,
        mpu=MegatronMPU(), dist_init_required=False)
    return engine, optimizer, lr_scheduler, ds_cfg


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


