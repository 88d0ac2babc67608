"""Floating-point formats on CUDA: quantize-dequantize equals the CPU, and ``compute: fp8``
runs ``torch._scaled_mm`` (compute capability 8.9+) close to the simulated GEMMs, or falls back
to them exactly on older GPUs."""

from __future__ import annotations

import pytest
import torch

from dsq.quant import LinearQuant, QuantFormat, fake_quantize, quantized_linear
from dsq.quant.fp8_gemm import fp8_outlook

pytestmark = pytest.mark.gpu

SPECS = ["fp8e4m3:tensor", "fp8e4m3:token", "fp8e5m2:token", "fp8e4m3:block128", "mxfp8",
         "mxfp6", "mxfp4", "nvfp4", "nvfp4:2d"]


@pytest.mark.parametrize("spec", SPECS)
def test_fake_quantize_equals_cpu(spec, cuda):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 3
    f = QuantFormat.parse(spec)
    assert torch.equal(fake_quantize(x.to(cuda), f).cpu(), fake_quantize(x, f))


def _run(qc, x, w, gy):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = quantized_linear(xr, wr, qc)
    y.backward(gy)
    return y.detach().float(), xr.grad.float(), wr.grad.float()


@pytest.mark.parametrize("recipe", [("fp8e4m3:channel", "fp8e4m3:token", "fp8e4m3:token"),
                                    ("fp8e4m3:tensor", "fp8e4m3:tensor", "fp8e4m3:tensor")])
def test_compute_fp8_runs_scaled_mm_close_to_the_simulation(recipe, cuda):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g).to(cuda, torch.bfloat16)
    w = (torch.randn(768, 512, generator=g) * 0.05).to(cuda, torch.bfloat16)
    gy = torch.randn(256, 768, generator=g).to(cuda, torch.bfloat16)
    sim = _run(LinearQuant(*recipe, grad_gemms="both"), x, w, gy)
    calls = []
    real = torch._scaled_mm

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    torch._scaled_mm = counting
    try:
        fp8 = _run(LinearQuant(*recipe, grad_gemms="both", compute="fp8"), x, w, gy)
    finally:
        torch._scaled_mm = real
    runs, line = fp8_outlook(str(cuda))
    if not runs:  # older GPU: the simulated GEMMs, exactly, and the line says so
        assert "has no FP8 GEMMs" in line and not calls
        assert all(torch.equal(a, b) for a, b in zip(fp8, sim))
        return
    assert len(calls) == 3, calls  # Y, dX, dW
    for a, b in zip(fp8, sim):  # same codes and scales; reciprocal scales, other sum order
        assert float((a - b).norm() / b.norm()) < 1e-2
