"""QAdamW on one process: formats, kernels, quality against torch AdamW, state, checkpoints."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from dsq.optim import QAdamW, build_optimizer, optimizer_state_bytes
from dsq.optim import formats as codec
from dsq.optim import kernels as K
from tests.native_utils import native_or_fail

FORMATS = [(8, 8, "linear"), (4, 8, "linear"), (4, 4, "sqrt"), (8, 8, "sqrt")]
# one moment quantized, the other fp32 (32 bits): the study's m8, m4 and v8
SINGLE = [(8, 32, "linear"), (4, 32, "linear"), (32, 8, "linear"), (32, 8, "sqrt")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _opt(params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QAdamW(params, **kw)


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def pack_piece_codes(qm, qv, fmt):
    """Storage of per-element codes (fp32 values of a 32-bit moment) of m and v."""
    return fmt.m.encode(qm), fmt.v.encode(qv)


def unpack_codes(mc, vc, n, fmt):
    """Per-element int16 codes of m's and v's storage (a copy of a 32-bit moment's values)."""
    return tuple(mo.codes(c.reshape(-1), n, torch.int16).clone()
                 for mo, c in ((fmt.m, mc), (fmt.v, vc)))


def cpp_or_skip():
    """The C kernel; a build that failed fails the test (tests/native_utils.py)."""
    return K.CppKernel(native_or_fail(K.LIBRARY))


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("n", [1, 2, 7, 256, 257])
def test_pack4_round_trip(n):
    nib = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = codec.pack4(nib)
    assert packed.numel() == (n + 1) // 2
    assert torch.equal(codec.unpack4(packed, n), nib)
    qm = torch.randint(-7, 8, (n,), dtype=torch.int16)
    qv = torch.randint(0, 16, (n,), dtype=torch.int16)
    cm, cv = pack_piece_codes(qm, qv, codec.Fmt(4, 4, False))
    qm2, qv2 = unpack_codes(cm, cv, n, codec.Fmt(4, 4, False))
    assert torch.equal(qm, qm2) and torch.equal(qv, qv2)


@pytest.mark.parametrize("m_bits,v_bits,v_domain", FORMATS + SINGLE)
def test_dequantized_state_error_is_half_a_step(m_bits, v_bits, v_domain):
    """After one step from zero moments, m = (1-b1) g and v = (1-b2) g^2 exactly in fp32; the
    stored ones are within half a quantization step of them (per block), and v is never 0.
    A 32-bit moment is stored exactly."""
    # numpy's generator: the same gradients on every CPU (torch.randn's vectorized fill
    # differs between AVX2 and AVX-512 builds of the same sampler)
    g = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32))
    g = g * torch.tensor([1e-4, 1e-2, 1.0, 1e3]).unsqueeze(1)
    p = torch.zeros(4 * 256)
    opt = _opt([p], m_bits=m_bits, v_bits=v_bits, v_domain=v_domain, lr=1e-3)
    _step(opt, [p], [g.reshape(-1)])
    m_hat, v_hat = (t.view(4, 256) for t in opt.dequantized(p))
    m = g * torch.tensor(0.1)
    v = (g * g) * torch.tensor(0.001, dtype=torch.float32)
    assert (v_hat > 0).all()
    if m_bits == 32:
        assert torch.equal(m_hat, m)
    if v_bits == 32:
        assert torch.equal(v_hat, v)
    if m_bits == 32 or v_bits == 32:
        assert set(opt.state[p]) & {"m_fp32", "v_fp32"}
    if v_bits == 32:  # the quantized m as below
        assert "v_scales" not in opt.state[p] and "v_codes" not in opt.state[p]
    qm, qv = codec.qmax_m(m_bits), codec.qmax_v(v_bits)
    sm = m.abs().amax(1, keepdim=True) / qm
    assert ((m_hat - m).abs() <= 0.5001 * sm).all()
    if v_bits == 32:
        pass
    else:
        # within half a step, or (a v that would round to code 0) raised to exactly one step
        x, x_hat = (v, v_hat) if v_domain == "linear" else (v.sqrt(), v_hat.sqrt())
        step = x.amax(1, keepdim=True) / qv
        raised = (x_hat - x).abs() > 0.5001 * step
        one_step = (x_hat - step).abs() <= 1e-6 * step  # the stored scale, to float rounding
        assert (~raised | (one_step & (x < 0.5001 * step))).all()
    if m_bits != 32:
        # relative error of the block as a whole: 8-bit m ~ 40 dB, 4-bit m ~ 18 dB
        snr = 10 * torch.log10(m.pow(2).sum() / (m_hat - m).pow(2).sum())
        assert snr > (35 if m_bits == 8 else 15)


