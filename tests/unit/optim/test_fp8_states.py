"""QAdamW's fp8 moments (``m_format`` / ``v_format`` = ``fp8e4m3`` | ``fp8e5m2``): codes
against the straight-line oracle, a step against a straight-line AdamW that quantizes its
states the same way, bytes, the underflow rule for v, kernels, checkpoints and config errors.
(DP=2 ZeRO-1/2 against DP=1 and reshard: tests/e2e/optim/test_deepspeed.py.)"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dsq.optim import QAdamW, optimizer_state_bytes
from dsq.optim import kernels as K
from dsq.optim.formats import FP8, TINY, Fmt
from dsq.optim.state import MomentState

ROOT = Path(__file__).resolve().parents[3]
F8 = {"fp8e4m3": (torch.float8_e4m3fn, 448.0), "fp8e5m2": (torch.float8_e5m2, 57344.0)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _oracle(x: torch.Tensor, amax: torch.Tensor, name: str):
    """``(x / s).to(float8)`` with ``s = amax / F`` in fp32 (``amax`` clamped to 1e-30 so that
    an all-zero block gives 0 instead of 0/0): bytes, dequantized values, scales."""
    dt, F = F8[name]
    s = torch.clamp_min(amax, TINY) / torch.tensor(F)
    code = (x / s).to(dt)
    return code.view(torch.uint8), code.float() * s, s


def _case(case: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if case == "large":  # 2**20 elements, 4096 blocks, magnitudes over 12 decades
        x = torch.randn(4096, 256, generator=g) * torch.logspace(-6, 6, 4096).unsqueeze(1)
        return x
    x = torch.randn(64, 256, generator=g)
    if case == "tiny":
        return x * 1e-20
    if case == "zero-block":
        x[3] = 0.0
        x[5, :255] = 0.0  # one non-zero element: its block's amax
        return x
    return x


@pytest.mark.parametrize("name", list(F8))
@pytest.mark.parametrize("case", ["normal", "tiny", "zero-block", "large"])
def test_m_codes_equal_the_straight_line_oracle_bit_for_bit(name, case):
    x = _case(case)
    mo = Fmt(8, 8, False, m_format=name).m
    amax = x.abs().amax(dim=1, keepdim=True)
    stored, s = mo.quantize(x, amax)
    want_bytes, want, want_s = _oracle(x, amax, name)
    assert stored.dtype == torch.uint8 and stored.shape == x.shape  # 1 byte per element
    assert torch.equal(stored, want_bytes) and torch.equal(s, want_s)
    got = mo.dequantize(stored, x.shape[1], s)
    assert torch.equal(got, want) and torch.isfinite(got).all()
    # the block maximum maps onto the format's largest finite value
    top = got.abs().amax(dim=1)
    nz = amax.squeeze(1) > 0
    assert torch.equal(top[nz], (F8[name][1] * s.squeeze(1))[nz])
    if case == "zero-block":
        assert (stored[3] == 0).all() and (got[3] == 0).all()
        assert got[5, 255] == x[5, 255]  # the block's only element is its maximum: exact
    # relative error of a normal fp8 number: half an ulp, 2**-4 (E4M3) or 2**-3 (E5M2)
    big = x.abs() >= amax * 2.0 ** -5
    rel = ((got - x).abs() / x.abs())[big & (x != 0)]
    assert rel.max() <= (2.0 ** -4 if name == "fp8e4m3" else 2.0 ** -3) + 1e-6


@pytest.mark.parametrize("name", list(F8))
def test_positive_v_never_stores_zero(name):
    """v spans 40 decades inside a block: the oracle's plain cast flushes the small ones to 0;
    dsq raises them to the smallest subnormal (byte 0x01), every other code is the oracle's."""
    g = torch.Generator().manual_seed(3)
    v = torch.rand(16, 256, generator=g) * torch.logspace(-40, 0, 256)
    v[2] = 0.0  # an all-zero block stays 0
    v[4, 7] = 0.0  # an exact zero stays 0
    mo = Fmt(8, 8, False, v_format=name).v
    vmax = v.amax(dim=1, keepdim=True)
    stored, s = mo.quantize(v, vmax)
    want_bytes, _, want_s = _oracle(v, vmax, name)
    flushed = (want_bytes == 0) & (v > 0)
    assert flushed.sum() > 100  # the rule is exercised
    assert torch.equal(stored[~flushed], want_bytes[~flushed]) and torch.equal(s, want_s)
    assert (stored[flushed] == 1).all()
    got = mo.dequantize(stored, 256, s)
    smallest = 2.0 ** (-9 if name == "fp8e4m3" else -16)
    assert torch.equal(got[flushed], (smallest * s).expand_as(got)[flushed])
    assert ((got > 0) == (v > 0)).all() and (got >= 0).all()


