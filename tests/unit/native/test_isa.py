"""Native kernels per instruction set (dsq.native): which variant a CPU gets (from mocked
``/proc/cpuinfo`` flags, so on any machine), each variant this CPU can run bit for bit equal to
the PyTorch reference, and a failed build reported in one line with its log."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsq import log as dsq_log
import torch

from dsq import native
from dsq.optim import kernels as K
from dsq.optim.formats import Fmt
from dsq.quant import cpu_kernels, fused, gemm
from dsq.quant.format import QuantFormat
from dsq.quant.functional import quantize

BASE = {"fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "popcnt"}
CPUS = {  # flag sets of real CPUs (the relevant part of their /proc/cpuinfo)
    "Sapphire Rapids": BASE | {"avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw",
                               "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
                               "amx_int8", "amx_bf16"},
    "Zen 4": BASE | {"avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16"},
    "Skylake-SP": BASE | {"avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"},
    "Zen 2": BASE | {"avx", "avx2", "fma", "f16c"},
    "Alder Lake": BASE | {"avx", "avx2", "fma", "avx_vnni"},
    "Knights Landing": BASE | {"avx", "avx2", "fma", "avx512f", "avx512cd"},  # no BW/VL
    "Sandy Bridge": BASE | {"avx"},
    "AVX2 without FMA": BASE | {"avx", "avx2"},
}
EXPECT = {  # (variant, int8 dot-product unit, bf16 in hardware)
    "Sapphire Rapids": ("avx512", "amx_int8", True),
    "Zen 4": ("avx512", "avx512_vnni", True),
    "Skylake-SP": ("avx512", None, False),
    "Zen 2": ("avx2", None, False),
    "Alder Lake": ("avx2", "avx_vnni", False),
    "Knights Landing": ("avx2", None, False),
    "Sandy Bridge": ("portable", None, False),
    "AVX2 without FMA": ("portable", None, False),
}


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_dispatcher_picks_the_variant_of_the_flags(cpu, monkeypatch):
    monkeypatch.delenv("DSQ_ISA", raising=False)
    isa, unit, bf16 = EXPECT[cpu]
    assert native.select_isa(CPUS[cpu]) == isa
    assert native.int8_units(CPUS[cpu]) == unit
    assert native.has_native_bf16(CPUS[cpu]) is bf16
    # the AMX GEMM driver needs all of these; every AMX CPU has them
    assert (set(native.AMX_NEEDS) <= CPUS[cpu]) is (cpu == "Sapphire Rapids")


def test_dsq_isa_lowers_the_choice_and_refuses_what_the_cpu_lacks(monkeypatch, capsys):
    monkeypatch.setattr(dsq_log, "_seen", set())
    zen4, zen2 = CPUS["Zen 4"], CPUS["Zen 2"]
    assert native.select_isa(zen4, "avx2") == "avx2"
    assert native.select_isa(zen4, "portable") == "portable"
    assert native.select_isa(zen2, "reference") == "reference"
    assert capsys.readouterr().err == ""
    assert native.select_isa(zen2, "avx512") == "avx2"
    assert native.select_isa(zen2, "sse9") == "avx2"
    assert capsys.readouterr().err.splitlines() == [
        "dsq: warning: DSQ_ISA=avx512 needs avx512f, avx512bw, avx512vl, avx2, fma, which this "
        "CPU lacks: using avx2",
        "dsq: warning: DSQ_ISA=sse9 is not one of avx512, avx2, portable, reference: using avx2"]


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """The kernels' modules as in a fresh process (their choice is made on first use)."""
    monkeypatch.setattr(native, "_CHOSEN", {})
    monkeypatch.setattr(native, "_VARIANTS", {})  # nothing built in this process yet
    monkeypatch.setattr(dsq_log, "_seen", set())
    monkeypatch.delenv("DSQ_ISA", raising=False)
    fused.set_kernel("auto")
    yield monkeypatch
    fused.set_kernel(None)


def test_a_cpu_with_avx2_only_runs_the_avx2_kernels(fresh_dispatch):
    """Mocked Zen 2 flags: both native kernels load their avx2 build (here, on a CPU that
    has at least AVX2: this machine's test suite needs a compiler anyway)."""
    if "avx2" not in native.supported_isas():
        pytest.skip("this CPU has no AVX2 + FMA: the avx2 build cannot run here")
    fresh_dispatch.setattr(native, "cpu_flags", lambda: frozenset(CPUS["Zen 2"]))
    assert cpu_kernels.isa() == "avx2" and cpu_kernels.library().dsq_isa() == b"avx2"
    assert K.isa() == "avx2" and K.get_kernel("auto", torch.device("cpu")).lib.dsq_isa() == b"avx2"
    assert fused._impl(torch.zeros(4, 16)) == "cpp"