def test_small_v_never_blows_up_the_update():
    """A block with one huge gradient and tiny ones: the tiny ones' v is far below one step of
    v's scale, yet their update stays bounded by lr (like fp32 AdamW's), not m / eps."""
    g = torch.full((256,), 1e-6)
    g[0] = 10.0
    p = torch.zeros(256)
    opt = _opt([p], lr=1e-3, weight_decay=0.0)
    for _ in range(5):
        _step(opt, [p], [g])
    assert p[1:].abs().max() <= 5 * 1e-3 * 1.01
    assert torch.isfinite(p).all()


# ----------------------------------------------------------------------------- kernels
def _random_state(rows, width, fmt, gen):
    """Codes and scales of both moments; a 32-bit moment: fp32 values and scale None."""
    ms = torch.rand(rows, generator=gen) * 1e-3
    vs = torch.rand(rows, generator=gen) * 1e-6
    if fmt.m_bits == 32:
        mc, ms = torch.randn(rows, width, generator=gen) * 1e-2, None
    else:
        mc = torch.randint(-127 if fmt.m_bits == 8 else 0, 128 if fmt.m_bits == 8 else 256,
                           (rows, codec.code_bytes(width, fmt.m_bits)), generator=gen)
        mc = mc.to(torch.int8 if fmt.m_bits == 8 else torch.uint8)
    if fmt.v_bits == 32:
        vc, vs = torch.rand(rows, width, generator=gen) * 1e-4, None
    else:
        vc = torch.randint(0, 256, (rows, codec.code_bytes(width, fmt.v_bits)), generator=gen)
        vc = vc.to(torch.uint8)
    return mc, ms, vc, vs


def _clone(t):
    return None if t is None else t.clone()


def _rows_inputs(fmt, rows, width):
    """Parameters, gradients and a random state of ``rows`` blocks of ``width`` (seed 1)."""
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(rows, width, generator=gen)
    g = torch.randn(rows, width, generator=gen) * 1e-2
    return p0, g, _random_state(rows, width, fmt, gen)


@pytest.mark.parametrize("m_bits,v_bits,v_domain", FORMATS + SINGLE)
def test_cpp_kernel_equals_eager_bit_for_bit(m_bits, v_bits, v_domain):
    cpp = cpp_or_skip()
    fmt = codec.Fmt(m_bits, v_bits, v_domain == "sqrt")
    rows, width = 9, 256
    p0, g, st0 = _rows_inputs(fmt, rows, width)
    h = K.Hyper(1e-3, 0.9, 0.999, 1e-8, 0.1, 7)
    out = []
    for ker in (K.EagerKernel(), cpp):
        p, st = p0.clone(), [_clone(t) for t in st0]
        ker.rows(p, g, st[0], st[1], st[2], st[3], rows, width, fmt, h)
        out.append([p, *st])
    for a, b, c in zip(*out, [p0, *st0]):
        if a is None:
            assert b is None
            continue
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # every part of the state was rewritten


@pytest.mark.slow
def test_compiled_kernel_equals_eager_bit_for_bit():
    """The ``compile`` kernel compiles the one eager row update (kernels.rows_update), so it
    gives the eager bits, on a second step without recompiling for the new scalars."""
    for m_bits, v_bits, v_domain in ((8, 8, "linear"), (4, 8, "sqrt")):
        fmt = codec.Fmt(m_bits, v_bits, v_domain == "sqrt")
        rows, width = 5, 256
        p0, g, st0 = _rows_inputs(fmt, rows, width)
        out = {}
        for ker in (K.EagerKernel(), K.CompiledKernel()):
            for step in (3, 4):
                h = K.Hyper(1e-3, 0.9, 0.999, 1e-8, 0.1, step)
                p, st = p0.clone(), [_clone(t) for t in st0]
                ker.rows(p, g, *st, rows, width, fmt, h)
                out.setdefault(step, []).append([p, *st])
        for eager, compiled in out.values():
            for a, b in zip(eager, compiled):
                assert (a is None and b is None) or torch.equal(a, b), (m_bits, v_bits)