def _straight_line_adamw(p, grads, name_m, name_v, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8,
                         wd=0.1, width=256, sqrt=False):
    """AdamW whose moments live as fp8 codes of blocks of ``width``, written out: dequantize,
    update in fp32 (scalars rounded to fp32 once; sqrt correctly rounded), requantize with the
    oracle (v: a positive value flushed to 0 becomes the smallest subnormal)."""
    f32 = lambda a: float(np.float32(a))  # noqa: E731
    p = p.clone().view(-1, width)
    mb = torch.zeros_like(p, dtype=torch.uint8)
    vb = torch.zeros_like(p, dtype=torch.uint8)
    sm = torch.zeros(p.shape[0], 1)
    sv = torch.zeros(p.shape[0], 1)
    (dm, _), (dv, _) = F8[name_m], F8[name_v]
    for t, g in enumerate(grads, 1):
        g = g.view(-1, width)
        m = mb.view(dm).float() * sm
        v = vb.view(dv).float() * sv
        if sqrt:
            v = v * v
        m = m * f32(b1) + g * f32(1 - b1)
        v = v * f32(b2) + (g * g) * f32(1 - b2)
        r = torch.sqrt(v.double()).float()
        d = r * f32(1 / (1 - b2 ** t) ** 0.5) + f32(eps)
        p = p * f32(1 - lr * wd) - (m * f32(lr / (1 - b1 ** t))) / d
        vq = r if sqrt else v
        mb, _, sm = _oracle(m, m.abs().amax(dim=1, keepdim=True), name_m)
        vb, _, sv = _oracle(vq, vq.amax(dim=1, keepdim=True), name_v)
        vb = torch.where((vb == 0) & (vq > 0), torch.ones_like(vb), vb)
    return p.view(-1), mb, vb, sm.view(-1), sv.view(-1)


@pytest.mark.parametrize("m_fmt,v_fmt,sqrt", [("fp8e4m3", "fp8e5m2", False),
                                              ("fp8e4m3", "fp8e4m3", False),
                                              ("fp8e5m2", "fp8e5m2", True)])
def test_a_step_equals_the_straight_line_reference_bit_for_bit(m_fmt, v_fmt, sqrt):
    gen = torch.Generator().manual_seed(11)
    p0 = torch.randn(4 * 256, generator=gen)
    grads = [torch.randn(4 * 256, generator=gen) * 10.0 ** torch.randint(-6, 1, (1,),
                                                                          generator=gen).item()
             for _ in range(4)]
    p = p0.clone()
    opt = QAdamW([p], lr=1e-2, weight_decay=0.1, m_format=m_fmt, v_format=v_fmt,
                 v_domain="sqrt" if sqrt else "linear")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want_p, mb, vb, sm, sv = _straight_line_adamw(p0, grads, m_fmt, v_fmt, sqrt=sqrt)
    st = opt.state[p]
    assert torch.equal(p, want_p)
    assert torch.equal(st["m_codes"], mb.view(-1)) and torch.equal(st["v_codes"], vb.view(-1))
    assert torch.equal(st["m_scales"], sm) and torch.equal(st["v_scales"], sv)
    assert [k.name for k in opt._kernels.values()] == ["eager"]


