"""How the integer path picks its kernels by device, tested without a GPU: device tensors never
reach the CPU native kernels, CUDA's int_mm operand rules are met by exact zero padding, and a
failing torch.compile falls back to the same arithmetic run eagerly."""

from __future__ import annotations

import pytest
import torch

from dsq.quant import QuantFormat, cpu_gemm, cpu_kernels, fused
from dsq.quant.gemm import cuda_operands

FMT = QuantFormat.parse("int8:token")


@pytest.fixture
def no_native(monkeypatch):
    """Any attempt to build or load the CPU native kernels fails the test."""
    def boom(*a, **k):
        raise AssertionError("CPU native kernels loaded for a device tensor")

    monkeypatch.setattr(cpu_kernels, "library", boom)
    monkeypatch.setattr(cpu_gemm, "library", boom)
    fused.set_kernel(None)
    yield
    fused.set_kernel(None)


@pytest.mark.parametrize("kernel, triton, expected", [
    ("auto", True, "compile"), ("auto", False, "eager"), ("compile", True, "compile"),
    ("cpp", True, "eager"), ("eager", True, "eager")])
def test_device_tensors_use_compiled_or_eager_kernels(monkeypatch, no_native, kernel, triton,
                                                     expected):
    monkeypatch.setattr(fused, "has_triton", lambda: triton)
    fused.set_kernel(kernel)
    x = torch.empty(64, 32, device="meta")
    assert fused._impl(x, FMT) == expected
    assert fused._impl(x, QuantFormat.parse("int8:token:stochastic")) == "eager"
    assert fused._impl(torch.empty(4, 4, dtype=torch.float64, device="meta"), FMT) == "eager"


def test_start_up_line_names_the_cuda_kernels(monkeypatch):
    monkeypatch.setattr(fused, "has_triton", lambda: True)
    fused.set_kernel(None)
    text = fused.engine("cuda")
    assert "torch._int_mm" in text and "Triton" in text and "zero-padded" in text
    monkeypatch.setattr(fused, "has_triton", lambda: False)
    assert "eager PyTorch" in fused.engine("cuda")


def test_start_up_line_names_the_cpu_and_its_kernels(monkeypatch):
    from dsq import native

    monkeypatch.setitem(native._CHOSEN, "quant", native.Choice(None, "avx2"))
    monkeypatch.setitem(native._CHOSEN, "amx_gemm",
                        native.Choice(None, "reference", "this CPU has no amx_tile, amx_int8"))
    fused.set_kernel(None)
    assert fused.engine("cpu") == (
        f"on CPU ({native.cpu_model()}): integer GEMMs: torch._int_mm (this CPU has no amx_tile, "
        f"amx_int8), quantization and rescale kernels: C/avx2")


def test_int8_outlook_by_cpu():
    """Where integer GEMMs beat the fastest float GEMM (measured: docs/performance.md), and why."""
    from dsq.quant.cpu_gemm import int8_outlook
    from tests.unit.native.test_isa import CPUS

    assert int8_outlook(CPUS["Sapphire Rapids"]) == (True, "AMX-INT8 tiles (dsq's GEMM driver)")
    assert int8_outlook(CPUS["Zen 4"])[1].startswith("avx512_vnni int8 dot products")
    assert int8_outlook(CPUS["Alder Lake"])[1].startswith("avx_vnni int8 dot products")
    pays, why = int8_outlook(CPUS["Zen 2"])
    assert pays and why.endswith("still ahead of fp32 (bf16 is emulated here) GEMMs")
    pays, why = int8_outlook(CPUS["Sandy Bridge"])
    assert not pays and why.startswith("no AVX2: torch._int_mm has no vector int8 kernel")


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 12, 20), (16, 64, 8), (17, 8, 24),
                                   (40, 30, 9)])
def test_cuda_operands_meet_the_rules_and_keep_the_product(m, k, n):
    g = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-128, 128, (k, m), generator=g, dtype=torch.int8).t()  # column-major a
    b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    pa, pb = cuda_operands(a, b)
    assert pa.is_contiguous() and pa.shape[0] > 16
    assert pa.shape[1] % 8 == 0 and pb.shape[1] % 8 == 0 and pa.shape[1] == pb.shape[0]
    assert torch.equal(torch._int_mm(pa, pb)[:m, :n], a.int() @ b.int())


def test_a_failing_compile_runs_the_same_code_eagerly(monkeypatch):
    monkeypatch.setattr(fused, "_compile_failed", None)
    monkeypatch.setattr(fused, "_compiled", {})

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("triton: no working compiler\nlong log")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="torch.compile kernels unavailable"):
        codes, scale = fused._compiled_kernel(fused._quant_key(rows=True))(x, FMT.qmin, FMT.qmax)
    assert fused._compile_failed.startswith("RuntimeError: triton: no working compiler")
    fused.set_kernel("eager")
    try:
        ref_codes, ref_scale = fused.quantize_rows(x, FMT)
    finally:
        fused.set_kernel(None)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_int8_start_up_line_warns_where_int8_does_not_pay(monkeypatch, capsys):
    """On a (mocked) CPU without AVX2 the one start-up line of an int8 run is a warning that
    says why; the recipe itself runs unchanged."""
    from dsq import native
    from dsq.models.quant_layers import _report_int8
    from dsq.quant import LinearQuant
    from tests.unit.native.test_isa import CPUS

    qc = LinearQuant(weight="int8:channel", activation="int8:token", grad="int8:token",
                     grad_gemms="both", compute="int8")
    _report_int8(qc, ["decoder.layers.0.mlp.linear_fc1"])
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and line.startswith("dsq: quant.compute=int8 for ")
    assert "does not pay" not in line
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(CPUS["Sandy Bridge"]))
    _report_int8(qc, ["decoder.layers.0.mlp.linear_fc1"])
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and line.startswith("dsq: warning: quant.compute=int8 for ")
    assert line.rstrip().endswith("; int8 does not pay on this CPU: no AVX2: torch._int_mm has "
                                  "no vector int8 kernel on this CPU and runs slower than fp32 "
                                  "GEMMs")