@pytest.mark.parametrize("m_bits,v_bits,v_domain", SINGLE)
def test_optimizer_eager_equals_cpp_with_one_fp32_moment(m_bits, v_bits, v_domain):
    """Whole steps with every kind of piece: blocks, a parameter off the block grid (fp32
    moments), a per-tensor block wider than FUSE_MAX (two-pass path)."""
    cpp_or_skip()
    res = []
    for kernel in ("eager", "cpp"):
        torch.manual_seed(0)
        ps = [torch.randn(4 * 256), torch.randn(300), torch.randn(20_000), torch.randn(64)]
        opt = _opt([{"params": ps[:2]}, {"params": ps[2:], "block_size": "tensor"}], lr=1e-2,
                   m_bits=m_bits, v_bits=v_bits, v_domain=v_domain, kernel=kernel)
        torch.manual_seed(1)
        for _ in range(4):
            _step(opt, ps, [torch.randn_like(p) for p in ps])
        res.append((ps, opt))
    (pa, a), (pb, b) = res
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        for s, t in zip(a.dequantized(x), b.dequantized(y)):
            assert torch.equal(s, t)
    key = "m_fp32" if m_bits == 32 else "v_fp32"
    assert a.state[pa[2]][key].numel() == 20_000
    assert key not in a.state[pa[1]] and a.state[pa[1]]["exp_avg"].numel() == 300


@pytest.mark.parametrize("kernel", ["eager", "cpp"])
@pytest.mark.parametrize("m_bits,v_bits,v_domain", FORMATS + SINGLE)
@pytest.mark.parametrize("cut", [1, 37, 128, 255])
def test_block_split_in_two_equals_whole_block(kernel, m_bits, v_bits, v_domain, cut):
    """The DP invariance in miniature: a block updated whole (rows) and the same block updated
    as two parts whose maxima are combined (pass1, max, pass2) give identical bits."""
    ker = K.EagerKernel() if kernel == "eager" else cpp_or_skip()
    fmt = codec.Fmt(m_bits, v_bits, v_domain == "sqrt")
    gen = torch.Generator().manual_seed(cut)
    p0 = torch.randn(1, 256, generator=gen)
    g = torch.randn(1, 256, generator=gen) * 1e-2
    mc0, ms0, vc0, vs0 = _random_state(1, 256, fmt, gen)
    h = K.Hyper(1e-3, 0.9, 0.999, 1e-8, 0.1, 3)
    p, mc, ms, vc, vs = p0.clone(), mc0.clone(), _clone(ms0), vc0.clone(), _clone(vs0)
    ker.rows(p, g, mc, ms, vc, vs, 1, 256, fmt, h)
    whole_m, whole_v = _codes(mc, vc, fmt, 256)
    # the two parts as two ranks would hold them: own codes (4-bit repacked from the cut)
    qm0, qv0 = _codes(mc0, vc0, fmt, 256)
    parts = []
    for a, b in ((0, cut), (cut, 256)):
        cm, cv = pack_piece_codes(qm0[a:b], qv0[a:b], fmt)
        parts.append([p0.view(-1)[a:b].clone(), g.view(-1)[a:b], cm, _clone(ms0), cv,
                      _clone(vs0)])
    maxima = [ker.pass1(pp, gg, cm, sm, cv, sv, gg.numel(), fmt, h)
              for pp, gg, cm, sm, cv, sv in parts]
    if m_bits == 32 or v_bits == 32:  # the fp32 moment has no maximum; pass1 left it alone
        assert all(x[0 if m_bits == 32 else 1] == 0.0 for x in maxima)
        assert torch.equal(torch.cat([x[2 if m_bits == 32 else 4] for x in parts]),
                           (mc0 if m_bits == 32 else vc0).view(-1))
    am, av = max(x for x, _ in maxima), max(y for _, y in maxima)
    for pp, gg, cm, sm, cv, sv in parts:
        ker.pass2(gg, cm, sm, cv, sv, gg.numel(), fmt, h, am, av)
    assert torch.equal(torch.cat([x[0] for x in parts]), p.view(-1))
    got = [_codes(x[2], x[4], fmt, x[1].numel()) for x in parts]
    assert torch.equal(torch.cat([x[0] for x in got]), whole_m)
    assert torch.equal(torch.cat([x[1] for x in got]), whole_v)
    for x in parts:
        for a, b in ((x[3], ms), (x[5], vs)):
            assert (a is None and b is None) or torch.equal(a, b)


def _codes(mc, vc, fmt, n):
    return unpack_codes(mc, vc, n, fmt)


# ----------------------------------------------------------------------------- quality
def _regression(make, steps=150):
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    y = x @ (torch.randn(64, 32) * 0.5) + 0.01 * torch.randn(512, 32)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    opt = make(model.parameters())
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,))
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.fixture(scope="module")
def adamw_curve():
    return _regression(lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01))


