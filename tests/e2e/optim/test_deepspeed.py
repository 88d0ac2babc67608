"""QAdamW under DeepSpeed on 1 and 2 CPU ranks (gloo): ZeRO 0/1/2, fp32/bf16, checkpoints.

One launch of two processes runs every job in order (module fixture ``runs``):

1. DP=1: references (ZeRO-0) and a ZeRO-2 run that saves a checkpoint at step 3;
2. DP=2: ZeRO-2 (and the shard-following variant), a run that saves at step 3, resumes
   from it and from the DP=1 checkpoint resharded to two ranks, ZeRO-1 (round-robin
   gradient order), bf16 with ZeRO-1 (BF16_Optimizer) and ZeRO-2 with another format
   (4-bit m, or v in the sqrt domain);
3. DP=1: resume from the DP=2 checkpoints (fp32 ZeRO-2, bf16 ZeRO-1) resharded to one rank,
   and the fp32 ZeRO-0 reference of the other format;
4. (``m8v8`` only) DP=2, ZeRO-1 and ZeRO-2 with DeepSpeed's ``overlap_comm`` off and on and
   2048-element buckets (the gradient of ``l2`` takes DeepSpeed's path for one larger than a
   bucket), on the CPU accelerator;
5. (``m8v8`` only) fp8 moments (E4M3 m, E5M2 v): DP=1 ZeRO-0, DP=2 ZeRO-2 saving at step 3,
   DP=2 ZeRO-1, the DP=2 checkpoint resharded to one rank and resumed with ZeRO-2.

The fixture is parametrized over state formats (one launch each): both moments at 8 bits,
and one moment quantized with the other in fp32 (``m8``: 8-bit m, fp32 v; ``v8``: fp32 m,
8-bit v), where only one moment has block maxima to exchange.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.optim import ds_runs

pytestmark = pytest.mark.slow

K = 3  # checkpoint step

# format: (its options, the other format of job 11)
FORMATS = {
    "m8v8": (dict(m_bits=8, v_bits=8), dict(m_bits=4)),
    "m8": (dict(m_bits=8, v_bits=32), dict(m_bits=4)),
    "v8": (dict(m_bits=32, v_bits=8), dict(v_domain="sqrt")),
}


FP8 = dict(m_format="fp8e4m3", v_format="fp8e5m2")  # the fp8 jobs of the m8v8 launch


@pytest.fixture(scope="module", params=list(FORMATS))
def runs(request, tmp_path_factory):
    fmt, alt = FORMATS[request.param]
    tmp = tmp_path_factory.mktemp(f"ds_{request.param}")
    c1, c2, c21 = str(tmp / "ckpt_dp1"), str(tmp / "ckpt_dp2"), str(tmp / "ckpt_dp2_as_dp1")
    c3, c31 = str(tmp / "ckpt_bf16_dp2"), str(tmp / "ckpt_bf16_dp2_as_dp1")
    mixed = dict(model="mixed", data="split", clip=1.0)
    jobs = [
        dict(model="exact", stage=0, data="same", dp=1),                      # 0
        dict(mixed, stage=0, dp=1),                                             # 1
        dict(mixed, stage=2, dp=1, save=c1, save_at=K, tag="t"),                # 2
        {"reshard": dict(ckpt_dir=c1, tag="t", new_dp=2)},                      # 3
        dict(model="exact", stage=2, data="same", dp=2),                      # 4
        dict(model="exact", stage=2, data="same", dp=2, shard_following=True),  # 5
        dict(mixed, stage=2, dp=2, save=c2, save_at=K, tag="t"),                # 6
        dict(mixed, stage=2, dp=2, load=c2, tag="t"),                           # 7
        dict(mixed, stage=2, dp=2, load=c1, tag="t"),                           # 8
        dict(mixed, stage=1, dp=2, round_robin=True),                           # 9
        dict(mixed, stage=1, dp=2, bf16=True, save=c3, save_at=K, tag="t"),    # 10
        dict(mixed, stage=2, dp=2, bf16=True, **dict(fmt, **alt)),              # 11
        {"reshard": dict(ckpt_dir=c2, tag="t", new_dp=1, out_dir=c21)},         # 12
        dict(mixed, stage=2, dp=1, load=c21, tag="t"),                          # 13
        {"reshard": dict(ckpt_dir=c3, tag="t", new_dp=1, out_dir=c31)},         # 14
        dict(mixed, stage=1, dp=1, bf16=True, load=c31, tag="t"),               # 15
        dict(mixed, stage=0, dp=1, **alt),                                      # 16
    ]
    if request.param == "m8v8":  # overlap_comm on and off, buckets smaller than l2 (3072)
        small = dict(mixed, dp=2, bucket=2048)
        jobs += [dict(small, stage=1),                                          # 17
                 dict(small, stage=1, overlap=True),                            # 18
                 dict(small, stage=2),                                          # 19
                 dict(small, stage=2, overlap=True)]                            # 20
        c4, c41 = str(tmp / "ckpt_fp8_dp2"), str(tmp / "ckpt_fp8_dp2_as_dp1")
        f8 = dict(FP8, model="exact", data="same")
        jobs += [dict(f8, stage=0, dp=1),                                       # 21
                 dict(f8, stage=2, dp=2, save=c4, save_at=K, tag="t"),          # 22
                 dict(f8, stage=1, dp=2),                                       # 23
                 {"reshard": dict(ckpt_dir=c4, tag="t", new_dp=1, out_dir=c41)},  # 24
                 dict(f8, stage=2, dp=1, load=c41, tag="t")]                    # 25
    jobs = [job if "reshard" in job else dict(fmt, **job) for job in jobs]
    res = ds_runs.spawn(jobs, str(tmp / "results.pkl"))
    return dict(enumerate(res), tmp=tmp, fmt=fmt)


def _quantized_moment(runs) -> int:
    """Index in (m, v) of a quantized moment of the run's format."""
    return 1 if runs["fmt"]["m_bits"] == 32 else 0