def test_fp8_states_track_fp32_adamw_over_a_few_steps():
    """30 steps of a two-layer regression: the parameters' distance to fp32 AdamW's, relative
    to how far AdamW moved them, stays small: E4M3 m and v (the recipe's choice) within 5%,
    E4M3 m with E5M2 v within 7%, int8 for comparison within 2% (docs/optimizer.md records
    the values)."""
    def run(make):
        torch.manual_seed(0)
        x = torch.randn(512, 64)
        y = x @ (torch.randn(64, 32) * 0.5)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                    torch.nn.Linear(128, 32))
        start = torch.cat([q.detach().flatten() for q in model.parameters()])
        opt = make(model.parameters())
        for _ in range(30):
            idx = torch.randint(0, 512, (64,))
            loss = ((model(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([q.detach().flatten() for q in model.parameters()]), start

    ref, start = run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01))
    moved = (ref - start).norm()
    err = {}
    for key, kw in (("e4m3/e4m3", dict(m_format="fp8e4m3", v_format="fp8e4m3")),
                    ("e4m3/e5m2", dict(m_format="fp8e4m3", v_format="fp8e5m2")),
                    ("int8", dict())):
        got, _ = run(lambda ps: QAdamW(ps, lr=1e-3, weight_decay=0.01, **kw))
        err[key] = float((got - ref).norm() / moved)
    assert err["e4m3/e4m3"] < 0.05 and err["e4m3/e5m2"] < 0.07 and err["int8"] < 0.02, err
    assert err["e4m3/e4m3"] < err["e4m3/e5m2"], err  # why the recipe keeps v in E4M3


def test_small_v_never_blows_up_the_update():
    """One huge gradient and tiny ones in a block: their v is below fp8's smallest subnormal
    of the block's scale, yet their update stays bounded by lr (like AdamW), not m / eps."""
    g = torch.full((256,), 1e-6)
    g[0] = 10.0
    for name in F8:
        p = torch.zeros(256)
        opt = QAdamW([p], lr=1e-3, weight_decay=0.0, m_format=name, v_format=name)
        for _ in range(5):
            p.grad = g.clone()
            opt.step()
        m, v = opt.dequantized(p)
        assert (v > 0).all(), name
        assert p[1:].abs().max() <= 5 * 1e-3 * 1.01, name
        assert torch.isfinite(p).all()
        # stored as the smallest subnormal, where the plain cast of fp32 AdamW's v gives 0
        assert (opt.state[p]["v_codes"][1:] == 1).all(), name
        ref = torch.zeros(256, requires_grad=True)
        adamw = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0)
        for _ in range(5):
            ref.grad = g.clone()
            adamw.step()
        vt = adamw.state[ref]["exp_avg_sq"].view(1, -1)
        code, _, _ = _oracle(vt, vt.max().reshape(1, 1), name)
        assert (code.view(-1)[1:] == 0).all() and (vt > 0).all(), name