def test_reference_means_no_native_code(fresh_dispatch):
    fresh_dispatch.setenv("DSQ_ISA", "reference")
    fresh_dispatch.setattr(native, "build", lambda *a, **k: pytest.fail("built a kernel"))
    assert cpu_kernels.library() is None and cpu_kernels.isa() == "reference"
    assert fused._impl(torch.zeros(4, 16)) == "eager"
    assert isinstance(K.get_kernel("auto", torch.device("cpu")), K.EagerKernel)
    assert K.isa() == "reference"


def test_a_failing_build_is_one_line_naming_kernel_isa_fallback_and_log(fresh_dispatch, tmp_path,
                                                                         capsys):
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\nfor i in $(seq 100); do echo \"x.c:$i: error: no\" >&2; done\n"
                  "exit 1\n")
    cc.chmod(0o755)
    fresh_dispatch.setenv("CC", str(cc))
    fresh_dispatch.setenv("DSQ_CACHE_DIR", str(tmp_path))
    isa = native.select_isa()
    assert fused._impl(torch.zeros(4, 16)) == "eager"
    assert isinstance(K.get_kernel("auto", torch.device("cpu")), K.EagerKernel)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(": using ")[0] for ln in lines] == [
        f"dsq: warning: dsq quantization kernels ({isa}) not built (broken-cc failed)",
        f"dsq: warning: dsq QAdamW kernel ({isa}) not built (broken-cc failed)"]
    for ln, name in zip(lines, ("quant", "qadamw")):
        assert "error" not in ln
        log = Path(ln.split("compiler output in ")[1])
        assert log.parent == tmp_path / "logs" and log.name.startswith(f"{name}-{isa}_")
        text = log.read_text()
        assert "x.c:1: error: no" in text and "x.c:100: error: no" in text
        assert "-ffp-contract=off" in text and "-march=native" not in text
    assert "using the eager PyTorch kernels; compiler output in " in lines[0]
    assert cpu_kernels.isa() == K.isa() == "reference"


# ------------------------------------------------------------------ variants, bit for bit
def _variant(isa: str):
    """(quantization library, QAdamW library) built as ``isa``; skip where the CPU lacks it."""
    if isa not in native.supported_isas():
        missing = sorted(set(native.ISA_NEEDS[isa]) - native.cpu_flags())
        pytest.skip(f"this CPU has no {', '.join(missing) or isa}: its {isa} build cannot run")
    return cpu_kernels.build_variant(isa), K.build_variant(isa)


def _data(R, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g) * torch.exp(torch.randn(R, 1, generator=g) * 3)
    k = torch.randint(-126, 126, (R, C), generator=g).float()
    ties = (k + 0.5) * x.abs().amax(1, keepdim=True) / 127  # rounding ties of the row scale
    x = torch.where(torch.rand(R, C, generator=g) < 0.3, ties, x)
    return x.to(dtype)