def _close(a: dict, b: dict, rtol: float, steps=None):
    """``a`` holds the losses of exactly ``steps`` (default: every step of ``b``), each close to
    ``b``'s: a run that logged nothing, or fewer steps, fails."""
    steps = list(steps if steps is not None else range(ds_runs.STEPS))
    assert steps and sorted(a) == steps and set(steps) <= set(b), (sorted(a), steps, sorted(b))
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=rtol), (s, a[s], b[s])


def test_dp2_zero2_equals_dp1_zero0_bit_for_bit(runs):
    ref, dp2 = runs[0], runs[4]
    assert dp2["n_slots"][0] == 1  # the partition boundary cuts a block of l2
    assert dp2["losses"] == ref["losses"]
    for name, (m, v) in ref["states"].items():
        m2, v2 = dp2["states"][name]
        assert torch.equal(m, m2) and torch.equal(v, v2), name
        assert m.abs().max() > 0 and v.max() > 0


def test_blocks_following_the_shard_would_fail_that_test(runs):
    ref, bad = runs[0], runs[5]
    i = _quantized_moment(runs)
    m = ref["states"]["layers.1.weight"][i]
    m_bad = bad["states"]["layers.1.weight"][i]
    diff = (m - m_bad).abs()
    assert diff.max() > 1e-3 * m.abs().max()
    assert bad["losses"][ds_runs.STEPS - 1] != ref["losses"][ds_runs.STEPS - 1]


def test_dp2_matches_dp1_with_split_batches_and_clipping(runs):
    ref, dp1_z2, dp2 = runs[1], runs[2], runs[6]
    _close(dp2["losses"], ref["losses"], 1e-5)
    _close(dp1_z2["losses"], ref["losses"], 1e-5)
    for name, (m, v) in ref["states"].items():
        m2, v2 = dp2["states"][name]
        # fp32 reduction noise may flip a code at a rounding boundary: one step at most
        assert (m - m2).abs().max() <= 1e-2 * m.abs().max() + 1e-12, name
        assert (v - v2).abs().max() <= 1e-2 * v.max() + 1e-12, name
        assert (m - m2).abs().mean() <= 1e-4 * m.abs().max(), name


