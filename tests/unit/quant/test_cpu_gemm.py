"""The AMX int8 GEMM driver (dsq.quant.cpu_gemm) and the C quantization kernels: bit for bit
what ``torch._int_mm`` + the rescale and the eager quantizer compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsq import log as dsq_log
import torch

from dsq import native
from dsq.quant import cpu_gemm, cpu_kernels, fused, gemm
from dsq.quant.format import QuantFormat
from dsq.quant.functional import quantize
from tests.native_utils import native_or_fail


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


needs_int8_units = pytest.mark.skipif(
    "amx_int8" not in _cpu_flags(),
    reason="this CPU has no AMX-INT8 (oneDNN's int8 micro-kernel packs only for AMX): "
           "integer GEMMs use torch._int_mm")


def _reference(a, b, rs, cs, bias, dtype, transpose):
    return gemm.rescale(torch._int_mm(a.contiguous(), b.contiguous()), rs, cs, bias, dtype,
                         transpose=transpose)


@needs_int8_units
def test_driver_is_available_here():
    assert cpu_gemm.available(), "the AMX GEMM driver did not build on this machine"


@pytest.mark.skipif("amx_int8" in _cpu_flags(), reason="this CPU has AMX-INT8")
def test_without_amx_the_driver_is_not_built_and_status_says_why(monkeypatch, capsys):
    monkeypatch.setattr(native, "_CHOSEN", {})
    monkeypatch.setattr(native, "build", lambda *a, **k: pytest.fail("built without AMX"))
    assert not cpu_gemm.available() and not cpu_gemm.can_take(64)
    assert cpu_gemm.status().startswith("torch._int_mm (this CPU has no ")
    assert "amx_int8" in cpu_gemm.status()
    assert capsys.readouterr().err == ""  # a CPU without AMX is no fault: nothing printed


def test_a_failing_driver_build_is_one_line_with_the_log(monkeypatch, tmp_path, capsys):
    """On a (mocked) AMX CPU whose C++ compiler fails: one line naming the driver, its ISA and
    the fallback, the compiler's whole output in the log file that line names."""
    from dsq import native

    monkeypatch.setattr(native, "_CHOSEN", {})
    monkeypatch.setattr(native, "_VARIANTS", {})
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(native.AMX_NEEDS))
    monkeypatch.setattr(dsq_log, "_seen", set())
    monkeypatch.setenv("DSQ_CACHE_DIR", str(tmp_path))
    cc = tmp_path / "broken-c++"
    cc.write_text("#!/bin/sh\nfor i in $(seq 200); do\n"
                  "echo \"error: line $i of the diagnosis\" >&2; done\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CXX", str(cc))
    assert not cpu_gemm.available()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" not in err, err
    assert err.startswith("dsq: warning: dsq AMX GEMM driver (amx) not built (broken-c++ failed)"
                          ": using torch._int_mm; compiler output in ")
    log = Path(err.rsplit(" ", 1)[1].strip())
    assert log.parent == tmp_path / "logs" and log.name.startswith("amx_gemm-amx_")
    text = log.read_text()
    assert "error: line 1 of the diagnosis" in text and "error: line 200 of" in text
    assert " -mavx512f " in text.splitlines()[0] and "-march=native" not in text


@needs_int8_units
@pytest.mark.parametrize("M,K,N", [(1, 4, 1), (17, 12, 33), (64, 64, 64), (130, 260, 70),
                                   (300, 1024, 200), (64, 4096, 48)])
def test_equals_int_mm_and_rescale(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=g)
    bt = b.t().contiguous().t()  # the same matrix, column-major (W^T in the forward)
    rs, cs = torch.rand(M, 1, generator=g) + 0.01, torch.rand(1, N, generator=g) + 0.01
    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        bias = torch.randn(N, generator=g).to(dtype)
        for bb in (b, bt):
            for tr in (False, True):
                for r, c, bi in ((rs, cs, bias), (rs, cs, None), (rs[0, 0], cs[0, 0], None)):
                    got = cpu_gemm.scaled_mm(a, bb, r, c, bi, dtype, transpose=tr)
                    assert got is not None
                    want = _reference(a, bb, r, c, bi, dtype, tr)
                    assert got.shape == want.shape and got.dtype == dtype
                    assert torch.equal(got, want)  # bit for bit, tails included
                    checked += 1
    assert checked == 24


@needs_int8_units
def test_strided_left_operand_and_output_shape():
    g = torch.Generator().manual_seed(0)
    big = torch.randint(-128, 128, (40, 100), dtype=torch.int8, generator=g)
    a = big[:, 8:72]  # lda 100 > K 64
    b = torch.randint(-128, 128, (64, 24), dtype=torch.int8, generator=g)
    rs, cs = torch.rand(40, 1, generator=g), torch.rand(1, 24, generator=g)
    got = cpu_gemm.scaled_mm(a, b, rs, cs, None, torch.float32, out_shape=(4, 10, 24))
    assert got.shape == (4, 10, 24) and got._base is None
    assert torch.equal(got.view(40, 24), _reference(a, b, rs, cs, None, torch.float32, False))


