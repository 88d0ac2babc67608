"""Layouts of quantized state over ZeRO partitions: blocks follow parameters, never shards."""

from __future__ import annotations

import random

import pytest

from dsq.optim.formats import code_bytes
from dsq.optim.layout import build_layout, is_quantized, n_blocks, straddling_blocks


def _group(seed: int, block):
    rng = random.Random(seed)
    numels = [rng.choice([256, 512, 768, 1024, 300, 7, 2560]) for _ in range(rng.randint(1, 7))]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    quantized = [is_quantized(n, block, True) for n in numels]
    return numels, offsets, quantized


def _partitions(numels, dp):
    total = sum(numels)
    align = 2 * dp
    size = -(-total // align) * align // dp
    return size


@pytest.mark.parametrize("block", [256, "tensor"])
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_pieces_tile_the_group_and_blocks_do_not_depend_on_dp(seed, dp, block):
    numels, offsets, quantized = _group(seed, block)
    total = sum(numels)
    size = _partitions(numels, dp)
    # reference: the group seen by one rank
    ref = build_layout(numels, offsets, quantized, block, 8, 4, 0, total, 1)
    ref_blocks = {}
    for pc in ref.pieces:
        if pc.kind != "fp32":
            for j in range(pc.rows):
                ref_blocks[pc.block + j] = (pc.start + j * pc.width, pc.width)
    assert len(ref_blocks) == n_blocks(ref.meta)
    covered = []
    seen_blocks = {}
    cut = straddling_blocks(numels, offsets, quantized, block, size, dp)
    code_total = 0
    for r in range(dp):
        lay = build_layout(numels, offsets, quantized, block, 8, 4, r * size, size, dp)
        assert lay.n_slots == len(cut) <= dp - 1
        pos = 0
        for pc in lay.pieces:
            assert pc.start >= pos  # ordered, disjoint
            pos = pc.start + pc.length
            a = r * size + pc.start
            covered.append((a, a + pc.length, pc.kind == "fp32"))
            if pc.kind == "fp32":
                continue
            for j in range(pc.rows):  # every block lies where the single-rank layout has it
                bs, w = ref_blocks[pc.block + j]
                lo = max(bs, a + j * pc.width) if pc.kind == "rows" else a
                assert bs <= lo and lo + (pc.width if pc.kind == "rows" else pc.length) <= bs + w
                seen_blocks.setdefault(pc.block + j, []).append(r)
            if pc.kind == "split" and pc.slot >= 0:
                assert cut[pc.slot] == pc.block
            code_total += pc.rows * pc.width if pc.kind == "rows" else pc.length
        assert pos <= size
    # the ranks' pieces tile [0, total) exactly, fp32 where the single-rank layout is fp32
    covered.sort()
    assert covered[0][0] == 0 and covered[-1][1] == total
    for (a0, a1, _), (b0, _, _) in zip(covered, covered[1:]):
        assert a1 == b0
    assert code_total == sum(n for n, q in zip(numels, quantized) if q)
    assert set(seen_blocks) == set(ref_blocks)
    shared = {b for b, rs in seen_blocks.items() if len(rs) > 1}
    assert shared == set(cut)


def test_a_block_cut_by_the_boundary_is_split_and_exchanged():
    # l1: 1536 (6 blocks), l2: 3072 (12 blocks); DP=2: boundary at 2304, between blocks
    numels, offsets = [1536, 3072], [0, 1536]
    size = 2304
    lays = [build_layout(numels, offsets, [True, True], 256, 8, 8, r * size, size, 2)
            for r in range(2)]
    assert straddling_blocks(numels, offsets, [True, True], 256, size, 2) == []
    kinds = [[(p.kind, p.rows, p.length, p.block, p.slot) for p in lay.pieces] for lay in lays]
    assert kinds[0] == [("rows", 9, 2304, 0, -1)]  # l1 + l2's first 3 blocks merged
    assert kinds[1][0] == ("rows", 9, 2304, 9, -1)
    # a boundary inside a block: 1536 + 896 = 2432 elements on rank 0 with size 2432
    lays = [build_layout(numels, offsets, [True, True], 256, 4, 8, r * 2432, 2432, 2)
            for r in range(2)]
    k0 = [(p.kind, p.length, p.block, p.slot) for p in lays[0].pieces]
    k1 = [(p.kind, p.length, p.block, p.slot) for p in lays[1].pieces]
    assert k0 == [("rows", 2304, 0, -1), ("split", 128, 9, 0)]
    assert k1[0] == ("split", 128, 9, 0)
    assert lays[0].n_scales == 10 and lays[1].n_scales == 9
    assert lays[0].m_code_len == code_bytes(2304, 4) + code_bytes(128, 4)


def test_per_tensor_blocks_are_parameters():
    numels, offsets = [100, 40000, 64], [0, 100, 40100]
    lay = build_layout(numels, offsets, [True] * 3, "tensor", 8, 8, 0, 40164, 1)
    assert [(p.kind, p.length) for p in lay.pieces] == [("rows", 100), ("split", 40000),
                                                        ("rows", 64)]
    assert lay.n_scales == 3 and lay.n_slots == 0


def test_every_rank_of_a_quantized_group_uses_the_quantized_format():
    """A rank whose partition holds only fp32 parameters still takes part in the exchange of
    block maxima (else the other ranks would wait for it forever)."""
    numels = [1024, 300, 300, 300, 300]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    quantized = [is_quantized(n, 256, True) for n in numels]
    size = 556  # dp=4: 2224 elements; boundary 556 cuts block 2 of the first parameter
    lays = [build_layout(numels, offsets, quantized, 256, 8, 8, r * size, size, 4)
            for r in range(4)]
    assert [lay.m_code_len > 0 for lay in lays] == [True, True, False, False]
    assert all(lay.quantized and lay.n_slots == 1 for lay in lays)