def test_state_bytes_are_the_partition_share(runs):
    dp1 = runs[2]["state_bytes"][0]
    r0, r1 = runs[6]["state_bytes"]
    # per quantized element: 1 byte per 8-bit moment, 4 per fp32 one; per block: 4 bytes per
    # quantized moment (m8v8: 2 and 8, m8 and v8: 5 and 4)
    e = sum(1 if b == 8 else 4 for b in (runs["fmt"]["m_bits"], runs["fmt"]["v_bits"]))
    s = 4 * sum(b != 32 for b in (runs["fmt"]["m_bits"], runs["fmt"]["v_bits"]))
    # linear group: 5688 elements, 18 blocks (l1: 6, l2: 12), l3/l4 (1080) fp32;
    # rank 0 owns [0, 2844): 2844 quantized elements, blocks 0..11 (11 cut); rank 1 the rest
    # no_decay (135 biases, padded to 136): 68 fp32 elements per rank
    assert r0 == 2844 * e + 12 * s + 68 * 8
    assert r1 == (4608 - 2844) * e + 7 * s + 1080 * 8 + 68 * 8
    assert dp1 == 4608 * e + 18 * s + 1080 * 8 + 136 * 8
    assert r0 + r1 == dp1 + s  # the cut block's scales are held by both ranks


def test_resume_same_dp_is_bit_exact(runs):
    full, resumed = runs[6], runs[7]
    assert sorted(resumed["losses"]) == list(range(K, ds_runs.STEPS))
    for s in resumed["losses"]:
        assert resumed["losses"][s] == full["losses"][s]
    for name, (m, v) in full["states"].items():
        assert torch.equal(m, resumed["states"][name][0])
        assert torch.equal(v, resumed["states"][name][1])


def test_resume_dp1_checkpoint_on_two_ranks(runs):
    full, resumed = runs[2], runs[8]
    _close(resumed["losses"], full["losses"], 1e-5, range(K, ds_runs.STEPS))


def test_resume_dp2_checkpoint_on_one_rank(runs):
    full, resumed = runs[6], runs[13]
    _close(resumed["losses"], full["losses"], 1e-5, range(K, ds_runs.STEPS))


# bf16 weights and activations against fp32, or with the batch split over another number of
# ranks: the losses of these 6 steps differ by up to 2.2e-4 (relative; 2026-12-06, this 2-core
# EPYC), fp32 runs by 1e-7
BF16_RTOL = 2e-3


def test_resume_bf16_zero1_checkpoint_on_one_rank(runs):
    """BF16_Optimizer keeps padded partitions in its files: resharded too. The first resumed
    step runs on the saved weights: its loss differs only by the order of the mean over the
    batch (two ranks' halves, or one rank's whole)."""
    full, resumed = runs[10], runs[15]
    _close(resumed["losses"], full["losses"], BF16_RTOL, range(K, ds_runs.STEPS))
    assert resumed["losses"][K] == pytest.approx(full["losses"][K], rel=1e-6)


def test_zero1_round_robin_and_bf16(runs):
    ref = runs[1]["losses"]
    _close(runs[9]["losses"], ref, 1e-5)
    _close(runs[10]["losses"], ref, BF16_RTOL)
    # the other format (4-bit m, or v in the sqrt domain) against its own fp32 reference, and
    # it took effect: its losses are not those of the run's format
    _close(runs[11]["losses"], runs[16]["losses"], BF16_RTOL)
    last = ds_runs.STEPS - 1
    assert runs[16]["losses"][last] != ref[last]
    assert runs[11]["losses"][last] != runs[10]["losses"][last]
    for job in (10, 11):
        assert runs[job]["n_slots"][0] == 1


