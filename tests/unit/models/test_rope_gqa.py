"""Llama attention pieces on one process: grouped-query SDPA equals attention over repeated K/V
(which dsq never builds), and dsq's rotary embedding, applied by megatron's
``apply_rotary_pos_emb``, is RoPE as written out by hand; it runs on the CPU and keeps fp32
frequencies whatever the module's dtype."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dsq.models.attention import SDPAttention
    from dsq.models.gpt import RotaryEmbedding

TP1 = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
S, B, HEADS, GROUPS, HD = 12, 2, 4, 2, 16


def _qkv(groups=GROUPS):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(S, B, HEADS, HD, generator=g)
    k, v = (torch.randn(S, B, groups, HD, generator=g) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


def _reference(q, k, v):
    """Plain multi-head attention over K/V repeated per group (megatron's layout: a group's
    query heads are consecutive)."""
    rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    a, b, c = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(a, b, c, is_causal=True)
    return out.permute(2, 0, 1, 3).reshape(S, B, -1)


def test_gqa_equals_attention_over_repeated_kv_without_building_it(monkeypatch):
    cfg = TransformerConfig(num_layers=1, hidden_size=HEADS * HD, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, use_cpu_initialization=True,
                            attention_dropout=0.0)
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, pg_collection=TP1)
    q, k, v = _qkv()
    gy = torch.randn(S, B, HEADS * HD, generator=torch.Generator().manual_seed(1))

    def refuse(*a, **kw):
        raise AssertionError("dsq repeated K/V")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "repeat_interleave", refuse)
        m.setattr(torch, "repeat_interleave", refuse)
        out = attn(q, k, v, None)
    out.backward(gy)
    got = (out.detach(), q.grad, k.grad, v.grad)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = _reference(q2, k2, v2)
    ref.backward(gy)
    for a, b in zip(got, (ref.detach(), q2.grad, k2.grad, v2.grad)):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), float((a - b).abs().max())
    # a wrong pairing (query head h with K/V head h % groups) would be far off
    k3 = torch.cat([k2.detach()] * (HEADS // GROUPS), dim=2)
    v3 = torch.cat([v2.detach()] * (HEADS // GROUPS), dim=2)
    wrong = _reference(q2.detach(), k3, v3)
    assert (wrong - ref.detach()).abs().max() > 1e-2


def _rope_by_hand(t: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on ``t`` [s, b, h, d], pairing dimension i with i + d/2 (GPT-NeoX / Llama-HF
    layout), angles in float64."""
    s, d = t.shape[0], t.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]  # [s, d/2]
    cos, sin = (f(ang)[:, None, None, :] for f in (torch.cos, torch.sin))
    x1, x2 = t.double().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(t.dtype)


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rope_applied_by_megatron_is_rope(base):
    cfg = TransformerConfig(num_layers=1, hidden_size=HEADS * HD, num_attention_heads=HEADS,
                            use_cpu_initialization=True, apply_rope_fusion=False)
    rope = RotaryEmbedding(kv_channels=HD, rotary_percent=1.0, rotary_base=base,
                           use_cpu_initialization=True)
    emb = rope(S)
    assert emb.shape == (S, 1, 1, HD) and emb.dtype == torch.float32
    t = torch.randn(S, B, HEADS, HD, generator=torch.Generator().manual_seed(2))
    got = apply_rotary_pos_emb(t, emb, config=cfg, cp_group=SimpleNamespace(size=lambda: 1))
    want = _rope_by_hand(t, base)
    assert torch.allclose(got, want, atol=2e-5), float((got - want).abs().max())
    # position 0 is not rotated; a score depends on the relative position only
    assert torch.allclose(got[0], t[0], atol=1e-6)
    same = t[:1, :1, :2].expand(S, 1, 2, HD)  # one query and one key vector at every position
    r = apply_rotary_pos_emb(same, emb, config=cfg, cp_group=SimpleNamespace(size=lambda: 1))
    q, k = r[:, 0, 0], r[:, 0, 1]
    assert math.isclose(float(q[3] @ k[1]), float(q[7] @ k[5]), rel_tol=1e-4, abs_tol=1e-5)
    assert not math.isclose(float(q[3] @ k[1]), float(q[3] @ k[2]), rel_tol=1e-2)


def test_rope_on_cpu_follows_the_module_and_keeps_fp32():
    rope = RotaryEmbedding(kv_channels=HD, rotary_percent=1.0, rotary_base=10000,
                           use_cpu_initialization=True)
    want = rope(S)
    rope.to(torch.bfloat16)  # DeepSpeed's bf16 engine casts the module
    assert rope.inv_freq.dtype == torch.float32 and rope.inv_freq.device.type == "cpu"
    assert torch.equal(rope(S), want)
    assert torch.equal(rope(S, offset=3)[0], want[3])