def _packed_index(R, C):
    """Where element (r, c) of an R x C matrix lands in the AMX driver's packed B."""
    r = torch.arange(R).unsqueeze(1)
    c = torch.arange(C).unsqueeze(0)
    b = c // 64
    w = torch.clamp(C - b * 64, max=64)
    return b * 64 * R + (r // 4) * w * 4 + (c - b * 64) * 4 + r % 4


@pytest.mark.parametrize("isa", native.ISAS)
def test_quantization_kernels_of_each_variant_equal_the_reference(isa, monkeypatch):
    lib, _ = _variant(isa)
    assert lib.dsq_isa() == isa.encode()
    monkeypatch.setattr(cpu_kernels, "library", lambda: lib)
    fmt = QuantFormat(8, "token")
    for dtype in (torch.float32, torch.bfloat16):
        # C % 16 == 0 takes the vector code, the others the scalar one; R not a multiple of 16
        for R, C in ((64, 256), (36, 80), (20, 50)):
            x = _data(R, C, dtype, seed=R * C)
            ra, ca, cs, ta = cpu_kernels.stats(x, True, True, True, True)
            xf = x.float()
            assert torch.equal(ra, xf.abs().amax(1, keepdim=True))
            assert torch.equal(ca, xf.abs().amax(0, keepdim=True))
            assert torch.equal(ta, xf.abs().max())
            torch.testing.assert_close(cs, xf.sum(0), rtol=1e-5, atol=1e-3)  # another order
            fused.set_kernel("cpp")
            try:
                rc, rs, cc, csc, _ = fused.quantize_rows_cols(x, fmt)
                _, _, cct, _, _ = fused.quantize_rows_cols(x, fmt, rows=False, transpose=True)
            finally:
                fused.set_kernel(None)
            want = quantize(x, fmt)
            assert torch.equal(rc, want.codes) and torch.equal(rs, want.scale)
            want_c = quantize(x.t(), QuantFormat(8, "channel"))
            assert torch.equal(cc, want_c.codes.t()) and torch.equal(csc, want_c.scale.t())
            assert torch.equal(cct, want_c.codes)
            if R % 4 == 0:
                _, packed = cpu_kernels.codes(x, -127, 127, col_scale=csc.contiguous(),
                                              packed=True)
                assert torch.equal(packed[_packed_index(R, C)], cc)
            # the rescale epilogue, both output dtypes, transposed or not
            acc = torch.randint(-2**20, 2**20, (R, C), dtype=torch.int32,
                                generator=torch.Generator().manual_seed(1))
            bias = torch.randn(C, generator=torch.Generator().manual_seed(2)).to(dtype)
            for tr in (False, True):
                got = cpu_kernels.rescale(acc, rs, csc.contiguous(), bias, dtype, tr)
                fused.set_kernel("eager")
                try:
                    ref = gemm.rescale(acc, rs, csc, bias, dtype, transpose=tr)
                finally:
                    fused.set_kernel(None)
                assert torch.equal(got, ref)


@pytest.mark.parametrize("isa", native.ISAS)
def test_quantization_variants_agree_on_non_finite_input(isa):
    """NaN and infinity: the variant's codes equal the portable build's (the scalar C)."""
    lib, _ = _variant(isa)
    ref = cpu_kernels.build_variant("portable")
    x = _data(32, 64, torch.float32, seed=3)
    x[3, 5], x[7, 17], x[9, 40], x[30, 63] = float("nan"), float("inf"), -float("inf"), 3e38
    rs = torch.full((32, 1), 0.01)
    rs[4] = 1e-38  # tiny and huge scales: the reciprocal-and-corrections division's edges
    rs[5] = 3e36
    cs = torch.full((1, 64), 0.02)
    cs[0, 2] = 1.2e-38
    outs = []
    for L in (lib, ref):
        qr, qc = torch.empty(32, 64, dtype=torch.int8), torch.empty(64, 32, dtype=torch.int8)
        L.dsq_codes_f32(x.data_ptr(), 32, 64, rs.data_ptr(), 1, qr.data_ptr(), cs.data_ptr(), 1,
                        qc.data_ptr(), 1, -127.0, 127.0, 2)
        st = [torch.empty(32), torch.empty(64), torch.empty(64), torch.empty(())]
        L.dsq_stats_f32(x.data_ptr(), 32, 64, *(t.data_ptr() for t in st), 2)
        outs.append([qr, qc, *st])
    for a, b in zip(*outs):
        assert torch.equal(a.view(torch.int8) if a.dtype == torch.int8 else a.view(torch.int32),
                           b.view(torch.int8) if b.dtype == torch.int8 else b.view(torch.int32))


@pytest.mark.parametrize("isa", native.ISAS)
def test_qadamw_kernel_of_each_variant_equals_the_eager_one(isa):
    from tests.unit.optim.test_qadamw import FORMATS, SINGLE, _clone, _random_state

    _, lib = _variant(isa)
    assert lib.dsq_isa() == isa.encode()
    cpp, eager = K.CppKernel(lib), K.EagerKernel()
    h = K.Hyper(1e-3, 0.9, 0.999, 1e-8, 0.1, 7)
    for m_bits, v_bits, v_domain in FORMATS + SINGLE:
        fmt = Fmt(m_bits, v_bits, v_domain == "sqrt")
        gen = torch.Generator().manual_seed(m_bits * 100 + v_bits)
        rows, width = 5, 250  # a width with a tail after the vector loops
        p0 = torch.randn(rows, width, generator=gen)
        g = torch.randn(rows, width, generator=gen) * 1e-2
        st0 = _random_state(rows, width, fmt, gen)
        out = []
        for ker in (eager, cpp):
            p, st = p0.clone(), [_clone(t) for t in st0]
            ker.rows(p, g, *st, rows, width, fmt, h)
            # the split-block passes, on the first row as one piece
            n = width
            p1, st1 = p0[0].clone(), [_clone(t) for t in st0]
            one = [t[0] if t is not None else None for t in st1]
            one = [t.reshape(-1) if t is not None and t.dim() else t for t in one]
            ms1 = st1[1][:1] if st1[1] is not None else None
            vs1 = st1[3][:1] if st1[3] is not None else None
            am, av = ker.pass1(p1, g[0].clone(), one[0], ms1, one[2], vs1, n, fmt, h)
            ker.pass2(g[0].clone(), one[0], ms1, one[2], vs1, n, fmt, h, am, av)
            out.append([p, *st, p1, one[0], one[2], ms1, vs1, torch.tensor([am, av])])
        for a, b in zip(*out):
            assert (a is None and b is None) or torch.equal(a, b), (m_bits, v_bits, v_domain)
