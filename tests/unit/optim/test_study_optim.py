"""QAdamW with the study's state settings: one scale per row (``block_size="row"``) and the
signed second moment (``v_signed``), against dsq's unsigned v and fp32 AdamW."""

from __future__ import annotations

import pytest
import torch

from dsq.optim import QAdamW
from dsq.optim.layout import build_layout, is_quantized, resolve_block, straddling_blocks


def _regression(opt_factory, steps: int = 50):
    """A 64x64 least-squares regression from zero, as in REFERENCE's comparison."""
    torch.manual_seed(0)
    target = torch.randn(64, 64) / 8
    w = torch.nn.Parameter(torch.zeros(64, 64))
    opt = opt_factory([w])
    g = torch.Generator().manual_seed(1)
    zero_frac = None
    for s in range(steps):
        x = torch.randn(256, 64, generator=g)
        loss = ((x @ w.t() - x @ target.t()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s == 9 and isinstance(opt, QAdamW):
            _, v = opt.dequantized(w)
            zero_frac = float((v == 0).float().mean())
    return loss.item(), zero_frac


def _fp32(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def _q(**kw):
    return lambda params: QAdamW(params, lr=1e-2, weight_decay=0.0, m_bits=8, v_bits=8, **kw)


def test_signed_v_flushes_small_v_and_fails_where_unsigned_v_tracks_fp32():
    base, _ = _regression(_fp32)
    # block: (least fraction of v flushed to 0 at step 10, least loss ratio to fp32 at step 50)
    for block, flushed, worse in (("row", 1e-4, 1.3), (256, 0.02, 100), ("tensor", 0.5, 100)):
        ours, z_ours = _regression(_q(block_size=block))
        theirs, z_theirs = _regression(_q(block_size=block, v_signed=True))
        assert z_ours == 0.0  # dsq's v never dequantizes to 0 where v > 0 (all v > 0 here)
        assert z_theirs > flushed, (block, z_theirs)
        assert ours == pytest.approx(base, rel=0.05), (block, ours, base)
        assert theirs > worse * base, (block, theirs, base)


def test_v_signed_runs_the_eager_kernel_and_is_refused_where_it_does_not_apply():
    w = torch.nn.Parameter(torch.randn(8, 16))
    opt = QAdamW([w], m_bits=8, v_bits=8, block_size="row", v_signed=True, kernel="cpp")
    w.grad = torch.randn(8, 16)
    opt.step()
    assert [k.name for k in opt._kernels.values()] == ["eager"]
    with pytest.raises(ValueError, match="v_signed applies to a linearly quantized v"):
        QAdamW([w], m_bits=8, v_bits=32, v_signed=True)
    with pytest.raises(ValueError, match="v_signed applies to a linearly quantized v"):
        QAdamW([w], m_bits=8, v_bits=8, v_domain="sqrt", v_signed=True)


def test_row_blocks_are_one_scale_per_row_and_equal_blocks_of_the_row_width():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16, 64))
    b = torch.nn.Parameter(a.detach().clone())
    bias = torch.nn.Parameter(torch.randn(30))
    odd = torch.nn.Parameter(torch.randn(4, 7))
    rows = QAdamW([a, bias, odd], lr=1e-2, block_size="row")
    blocks = QAdamW([b], lr=1e-2, block_size=64)
    for step in range(3):
        g = torch.randn(16, 64)
        a.grad, b.grad = g.clone(), g.clone()
        bias.grad, odd.grad = torch.randn(30), torch.randn(4, 7)
        rows.step()
        blocks.step()
        assert torch.equal(a, b), step
    assert rows.layout(a).n_scales == 16 and rows.state[a]["m_scales"].numel() == 16
    assert rows.layout(bias).n_scales == 1  # a 1-D parameter: one block
    assert not rows.layout(odd).quantized  # rows of 7 cannot be packed in pairs: fp32 moments


def test_row_widths_under_zero_partitions():
    """Row blocks cut by a partition boundary are exchanged like any block; the pieces of two
    partitions cover the parameters' rows once."""
    shapes = [(48, 32), (48,), (64, 48), (16, 64)]
    numels = [48 * 32, 48, 64 * 48, 16 * 64]
    offsets = [sum(numels[:j]) for j in range(len(numels))]
    block = resolve_block("row", shapes)
    assert block == [32, 48, 48, 64]
    q = [is_quantized(n, block, True, j) for j, n in enumerate(numels)]
    total = sum(numels)
    size = (total + 1) // 2
    cut = straddling_blocks(numels, offsets, q, block, size, 2)
    lays = [build_layout(numels, offsets, q, block, 8, 8, r * size, size, 2) for r in range(2)]
    whole = build_layout(numels, offsets, q, block, 8, 8, 0, total, 1)
    assert whole.n_scales == 48 + 1 + 64 + 16
    covered = sum(pc.length for lay in lays for pc in lay.pieces)
    assert covered == total
    assert all(lay.n_slots == len(cut) for lay in lays)
    assert sum(lay.n_scales for lay in lays) == whole.n_scales + len(cut)
