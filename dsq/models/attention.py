"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` asks CUDA for its memory buffer and RNG
tracker; this module has the same constructor and ``forward`` contract (inputs
``[s, b, heads_per_partition, head_dim]``, output ``[s, b, hidden_per_partition]``) and
runs on any device. On GPU, SDPA dispatches to flash / memory-efficient kernels.

Grouped-query attention (``num_query_groups`` < heads: megatron passes ``key`` and ``value``
with one head per group) runs with SDPA's ``enable_gqa``: query head ``h`` attends with key/value
head ``h // (heads / groups)`` (megatron's layout: a group's query heads are consecutive), and
the repeated K/V are never materialised by dsq.

``recompute=True`` (``train.recompute: selective`` on the torch engine,
:mod:`dsq.models.recompute`): in training with autograd on, the attention keeps only ``q, k, v``
for backward and computes its output again there (``torch.utils.checkpoint``, replaying the
dropout's random numbers).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from dsq.models.recompute import recomputed


def cpu_upcast(q: torch.Tensor) -> bool:
    """Whether half-precision attention on the CPU is faster computed in fp32.

    PyTorch's CPU flash attention handles small heads badly in bf16: with head dimensions of at
    most 32 and at most 512 positions a causal layer runs faster in fp32, the casts included;
    from head dimension 64 or 1024 positions on, bf16 wins (timings: docs/performance.md).
    """
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return q.shape[-1] <= 32 and q.shape[-2] <= 512


class SDPAttention(MegatronModule):
    """Causal self-attention core; tensor-parallel by head (each rank owns its heads)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        recompute: bool = False,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if pg_collection is not None and hasattr(pg_collection, "tp"):
            tp_size = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, tp_size)
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        head_dim = divide(projection, config.num_attention_heads)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.recompute = recompute

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = self.heads_per_partition != self.groups_per_partition
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron: True means "masked out"
        if self.recompute and self.training and torch.is_grad_enabled():
            out = recomputed(self._attend, q, k, v, mask, causal, gqa)
        else:
            out = self._attend(q, k, v, mask, causal, gqa)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)

    def _attend(self, q, k, v, mask, causal: bool, gqa: bool):
        """SDPA on ``[b, h, s, d]``, in ``q``'s dtype."""
        dtype = q.dtype
        if cpu_upcast(q):
            q, k, v = (t.float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa,
        )
        return out.to(dtype)