def test_state_is_one_byte_per_element_plus_a_scale_per_block():
    ps = [torch.zeros(768, 768), torch.zeros(768, 3072), torch.zeros(300)]
    opt = QAdamW(ps, m_format="fp8e4m3", v_format="fp8e5m2")
    for q in ps:
        q.grad = torch.randn_like(q)
    opt.step()
    n = 768 * 768 + 768 * 3072  # the 300-element vector is off the block grid: fp32 moments
    assert optimizer_state_bytes(opt) == 2 * n + 2 * 4 * (n // 256) + 8 * 300
    assert optimizer_state_bytes(opt) == sum(opt.layout(q).state_bytes() for q in ps)
    st = opt.state[ps[0]]
    assert list(st) == ["step", "m_codes", "v_codes", "m_scales", "v_scales", "exp_avg",
                        "exp_avg_sq"]  # the keys of the integer states
    assert st["m_codes"].dtype == st["v_codes"].dtype == torch.uint8
    # the codes are the float8 bits
    fm = Fmt.of(opt.param_groups[0])
    assert fm.m.fp8 is torch.float8_e4m3fn and fm.v.fp8 is torch.float8_e5m2
    m, _ = opt.dequantized(ps[0])
    assert torch.equal(m.view(-1, 256), st["m_codes"].view(torch.float8_e4m3fn).float()
                       .view(-1, 256) * st["m_scales"].unsqueeze(1))


def test_checkpoint_round_trip_and_a_format_change_is_refused(tmp_path):
    """Save after 2 steps, load into a new optimizer, 2 more steps: the same bits as 4 steps.
    A checkpoint of another format (fp8 v against int8 v: the same uint8 dtype) is refused,
    also one written before v_format existed (its group has only v_bits)."""
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(2, 512, generator=gen)
    grads = [torch.randn(2, 512, generator=gen) for _ in range(4)]
    kw = dict(m_format="fp8e4m3", v_format="fp8e5m2", block_size="row")

    def steps(opt, p, gs):
        for g in gs:
            p.grad = g.clone()
            opt.step()

    full = p0.clone()
    o1 = QAdamW([full], **kw)
    steps(o1, full, grads)
    half = p0.clone()
    o2 = QAdamW([half], **kw)
    steps(o2, half, grads[:2])
    torch.save({"opt": o2.state_dict(), "p": half}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    again = ck["p"].clone()
    o3 = QAdamW([again], **kw)
    o3.load_state_dict(ck["opt"])
    steps(o3, again, grads[2:])
    assert torch.equal(again, full)
    for k, t in o1.state[full].items():
        assert torch.equal(torch.as_tensor(t), torch.as_tensor(o3.state[again][k])), k
    other = QAdamW([p0.clone()], m_format="fp8e4m3", block_size="row")  # int8 v
    with pytest.raises(ValueError, match="v_format='fp8e5m2'"):
        other.load_state_dict(ck["opt"])
    old = {**ck["opt"], "param_groups": [{k: v for k, v in g.items() if not k.endswith("_format")}
                                         for g in ck["opt"]["param_groups"]]}
    with pytest.raises(ValueError, match="checkpoint has m_format='int8'"):
        QAdamW([p0.clone()], **kw).load_state_dict(old)


def test_kernels_auto_picks_reference_silently_and_native_is_refused(recwarn, capfd):
    p = torch.randn(512)
    opt = QAdamW([p], m_format="fp8e4m3", v_format="fp8e4m3", kernel="auto")
    for _ in range(2):
        p.grad = torch.randn(512)
        opt.step()
    assert [k.name for k in opt._kernels.values()] == ["eager"]
    assert len(recwarn) == 0 and capfd.readouterr() == ("", "")
    for name in ("native", "cpp"):
        with pytest.raises(ValueError, match="kernel=native does not handle fp8 moments"):
            QAdamW([p], v_format="fp8e5m2", kernel=name)
    # an int group beside an fp8-free optimizer still may use native; the C entry refuses fp8
    fmt = Fmt(8, 8, False, m_format="fp8e4m3")
    z = torch.zeros(256)
    with pytest.raises(ValueError, match="fp8 moments run on the reference kernel"):
        K._check(fmt, z, z, torch.zeros(256, dtype=torch.uint8), torch.zeros(1),
                 torch.zeros(256, dtype=torch.uint8), torch.zeros(1), 256, 256, 256, 1)


def test_optimizer_api_format_names_and_errors():
    p = [torch.zeros(256)]
    g = QAdamW(p, m_format="int4", v_format="fp8e5m2").param_groups[0]
    assert (g["m_bits"], g["v_bits"], g["m_format"], g["v_format"]) == (4, 8, "int4", "fp8e5m2")
    g = QAdamW(p, m_bits=4).param_groups[0]
    assert (g["m_format"], g["v_format"]) == ("int4", "int8")
    for kw, msg in ((dict(m_format="fp16"), "m_format='fp16' is unknown: use one of int8, int4, "
                     "fp32, fp8e4m3, fp8e5m2"),
                    (dict(m_bits=4, m_format="fp8e4m3"), "m_format=fp8e4m3 contradicts m_bits=4"),
                    (dict(v_bits=32, v_format="int8"), "v_format=int8 contradicts v_bits=32"),
                    (dict(v_format="fp8e5m2", v_signed=True), "v_signed applies")):
        with pytest.raises(ValueError, match=msg):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                QAdamW(p, **kw)


def test_piece_codes_round_trip_for_resharding():
    """What `dsq ckpt reshard` moves: per-element codes (the fp8 bytes) and scales of a
    partition with split blocks, written into another state: the same bytes and values."""
    from dsq.optim.layout import build_layout, is_quantized

    fmt = Fmt(8, 8, True, m_format="fp8e5m2", v_format="fp8e4m3")
    numels, offsets = [4 * 256, 300, 1536], [0, 1024, 1324]
    q = [is_quantized(n, 256, True) for n in numels]
    lay = build_layout(numels, offsets, q, 256, 8, 8, 500, 1500, 2)
    assert {pc.kind for pc in lay.pieces} == {"rows", "split", "fp32"}
    st = MomentState.zeros(lay, fmt, torch.zeros(lay.numel))
    g = torch.Generator().manual_seed(0)
    for t in st.tensors():
        if t.dtype == torch.uint8:  # finite codes only (no NaN/inf bytes)
            vals = torch.randn(t.shape, generator=g)
            t.copy_(vals.abs().to(FP8["fp8e4m3"][0]).view(torch.uint8) if t is st.v
                    else vals.to(FP8["fp8e5m2"][0]).view(torch.uint8))
        else:
            t.copy_(torch.rand(t.shape, generator=g))
    copy = MomentState.zeros(lay, fmt, torch.zeros(lay.numel))
    for pc in lay.pieces:
        if pc.kind == "fp32":
            for a, b in zip(copy.fp32(pc), st.fp32(pc)):
                a.copy_(b)
            continue
        qm, qv = st.piece_codes(pc)
        copy.set_piece_codes(pc, qm, qv)
        for a, b in zip(copy.scales(pc), st.scales(pc)):
            a.copy_(b)
    for a, b in zip(copy.tensors(), st.tensors()):
        assert torch.equal(a, b)
    m, v = st.dequantize()
    m2, v2 = copy.dequantize()
    assert torch.equal(m, m2) and torch.equal(v, v2) and torch.isfinite(m).all()
    assert (v >= 0).all() and m.abs().max() > 0


@pytest.mark.parametrize("overrides, line", [
    (["optim.m_format=fp16"], "optim.m_format='fp16' is unknown: use one of int8, int4, fp32, "
                              "fp8e4m3, fp8e5m2 (or null to follow optim.m_bits)"),
    (["optim.m_format=fp8e4m3", "optim.m_bits=4"],
     "optim.m_format=fp8e4m3 contradicts optim.m_bits=4: drop optim.m_bits (the format sets it) "
     "or set optim.m_format to one of int4"),
    (["optim.v_format=int4", "optim.v_bits=32"],
     "optim.v_format=int4 contradicts optim.v_bits=32: drop optim.v_bits (the format sets it) "
     "or set optim.v_format to one of fp32"),
    (["optim.v_format=fp8e5m2", "optim.kernel=native"],
     "optim.kernel=native does not handle fp8 moments (optim.m_format / optim.v_format): set "
     "optim.kernel=auto or reference"),
    (["optim.v_format=fp8e5m2", "optim.v_signed=true"],
     "optim.v_signed=true applies to an integer v: drop it or set optim.v_format to int8 or "
     "int4"),
    (["optim.m_format=fp32", "optim.v_format=fp32"],
     "optim.m_bits=32 and optim.v_bits=32 quantize neither moment: use optim.name=adamw for "
     "fp32 AdamW"),
])
def test_config_errors_are_one_line(capsys, overrides, line):
    from dsq.cli import main

    with pytest.raises(SystemExit) as e:
        main(["config", str(ROOT / "configs/tiny.yaml"), "optim.name=qadamw", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"dsq: error: {line}"]


def test_config_sets_the_bits_and_the_recipe_loads(capsys):
    from dsq.cli import main
    from dsq.config import flatten, load_config, to_dict
    from dsq.optim import optimizer_line
    from dsq.tracking.report import _optim_states

    cfg = load_config([str(ROOT / "configs/tiny.yaml")],
                      ["optim.name=qadamw", "optim.m_format=int4", "optim.v_format=fp8e5m2"])
    assert (cfg.optim.m_bits, cfg.optim.v_bits) == (4, 8)
    cfg = load_config([str(ROOT / "configs/tiny.yaml"),
                       str(ROOT / "configs/recipes/formats/fp8-states.yaml")])
    o = cfg.optim
    assert (o.name, o.m_format, o.v_format, o.m_bits, o.v_bits) == (
        "qadamw", "fp8e4m3", "fp8e4m3", 8, 8)
    params = {k: str(v) for k, v in flatten(to_dict(cfg)).items()}  # as MLflow stores them
    assert _optim_states(params) == "m fp8e4m3/v fp8e4m3 b256"
    assert optimizer_line(o).startswith("qadamw, m fp8e4m3, v fp8e4m3 (linear), blocks of 256")
    main(["config", str(ROOT / "configs/tiny.yaml"),
          str(ROOT / "configs/recipes/formats/fp8-states.yaml"), "--memory"])
    out = capsys.readouterr().out
    assert "QAdamW (m fp8e4m3/v fp8e4m3, blocks of 256)" in out


def test_compiled_kernel_equals_reference_bit_for_bit():
    """``optim.kernel=compile`` (the row update under torch.compile, opt-in for GPUs) with fp8
    moments: the reference kernel's bits, on two steps (one compilation)."""
    fmt = Fmt(8, 8, False, m_format="fp8e4m3", v_format="fp8e5m2")
    gen = torch.Generator().manual_seed(1)
    rows, width = 5, 256
    p0 = torch.randn(rows, width, generator=gen)
    g = torch.randn(rows, width, generator=gen) * 1e-2
    m = torch.randn(rows, width, generator=gen) * 1e-3
    v = torch.rand(rows, width, generator=gen) * 1e-6
    mc, ms = fmt.m.quantize(m, m.abs().amax(1, keepdim=True))
    vc, vs = fmt.v.quantize(v, v.amax(1, keepdim=True))
    out = []
    for ker in (K.EagerKernel(), K.CompiledKernel()):
        res = []
        for step in (3, 4):
            st = [p0.clone(), mc.clone(), ms.view(-1).clone(), vc.clone(), vs.view(-1).clone()]
            ker.rows(st[0], g, *st[1:], rows, width, fmt, K.Hyper(1e-3, 0.9, 0.999, 1e-8, 0.1,
                                                                    step))
            res.append(st)
        out.append(res)
    for eager, compiled in zip(*out):
        assert not torch.equal(eager[0], p0)
        for a, b in zip(eager, compiled):
            assert torch.equal(a, b)


def test_dsq_optim_kernel_native_is_refused_and_auto_reports_reference(monkeypatch, capsys,
                                                                        tmp_path):
    """``DSQ_OPTIM_KERNEL=native`` with fp8 moments: one line from ``dsq train`` before any
    process group starts; under ``auto`` the kernels line says the reference kernel runs."""
    from dsq import runtime
    from dsq.cli import main
    from dsq.config import load_config

    args = [str(ROOT / "configs/tiny.yaml"), str(ROOT / "configs/recipes/formats/fp8-states.yaml")]
    cfg = load_config(args)
    with pytest.raises(ValueError, match="DSQ_OPTIM_KERNEL=native does not handle fp8"):
        runtime.resolve_kernels(cfg, {"DSQ_OPTIM_KERNEL": "native"})
    assert runtime.describe_kernels(runtime.resolve_kernels(cfg, {}), True,
                                    runtime.fp8_states(cfg.optim))["kernels.optim"] == "reference"
    assert not runtime.fp8_states(load_config(args[:1], ["optim.name=qadamw"]).optim)
    monkeypatch.setenv("DSQ_OPTIM_KERNEL", "native")
    with pytest.raises(SystemExit) as e:
        main(["train", *args, f"train.out_dir={tmp_path / 'out'}",
              f"data.cache_dir={tmp_path / 'cache'}"])
    assert not (tmp_path / "out").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        "dsq: error: DSQ_OPTIM_KERNEL=native does not handle fp8 moments (optim.m_format / "
        "optim.v_format): set it to auto or reference"]
