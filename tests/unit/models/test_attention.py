"""SDPAttention: megatron's core-attention contract on torch SDPA; half precision in fp32 on the
CPU where PyTorch's kernels are faster that way."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

from dsq.models.attention import SDPAttention, cpu_upcast

TP1 = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))


def _attention(heads, head_dim):
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                            use_cpu_initialization=True, attention_dropout=0.0)
    return SDPAttention(cfg, 1, AttnMaskType.causal, pg_collection=TP1)


def _inputs(seq, heads, head_dim, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(seq, 2, heads, head_dim, generator=g).to(dtype).requires_grad_()
            for _ in range(3)]


def _reference(q, k, v, dtype):
    a, b, c = (t.detach().permute(1, 2, 0, 3).to(dtype) for t in (q, k, v))
    out = F.scaled_dot_product_attention(a, b, c, is_causal=True)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("head_dim,upcast", [(32, True), (64, False)])
def test_bf16_on_cpu(head_dim, upcast):
    q, k, v = _inputs(48, 4, head_dim, torch.bfloat16)
    assert cpu_upcast(q.permute(1, 2, 0, 3)) == upcast
    out = _attention(4, head_dim)(q, k, v, None)
    want = _reference(q, k, v, torch.float32 if upcast else torch.bfloat16).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (48, 2, 4 * head_dim)
    assert torch.equal(out, want)
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    # causal: the first position attends to itself only, so its output is its own value
    assert torch.allclose(out[0].float(), v[0].detach().reshape(2, -1).float(), atol=1e-2)


def test_fp32_and_long_sequences_stay_as_they_are():
    q = torch.zeros(2, 4, 1024, 32, dtype=torch.bfloat16)
    assert not cpu_upcast(q)  # long sequences: bf16 is faster
    assert not cpu_upcast(torch.zeros(2, 4, 128, 32))  # fp32 already
    assert cpu_upcast(torch.zeros(2, 4, 128, 16, dtype=torch.float16))
