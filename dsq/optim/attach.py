"""DeepSpeed attachment of QAdamW: the one module that reads DeepSpeed's private attributes.

ZeRO-1/2 (``DeepSpeedZeroOptimizer``, and ``BF16_Optimizer`` that DeepSpeed picks for bf16 with
ZeRO-1 and fp32 gradient accumulation) flatten every param group, pad it to a multiple of
``2 * dp`` and hand the client optimizer only this rank's fp32 partition of each group.
:func:`attach_to_engine` reads from the wrapper where each parameter lies in the flat group and
which partition this rank owns, and gives QAdamW that geometry (:mod:`dsq.optim.layout`):
blocks follow parameters, each rank allocates codes and scales for its partition only, and
the maxima of the (at most ``dp - 1``) blocks cut by partition boundaries are combined with
one small all-reduce per group and step. Checkpoints of another data-parallel size:
:mod:`dsq.run.reshard`.
"""

from __future__ import annotations

from typing import Optional

from dsq.optim.qadamw import QAdamW


def attach_to_engine(engine) -> Optional[QAdamW]:
    """Give QAdamW the ZeRO partition layout of ``engine``; call right after
    ``deepspeed.initialize``. Returns the QAdamW instance, or None when the engine's optimizer is
    not QAdamW (nothing to do). Without ZeRO (stage 0) it only checks and returns."""
    import torch.distributed as dist

    wrapper = engine.optimizer
    base = wrapper if isinstance(wrapper, QAdamW) else getattr(wrapper, "optimizer", None)
    if not isinstance(base, QAdamW):
        return None
    if base is wrapper:
        return base
    if getattr(wrapper, "elastic_checkpoint", False):
        raise ValueError("QAdamW state is not element-wise: zero_optimization.elastic_checkpoint "
                         "must be false (use `dsq ckpt reshard` to change DP size)")
    for i, group in enumerate(base.param_groups):
        if hasattr(wrapper, "round_robin_bit16_groups"):  # ZeRO-1/2
            params = wrapper.round_robin_bit16_groups[i]
            metas = getattr(wrapper, "round_robin_bit16_meta", [params] * (i + 1))[i]
            numels = [m.numel() for m in metas]
            shapes = [tuple(m.shape) for m in metas]
            offsets = list(wrapper.round_robin_bit16_offsets[i])
            flat = wrapper.single_partition_of_fp32_groups[i]
            part_size = int(wrapper.partition_size[i])
        elif hasattr(wrapper, "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16 + ZeRO-1)
            numels = [p.numel() for p in wrapper.bf16_groups[i]]
            shapes = [tuple(p.shape) for p in wrapper.bf16_groups[i]]
            offsets = [sum(numels[:j]) for j in range(len(numels))]
            flat = wrapper.fp32_groups_flat_partition[i]
            part_size = flat.numel()
        else:
            raise TypeError(f"dsq.optim.attach_to_engine: unsupported DeepSpeed optimizer "
                            f"{type(wrapper).__name__} (use ZeRO stage 0, 1 or 2)")
        pg = wrapper.real_dp_process_group[i]
        rank, dp = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        if len(group["params"]) != 1 or group["params"][0] is not flat:
            raise RuntimeError("unexpected DeepSpeed layout: param group is not one flat partition")
        base.set_flat_layout(flat, numels, offsets, rank * part_size, part_size, dp, group=pg,
                             shapes=shapes)
    return base
