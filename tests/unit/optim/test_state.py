"""QAdamW's moments as objects: formats <- layout <- MomentState; its state dict, bytes, views
and dequantization, and checkpoints written before it existed."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch

from dsq.optim import QAdamW, optimizer_state_bytes
from dsq.optim.formats import Fmt
from dsq.optim.layout import FUSE_MAX, build_layout, check_block, is_quantized
from dsq.optim.state import MomentState

FORMATS = [(8, 8, False, False), (4, 8, False, False), (4, 4, True, False), (8, 32, False, False),
           (4, 32, False, False), (32, 8, True, False), (8, 8, False, True)]
KEYS = {(8, 8): ["step", "m_codes", "v_codes", "m_scales", "v_scales", "exp_avg", "exp_avg_sq"],
        (4, 8): ["step", "m_codes", "v_codes", "m_scales", "v_scales", "exp_avg", "exp_avg_sq"],
        (4, 4): ["step", "m_codes", "v_codes", "m_scales", "v_scales", "exp_avg", "exp_avg_sq"],
        (8, 32): ["step", "m_codes", "v_fp32", "m_scales", "exp_avg", "exp_avg_sq"],
        (4, 32): ["step", "m_codes", "v_fp32", "m_scales", "exp_avg", "exp_avg_sq"],
        (32, 8): ["step", "m_fp32", "v_codes", "v_scales", "exp_avg", "exp_avg_sq"]}
DTYPES = {8: (torch.int8, torch.uint8), 4: (torch.uint8, torch.uint8),
          32: (torch.float32, torch.float32)}
DATA = Path(__file__).parent / "data" / "qadamw_before_moment_state.pt"


def _fmt(m_bits, v_bits, v_sqrt, v_signed):
    return Fmt(m_bits, v_bits, v_sqrt, v_signed)


def _layout(fmt, part=(0, 3000), dp=1):
    """A group with blocks, a parameter off the block grid and a per-row-of-blocks merge."""
    numels = [4 * 256, 300, 1536, 140]
    offsets = [0, 1024, 1324, 2860]
    q = [is_quantized(n, 256, True) for n in numels]
    return build_layout(numels, offsets, q, 256, fmt.m_bits, fmt.v_bits, part[0], part[1], dp)


def _random(state: MomentState, seed: int) -> None:
    """Random codes (full range of each dtype), scales and fp32 moments, in place."""
    g = torch.Generator().manual_seed(seed)
    for t in state.tensors():
        if t.dtype == torch.float32:
            t.copy_(torch.rand(t.shape, generator=g))
        else:
            lo = -127 if t.dtype == torch.int8 else 0
            t.copy_(torch.randint(lo, 128 if t.dtype == torch.int8 else 256, t.shape, generator=g))


@pytest.mark.parametrize("m_bits,v_bits,v_sqrt,v_signed", FORMATS)
def test_state_dict_keys_dtypes_and_bytes_are_stable(m_bits, v_bits, v_sqrt, v_signed):
    fmt = _fmt(m_bits, v_bits, v_sqrt, v_signed)
    lay = _layout(fmt)
    st = MomentState.zeros(lay, fmt, torch.zeros(lay.numel))
    sd = st.state_dict()
    assert list(sd) == KEYS[(m_bits, v_bits)]  # the keys (and order) checkpoints hold
    dm, dv = DTYPES[m_bits][0], DTYPES[v_bits][1]
    assert sd[fmt.m_key].dtype == dm and sd[fmt.v_key].dtype == dv
    assert st.nbytes == sum(t.numel() * t.element_size() for t in sd.values()
                            if torch.is_tensor(t))
    assert st.nbytes == lay.state_bytes()
    # wrapping the dict takes its tensors, not copies
    again = MomentState.of(sd, lay, fmt)
    assert all(a is b for a, b in zip(again.tensors(), st.tensors()))
    assert list(again.state_dict()) == list(sd)


def test_unquantized_group_holds_adamw_state():
    fmt = Fmt(8, 8, False)
    lay = build_layout([300], [0], [False], 256, 8, 8, 0, 300, 1)
    p = torch.zeros(300)
    st = MomentState.zeros(lay, fmt, p)
    assert list(st.state_dict()) == ["step", "exp_avg", "exp_avg_sq"]
    assert st.nbytes == lay.state_bytes() == 8 * 300


@pytest.mark.parametrize("m_bits,v_bits,v_sqrt,v_signed", FORMATS)
def test_piece_codes_round_trip_and_dequantize(m_bits, v_bits, v_sqrt, v_signed):
    fmt = _fmt(m_bits, v_bits, v_sqrt, v_signed)
    lay = _layout(fmt, part=(500, 1500), dp=2)  # a split block at each end
    assert {pc.kind for pc in lay.pieces} == {"rows", "split", "fp32"}
    st = MomentState.zeros(lay, fmt, torch.zeros(lay.numel))
    _random(st, 0)
    m, v = st.dequantize()
    copy = MomentState.zeros(lay, fmt, torch.zeros(lay.numel))
    for pc in lay.pieces:
        if pc.kind == "fp32":
            for a, b in zip(copy.fp32(pc), st.fp32(pc)):
                a.copy_(b)
            continue
        qm, qv = st.piece_codes(pc)
        assert qm.numel() == qv.numel() == pc.length
        copy.set_piece_codes(pc, qm, qv)
        for a, b in zip(copy.scales(pc), st.scales(pc)):
            if a is not None:
                a.copy_(b)
        # dequantized values: codes times the piece's (per-row) scale
        sm, _ = st.scales(pc)
        mc, _ = st.storage(pc)
        if fmt.m_q:
            per = sm.repeat_interleave(pc.width)[:pc.length] if pc.kind == "rows" else sm[0]
            assert torch.equal(m[pc.start:pc.start + pc.length], qm.float() * per)
            mc_view = st.views(pc)[0]
            assert mc_view.data_ptr() == mc.data_ptr()
    for a, b in zip(copy.tensors(), st.tensors()):
        assert torch.equal(a, b)
    m2, v2 = copy.dequantize()
    assert torch.equal(m, m2) and torch.equal(v, v2) and (v >= 0).all()


@pytest.mark.parametrize("m_bits,v_bits", [(8, 8), (4, 32), (32, 8)])
def test_optimizer_state_is_the_moment_state(m_bits, v_bits):
    torch.manual_seed(0)
    ps = [torch.randn(4 * 256), torch.randn(300)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = QAdamW(ps, m_bits=m_bits, v_bits=v_bits, kernel="eager")
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    fmt = Fmt.of(opt.param_groups[0])
    total = 0
    for p in ps:
        st = MomentState.of(opt.state[p], opt.layout(p), fmt)
        m, v = st.dequantize()
        for a, b in zip((m, v), opt.dequantized(p)):
            assert torch.equal(a, b)
        total += st.nbytes
    assert total == optimizer_state_bytes(opt)


def test_check_block_is_pure_and_names_the_key():
    for ok in (2, 256, FUSE_MAX, "tensor", "row"):
        assert check_block(ok) is None
    for bad in (0, 1, 255, FUSE_MAX + 2, 32768, True, 2.0, "block", None):
        with pytest.raises(ValueError, match=r"^optim\.block_size=.*: use an even number of "
                                             r"elements in \[2, 16384\], 'tensor'"):
            check_block(bad)


def test_checkpoint_written_before_moment_state_resumes_bit_exactly():
    """State dicts saved by QAdamW before MomentState (tests/unit/optim/data, written at commit
    6bf5c3e): they load, and two more steps give the parameters that version computed."""
    saved = torch.load(DATA, weights_only=False)
    assert set(saved) == {"m8v8", "m4v4sqrt", "m4v32", "m32v8"}
    for name, entry in saved.items():
        ps = [t.clone() for t in entry["params"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = QAdamW([{"params": ps[:2]}, {"params": ps[2:], "quantize": False}], lr=1e-2,
                         block_size=64, kernel="eager", **entry["kwargs"])
        opt.load_state_dict(entry["state_dict"])
        for gs in entry["grads"]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        for a, b in zip(ps, entry["expected"]):
            assert torch.equal(a, b), name
        # and the state saved again has the keys it was loaded with
        again = opt.state_dict()["state"]
        assert {k: list(v) for k, v in again.items()} == \
            {k: list(v) for k, v in entry["state_dict"]["state"].items()}


def test_formats_layout_state_import_one_way():
    """formats imports nothing of dsq; layout only formats; state formats and layout."""
    root = Path(__file__).resolve().parents[3] / "dsq" / "optim"
    want = {"formats": set(), "layout": {"dsq.optim.formats"},
            "state": {"dsq.optim.formats", "dsq.optim.layout"}}
    for mod, allowed in want.items():
        tree = ast.parse((root / f"{mod}.py").read_text())
        got = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and n.module and n.module.startswith("dsq")}
        got |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                if a.name.startswith("dsq")}
        assert got == allowed, mod


def test_a_state_that_does_not_fit_its_layout_is_refused_on_load():
    torch.manual_seed(0)
    ps = [torch.randn(512)]
    opt = QAdamW(ps, kernel="eager")
    ps[0].grad = torch.randn(512)
    opt.step()
    sd = opt.state_dict()
    bad = {k: v for k, v in sd.items()}
    bad["state"] = {0: dict(sd["state"][0], m_codes=sd["state"][0]["m_codes"].to(torch.uint8))}
    with pytest.raises(ValueError, match="optimizer state m: the checkpoint holds 512 "
                                         "torch.uint8, this layout needs 512 torch.int8"):
        QAdamW([torch.zeros(512)], kernel="eager").load_state_dict(bad)
    bad["state"] = {0: dict(sd["state"][0], v_scales=sd["state"][0]["v_scales"][:1])}
    with pytest.raises(ValueError, match="optimizer state v_scales: the checkpoint holds 1 "):
        QAdamW([torch.zeros(512)], kernel="eager").load_state_dict(bad)
    again = QAdamW([torch.zeros(512)], kernel="eager")
    again.load_state_dict(sd)
    assert again.state[again.param_groups[0]["params"][0]]["step"] == 1
