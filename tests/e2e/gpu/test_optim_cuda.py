"""QAdamW on CUDA tensors against the same step on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from dsq.optim import QAdamW

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fmt", [dict(m_bits=8, v_bits=8), dict(m_bits=4, v_bits=8),
                                 dict(m_bits=8, v_bits=32),
                                 dict(m_format="fp8e4m3", v_format="fp8e5m2")],
                         ids=["m8v8", "m4v8", "m8", "fp8"])
def test_qadamw_steps_on_cuda_equal_cpu(fmt, cuda):
    """Codes (integer, or the bytes of fp8 ones) may differ by a rounding step at a boundary
    (CUDA's sqrt and division against the CPU's) in one element per thousand at most."""
    g = torch.Generator().manual_seed(0)
    p0 = [torch.randn(256, 512, generator=g) * 0.02, torch.randn(1000, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) * 1e-3 for p in p0] for _ in range(3)]
    result = []
    for dev in ("cpu", cuda):
        ps = [torch.nn.Parameter(p.clone().to(dev)) for p in p0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = QAdamW(ps, lr=1e-3, weight_decay=0.1, **fmt)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.to(dev)
            opt.step()
        state = opt.state[ps[0]]
        result.append(([p.detach().cpu() for p in ps],
                       {k: v.cpu() for k, v in state.items() if torch.is_tensor(v)}))
    (p_cpu, s_cpu), (p_gpu, s_gpu) = result
    for a, b in zip(p_cpu, p_gpu):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, p0[0] if a.shape == p0[0].shape else p0[1])
    assert s_cpu.keys() == s_gpu.keys()
    for k in s_cpu:
        if s_cpu[k].dtype in (torch.int8, torch.uint8):
            d = (s_cpu[k].int() - s_gpu[k].int()).abs()
            assert float((d > 0).float().mean()) <= 1e-3, k
        else:
            torch.testing.assert_close(s_gpu[k], s_cpu[k], rtol=1e-5, atol=1e-12)