@pytest.mark.parametrize("kw,curve_tol,final_tol", [
    # measured: max 0.7% / final -0.4% | 17% / +11% | 16% / +6% | 1.2% / -0.5%
    (dict(), 0.02, 0.01),                                   # 8-bit m, 8-bit v, blocks of 256
    (dict(m_bits=4), 0.25, 0.15),                           # 4-bit m: converges ~10% slower
    (dict(m_bits=4, v_bits=4, v_domain="sqrt"), 0.25, 0.10),
    (dict(block_size="tensor"), 0.03, 0.01),                # per-tensor scales (the study's)
    # one moment in fp32, measured: max 0.22% / +0.09% | 17% / +11% | 0.73% / -0.45%
    (dict(v_bits=32), 0.01, 0.005),                         # m8: 8-bit m, fp32 v
    (dict(m_bits=4, v_bits=32), 0.25, 0.15),                # m4: the 4-bit m costs the same
    (dict(m_bits=32), 0.02, 0.01),                          # v8: fp32 m, 8-bit v
])
def test_toy_regression_tracks_adamw(adamw_curve, kw, curve_tol, final_tol):
    q = _regression(lambda p: _opt(p, lr=3e-3, weight_decay=0.01, **kw))
    rel = (q - adamw_curve).abs() / adamw_curve
    assert rel.max() < curve_tol, float(rel.max())
    assert abs(q[-20:].mean() / adamw_curve[-20:].mean() - 1) < final_tol
    assert q[-20:].mean() < 0.3 * adamw_curve[:5].mean()


# ----------------------------------------------------------------------------- fp32 groups
def test_unquantized_groups_equal_torch_adamw():
    torch.manual_seed(0)
    shapes = [(33, 7), (256, 4), (5,)]
    ref = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    p_q = [t.clone() for t in ref]
    p_f = [t.clone() for t in ref]
    p_e = [t.clone() for t in ref]
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    q = _opt([{"params": p_q, "quantize": False}], **kw)
    fused = torch.optim.AdamW(p_f, fused=True, **kw)
    foreach = torch.optim.AdamW(p_e, foreach=True, **kw)
    for gs in grads:
        for opt, ps in ((q, p_q), (fused, p_f), (foreach, p_e)):
            _step(opt, ps, gs)
    for a, b, c in zip(p_q, p_f, p_e):
        assert torch.equal(a, b)
        assert (a - c).abs().max() < 1e-6
    assert torch.equal(q.state[p_q[0]]["exp_avg"], fused.state[p_f[0]]["exp_avg"])


def test_params_off_the_block_grid_keep_fp32_moments():
    torch.manual_seed(0)
    a, b = torch.randn(300), torch.randn(512)  # 300 is not a multiple of 256
    ref = a.clone()
    q = _opt([a, b], lr=1e-2)
    fused = torch.optim.AdamW([ref], lr=1e-2, fused=True)
    for _ in range(3):
        g = torch.randn(300)
        _step(q, [a, b], [g, torch.randn(512)])
        _step(fused, [ref], [g])
    assert torch.equal(a, ref)
    assert "m_codes" not in q.state[a] and q.state[b]["m_codes"].numel() == 512


# ----------------------------------------------------------------------------- state, API
@pytest.mark.parametrize("m_bits,v_bits,limit", [(8, 8, 2.05), (4, 8, 1.55), (4, 4, 1.05),
                                                 (8, 32, 5.02), (4, 32, 4.52), (32, 8, 5.02)])
def test_state_bytes_per_parameter(m_bits, v_bits, limit):
    """Codes (or 4 bytes of a 32-bit moment) per element, one fp32 scale per block and
    quantized moment: m8 with fp32 v is 1 + 4 bytes per parameter + 4 per 256."""
    ps = [torch.zeros(768, 768), torch.zeros(768, 3072)]
    opt = _opt(ps, m_bits=m_bits, v_bits=v_bits)
    _step(opt, ps, [torch.randn_like(p) for p in ps])
    n = sum(p.numel() for p in ps)
    scaled = (m_bits != 32) + (v_bits != 32)
    assert optimizer_state_bytes(opt) / n <= limit
    assert optimizer_state_bytes(opt) == n * (m_bits + v_bits) // 8 + 4 * scaled * (n // 256)
    assert optimizer_state_bytes(opt) == sum(opt.layout(p).state_bytes() for p in ps)


