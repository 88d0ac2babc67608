"""Quantization and the integer linear on CUDA against the CPU reference on the same inputs."""

from __future__ import annotations

import pytest
import torch

from dsq.quant import LinearQuant, QuantFormat, quantized_linear
from dsq.quant.functional import quantize
from dsq.quant.fused import quantize_cols, quantize_rows, set_kernel
from dsq.quant.gemm import int_mm

pytestmark = pytest.mark.gpu

FORMATS = ["int8:tensor", "int8:channel", "int8:token", "int8:group32", "int4:channel",
           "int4:group32", "int8:channel:asym", "int4:tensor:asym"]


def _close_codes(a: torch.Tensor, b: torch.Tensor) -> None:
    """Codes equal up to a rounding tie resolved differently (at most one step, rarely)."""
    d = (a.cpu().int() - b.cpu().int()).abs()
    assert int(d.max()) <= 1
    assert float((d > 0).float().mean()) <= 1e-4


@pytest.mark.parametrize("spec", FORMATS)
def test_quantize_dequantize_every_format_equals_cpu(spec, cuda):
    fmt = QuantFormat.parse(spec)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 3
    ref, got = quantize(x, fmt), quantize(x.to(cuda), fmt)
    assert got.codes.is_cuda and got.scale.is_cuda
    torch.testing.assert_close(got.scale.cpu(), ref.scale, rtol=1e-6, atol=0)
    _close_codes(got.codes, ref.codes)
    torch.testing.assert_close(got.dequantize().cpu(), ref.dequantize(),
                               rtol=0, atol=float(ref.scale.max()) * 1.0001)


@pytest.mark.parametrize("kernel", ["auto", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_path_kernels_equal_cpu(kernel, dtype, cuda):
    """Row and column codes of the int8 path (Triton-compiled with auto, eager otherwise)."""
    fmt = QuantFormat.parse("int8:token")
    x = (torch.randn(96, 200, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    set_kernel("eager")
    try:
        rc, rs = quantize_rows(x, fmt)
        cc, cs = quantize_cols(x, fmt, transpose=True)
        set_kernel(kernel)
        grc, grs = quantize_rows(x.to(cuda), fmt)
        gcc, gcs = quantize_cols(x.to(cuda), fmt, transpose=True)
    finally:
        set_kernel(None)
    torch.testing.assert_close(grs.cpu(), rs, rtol=1e-6, atol=0)
    torch.testing.assert_close(gcs.cpu(), cs, rtol=1e-6, atol=0)
    _close_codes(grc, rc)
    _close_codes(gcc, cc)


@pytest.mark.parametrize("m,k,n", [(5, 12, 20), (16, 64, 8), (17, 8, 24), (300, 768, 3072)])
def test_int_mm_any_shape_equals_cpu_exactly(m, k, n, cuda):
    """cuBLASLt's rules (M > 16, K and N multiples of 8) met by zero padding: exact products."""
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    got = int_mm(a.to(cuda), b.to(cuda))
    assert got.shape == (m, n) and got.is_cuda
    assert torch.equal(got.cpu(), a.int() @ b.int())


@pytest.mark.parametrize("grad_gemms", ["weight", "both"])
def test_int8_linear_equals_cpu(grad_gemms, cuda):
    """Y, dX, dW and db of ``compute: int8`` on CUDA equal the CPU's to float rounding."""
    qc = LinearQuant(weight="int8:channel", activation="int8:token", grad="int8:token",
                     grad_gemms=grad_gemms, compute="int8")
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 64, 256, generator=g), torch.randn(384, 256, generator=g) * 0.05
    b, gy = torch.randn(384, generator=g), torch.randn(4, 64, 384, generator=g)
    outs = []
    for dev in ("cpu", cuda):
        xs, ws, bs = (t.to(dev).clone().requires_grad_() for t in (x, w, b))
        y = quantized_linear(xs, ws, qc, bias=bs)
        y.backward(gy.to(dev))
        outs.append([t.detach().cpu() for t in (y, xs.grad, ws.grad, bs.grad)])
    for name, ref, got in zip(("Y", "dX", "dW", "db"), *outs):
        err = float((got - ref).norm() / ref.norm())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