def test_operands_it_cannot_take_are_left_to_int_mm():
    a = torch.ones(8, 6, dtype=torch.int8)
    b = torch.ones(6, 8, dtype=torch.int8)
    s = torch.ones(())
    assert cpu_gemm.scaled_mm(a, b, s, s, None, torch.float32) is None  # K % 4
    a, b = torch.ones(8, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8)
    assert cpu_gemm.scaled_mm(a.t(), b, s, s, None, torch.float32) is None  # column-major A
    assert cpu_gemm.scaled_mm(a, b, s, s, None, torch.float16) is None  # output dtype
    assert cpu_gemm.scaled_mm(a, b, s, s, torch.ones(8), torch.bfloat16) is None  # bias dtype
    # and the public entry point still computes them, through torch._int_mm
    with gemm.counting_int_gemms() as calls:
        y = gemm.scaled_mm(a.t(), b, s, s, None, torch.float32)
    assert calls == [(8, 8, 8)] and torch.equal(y, torch.full((8, 8), 8.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_kernel_rounds_ties_like_a_true_division(dtype):
    """The C codes kernel divides by reciprocal + two exact (fma) corrections: on values at and
    one ulp around every rounding tie it gives the eager quantizer's codes, bit for bit."""
    native_or_fail(cpu_kernels.LIBRARY)
    g = torch.Generator().manual_seed(0)
    R, C = 64, 256
    scale = torch.exp(torch.randn(R, 1, generator=g) * 3)  # scales over many binades
    k = torch.randint(-126, 126, (R, C), generator=g).float()
    x = (k + 0.5) * scale  # ties (where exactly representable), and their neighbours
    x = torch.where(torch.rand(R, C, generator=g) < 0.3, torch.nextafter(x, x + 1), x)
    x = torch.where(torch.rand(R, C, generator=g) < 0.3, torch.nextafter(x, x - 1), x)
    x[:, 0] = 127 * scale[:, 0]  # each row's max: scale = amax / 127 = the row's scale
    x = x.to(dtype)
    fmt = QuantFormat(8, "token")
    fused.set_kernel("cpp")
    try:
        rc, rs, cc, cs, _ = fused.quantize_rows_cols(x, fmt)
        _, _, cct, _, _ = fused.quantize_rows_cols(x, fmt, rows=False, transpose=True)
    finally:
        fused.set_kernel(None)
    want = quantize(x, fmt)
    assert torch.equal(rs, want.scale) and torch.equal(rc, want.codes)
    want_c = quantize(x.t(), QuantFormat(8, "channel"))
    assert torch.equal(cc, want_c.codes.t()) and torch.equal(cct, want_c.codes)
    assert torch.equal(cs, want_c.scale.t())
    ties = ((x.float() / rs).frac().abs() == 0.5).sum()
    assert ties > 50  # the data really holds ties


@needs_int8_units
@pytest.mark.parametrize("R,C", [(64, 48), (36, 200), (4, 16), (128, 130)])
def test_codes_written_packed_are_the_drivers_layout(R, C):
    """Column codes written straight into the driver's packed B layout (the tile path for
    C % 16 == 0, the element-wise one otherwise) equal packing the row-major codes, and the
    GEMM on them equals the GEMM on the unpacked matrix."""
    g = torch.Generator().manual_seed(R + C)
    x = torch.randn(R, C, generator=g).bfloat16()
    fmt = QuantFormat(8, "token")
    fused.set_kernel("cpp")
    try:
        assert fused.can_pack(x, fmt)
        _, _, cc, cs, _ = fused.quantize_rows_cols(x, fmt, rows=False)
        _, _, cp, cs2, _ = fused.quantize_rows_cols(x, fmt, rows=False, pack=True)
        wc, _ = fused.quantize_cols(x, fmt, pack=True)
    finally:
        fused.set_kernel(None)
    assert cp.shape == (R * C,) and torch.equal(cs, cs2)
    assert torch.equal(cp, cpu_gemm.pack(cc)) and torch.equal(wc, cp)
    a = torch.randint(-128, 128, (24, R), dtype=torch.int8, generator=g)
    rs = torch.rand(24, 1, generator=g)
    got = gemm.scaled_mm(a, cp, rs, cs, None, torch.float32, b_shape=(R, C))
    assert torch.equal(got, _reference(a, cc, rs, cs, None, torch.float32, False))


def test_packing_needs_the_driver():
    x = torch.randn(6, 16)  # R % 4 != 0: the driver cannot reduce over 6
    assert not fused.can_pack(x, QuantFormat(8, "token"))
    with pytest.raises(ValueError, match="packed"):
        fused.quantize_cols(x, QuantFormat(8, "token"), pack=True)


@pytest.mark.skipif(not native._X86, reason="the AMX driver is x86 code")
def test_driver_compiles_with_its_explicit_flags_on_any_x86_cpu():
    """-mavx512{f,bw,vl,dq,bf16} cover every intrinsic of csrc/amx_gemm.cpp, whatever this CPU
    is (with -march=native an AVX2-only CPU failed with 'target specific option mismatch');
    where it has no AMX, PyTorch's oneDNN then refuses to pack int8 operands."""
    try:
        cpu_gemm.build_variant()
    except native.BuildError as e:
        pytest.fail(f"the driver did not compile: {e.log.read_text()[-3000:]}")
    except RuntimeError as e:
        assert "amx_int8" not in native.cpu_flags()
        assert str(e) == "PyTorch's oneDNN cannot pack int8 operands on this CPU"