def test_per_tensor_scales_including_wide_blocks():
    torch.manual_seed(0)
    ps = [torch.randn(40_000), torch.randn(100)]  # 40000 > FUSE_MAX: two-pass path
    opt = _opt(ps, block_size="tensor", v_domain="sqrt")
    for _ in range(3):
        _step(opt, ps, [torch.randn_like(p) for p in ps])
    for p in ps:
        assert opt.state[p]["m_scales"].numel() == 1
        m, v = opt.dequantized(p)
        assert torch.isfinite(m).all() and (v > 0).all()


@pytest.mark.parametrize("m_bits,v_bits", [(4, 8), (8, 32), (32, 8)])
def test_checkpoint_round_trip_continues_bit_exactly(m_bits, v_bits):
    torch.manual_seed(0)
    shapes = [(512,), (300,), (1024,)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]
    init = [torch.randn(s) for s in shapes]
    kw = dict(lr=1e-2, m_bits=m_bits, v_bits=v_bits, weight_decay=0.1)
    pa = [t.clone() for t in init]
    a = _opt(pa, **kw)
    for gs in grads:
        _step(a, pa, gs)
    pb = [t.clone() for t in init]
    b = _opt(pb, **kw)
    for gs in grads[:3]:
        _step(b, pb, gs)
    sd = b.state_dict()
    pc = [t.clone() for t in pb]
    c = _opt(pc, **kw)
    c.load_state_dict(sd)
    saved = b.state[pb[0]]
    assert {k: v.dtype for k, v in c.state[pc[0]].items() if torch.is_tensor(v)} == \
        {k: v.dtype for k, v in saved.items() if torch.is_tensor(v)}
    assert saved["m_codes" if m_bits != 32 else "m_fp32"].dtype == \
        {4: torch.uint8, 8: torch.int8, 32: torch.float32}[m_bits]
    for gs in grads[3:]:
        _step(c, pc, gs)
    for x, y in zip(pa, pc):
        assert torch.equal(x, y)
    for other in (8 if m_bits == 4 else 4, 32 if m_bits == 8 else 8):
        if (other, v_bits) == (32, 32):
            continue
        d = _opt([t.clone() for t in init], **dict(kw, m_bits=other))
        with pytest.raises(ValueError, match="m_bits"):
            d.load_state_dict(sd)


def test_flat_partition_without_attach_is_an_error():
    p = torch.zeros(512)
    opt = _opt([p])
    flat = torch.zeros(256)
    opt.param_groups[0]["params"] = [flat]  # what DeepSpeed's ZeRO does
    flat.grad = torch.ones(256)
    with pytest.raises(RuntimeError, match="attach_to_engine"):
        opt.step()


class _Named(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(16, 32)
        self.fc = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)


def test_build_optimizer_quantizes_the_configured_kinds():
    for quantize, kinds in (("linear", {"linear"}), ("linear+embedding", {"linear", "embedding"}),
                            ("all", {"linear", "embedding", "no_decay"})):
        cfg = types.SimpleNamespace(name="qadamw", lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                                    weight_decay=0.1, m_bits=4, v_bits=8, block_size=128,
                                    quantize=quantize, v_domain="linear", kernel="auto")
        opt = build_optimizer(_Named(), cfg)
        assert isinstance(opt, QAdamW)
        assert {g["kind"] for g in opt.param_groups if g["quantize"]} == kinds
        for g in opt.param_groups:
            assert g["m_bits"] == 4 and g["block_size"] == 128 and g["betas"] == (0.9, 0.95)
            assert g["weight_decay"] == (0.0 if g["kind"] == "no_decay" else 0.1)
    with pytest.raises(ValueError, match="quantize"):
        build_optimizer(_Named(), types.SimpleNamespace(**dict(vars(cfg), quantize="bad")))


def test_bad_options_are_rejected():
    p = [torch.zeros(4)]
    for kw in (dict(m_bits=3), dict(v_bits=2), dict(block_size=255), dict(block_size=0),
               dict(v_domain="log"), dict(kernel="gpu"), dict(m_bits=16), dict(v_bits=True)):
        with pytest.raises(ValueError):
            QAdamW(p, **kw)
    with pytest.raises(ValueError, match="quantize neither moment: use torch.optim.AdamW"):
        QAdamW(p, m_bits=32, v_bits=32)
    with pytest.raises(ValueError, match="v_domain='sqrt' applies to a quantized v"):
        QAdamW(p, v_bits=32, v_domain="sqrt")
    QAdamW(p, m_bits=32, v_domain="sqrt")  # a quantized v in the sqrt domain, fp32 m: fine
    with pytest.warns(UserWarning, match="4-bit v"):
        QAdamW(p, v_bits=4)