def test_overlap_comm_gives_the_same_losses_and_states(runs):
    """dsq's ``zero_optimization`` with ``overlap_comm`` on (gradients reduced bucket by bucket
    during backward) and off, at DP=2 for ZeRO-1 and ZeRO-2: the same losses and moments."""
    if runs["fmt"] != FORMATS["m8v8"][0]:
        pytest.skip("the overlap jobs run with the m8v8 format only (one launch)")
    ref = runs[1]["losses"]
    for off, on in ((17, 18), (19, 20)):
        assert runs[on]["losses"] == runs[off]["losses"], (off, on)
        _close(runs[on]["losses"], ref, 1e-5)  # and what the DP=1 reference gives
        for name, (m, v) in runs[off]["states"].items():
            m2, v2 = runs[on]["states"][name]
            assert torch.equal(m, m2) and torch.equal(v, v2), name
    # DeepSpeed's ZeRO optimizer took the setting
    assert [runs[j]["overlap_comm"] for j in (17, 18, 19, 20)] == [False, True, False, True]


def test_reshard_round_trip_is_exact(runs, tmp_path):
    """dp2 -> dp1 -> dp2 gives back the ZeRO files DeepSpeed wrote (tensors bit for bit)."""
    from dsq.run.reshard import reshard_checkpoint

    src = runs["tmp"] / "ckpt_dp2_as_dp1"
    back = reshard_checkpoint(src, "t", 2, out_dir=tmp_path)
    orig = runs["tmp"] / "ckpt_dp2" / "t"
    for r in range(2):
        name = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        a = torch.load(orig / name, weights_only=False)["optimizer_state_dict"]
        b = torch.load(back / name, weights_only=False)["optimizer_state_dict"]
        _same(a["base_optimizer_state"]["state"], b["base_optimizer_state"]["state"])
        _same(a["single_partition_of_fp32_groups"], b["single_partition_of_fp32_groups"])
        assert a["group_paddings"] == b["group_paddings"]
        assert a["base_optimizer_state"]["dsq"] == b["base_optimizer_state"]["dsq"]


def _same(a, b):
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def test_fp8_states_dp2_zero1_and_zero2_and_resharded_resume_equal_dp1_bit_for_bit(runs):
    """fp8 moments: DP=2 with ZeRO-2 and ZeRO-1 (a block cut by the partition boundary, its
    maxima exchanged) give DP=1's losses and moments bit for bit; the DP=2 checkpoint of step
    3, resharded to one rank and resumed, continues with the same bits."""
    if runs["fmt"] != FORMATS["m8v8"][0]:
        pytest.skip("the fp8 jobs run in the m8v8 launch only")
    ref = runs[21]
    assert sorted(ref["losses"]) == list(range(ds_runs.STEPS))
    for job in (22, 23):
        assert runs[job]["n_slots"][0] == 1, job  # the partition boundary cuts a block of l2
        assert runs[job]["losses"] == ref["losses"], job
        for name, (m, v) in ref["states"].items():
            m2, v2 = runs[job]["states"][name]
            assert torch.equal(m, m2) and torch.equal(v, v2), (job, name)
            assert m.abs().max() > 0 and v.max() > 0 and (v >= 0).all()
    resumed = runs[25]
    assert sorted(resumed["losses"]) == list(range(K, ds_runs.STEPS))
    for s in resumed["losses"]:
        assert resumed["losses"][s] == ref["losses"][s], s
    for name, (m, v) in ref["states"].items():
        assert torch.equal(m, resumed["states"][name][0]), name
        assert torch.equal(v, resumed["states"][name][1]), name
    # fp8 took effect: not the 8-bit integer run's moments; 1 byte per element + scales
    assert runs[0]["losses"][ds_runs.STEPS - 1] != ref["losses"][ds_runs.STEPS - 1]
    # exact model: 5888 elements, 23 blocks; rank 0 of DP=2 owns 2944 (blocks 0..11, 11 cut)
    assert ref["state_bytes"] == [5888 * 2 + 23 * 8]
    assert runs[22]["state_bytes"] == [2944 * 2 + 12 * 8, 2944 * 2 + 12 * 8]
