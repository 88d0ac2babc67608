"""The fast paths of dsq.quant.floatfmt against the formulas they replaced, computed inline as
the oracle, bit for bit (fp32 bit patterns, so the sign of zero counts): the element-grid
rounding (nearest by a magic-number add, stochastic with the step read from the exponent bits,
the same ``torch.rand`` draws) and the amax read as ``max(amax, -amin)``."""

import pytest
import torch

from dsq.quant import QuantFormat, quantize
from dsq.quant.floatfmt import ELEMENTS, _amax, _round_grid


def _old_round_grid(v, fmt, generator):
    """The frexp/ldexp formula of the first implementation."""
    ebits, mbits, vmax, _ = ELEMENTS[fmt.element]
    emin = 2 - (1 << (ebits - 1))
    _, e = torch.frexp(v)
    step = torch.ldexp(torch.ones_like(v), (e - 1).clamp_min(emin) - mbits)
    u = v / step
    if fmt.rounding == "stochastic":
        r = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        u = torch.floor(u + r)
    else:
        u = torch.round(u)
    return (u * step).clamp_(-vmax, vmax)


def _values(vmax: float, mbits: int, emin: int) -> torch.Tensor:
    """Scaled operands as the quantizer makes them: within [-vmax, vmax], every magnitude from
    fp32 subnormals up, signed zeros, the grid's points and the exact midpoints between them
    (ties), and NaN."""
    g = torch.Generator().manual_seed(5)
    spread = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-40, 12, (4096,),
                                                                       generator=g).float())
    grid = torch.arange(0, 2 ** (mbits + 1) * (1 - emin + 20) + 1, dtype=torch.float32)
    step = 2.0 ** (emin - mbits)
    pts = torch.cat([grid * step * 0.5 * k for k in (1, 2, 4, 8, 16, 256)])
    x = torch.cat([spread, pts, -pts, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, vmax,
                                                   -vmax, float("nan")])])
    return x.clamp(-vmax, vmax)


def _bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m3", "e2m1"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_round_grid_equals_the_frexp_formula_bit_for_bit(element, rounding):
    from dsq.quant.floatfmt import FloatFormat

    fmt = FloatFormat(element=element, scaling="mx", rounding=rounding)
    ebits, mbits, vmax, _ = ELEMENTS[element]
    v = _values(vmax, mbits, 2 - (1 << (ebits - 1)))
    g_old, g_new = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ref = _old_round_grid(v.clone(), fmt, g_old)
    got = _round_grid(v.clone(), fmt, g_new)
    nan = torch.isnan(ref)
    assert torch.equal(nan, torch.isnan(got)) and int(nan.sum()) == 1
    assert torch.equal(_bits(got[~nan]), _bits(ref[~nan]))
    assert int((got[~nan] < 0).sum()) > 100  # negative values were rounded, not only zeros
    if rounding == "nearest":  # small negatives round to -0.0, as round() gives
        assert bool(torch.signbit(got[got == 0]).any())
    if rounding == "stochastic":  # the same draws: the generators end in the same state
        assert torch.equal(g_old.get_state(), g_new.get_state())


@pytest.mark.parametrize("spec", ["fp8e4m3:tensor", "fp8e4m3:token", "fp8e4m3:block16",
                                  "fp8e4m3:block16:2d", "mxfp4", "nvfp4", "nvfp4:2d"])
def test_amax_equals_abs_amax(spec):
    fmt = QuantFormat.parse(spec)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    x[0] = -x[0].abs()  # an all-negative row
    x[1, :16] = -0.0  # an all -0.0 block
    x[2, :32] = 0.0
    x[3, 7] = float("nan")
    xb = x.reshape(32, 4, 16) if fmt.block_size and not fmt.square else x
    if fmt.square:
        xb = x.reshape(2, 16, 4, 16)
    ref = xb.abs()
    ref = (ref.amax() if fmt.scaling == "tensor" else ref.amax(dim=(1, 3), keepdim=True)
           if fmt.square else ref.amax(dim=-1, keepdim=True))
    got = _amax(xb, fmt)
    assert got.shape == ref.shape
    assert torch.equal(_bits(torch.nan_to_num(got)), _bits(torch.nan_to_num(ref)))
    assert bool(torch.isnan(got).any())


def test_nvfp4_stochastic_codes_are_unchanged():
    """A whole quantize with stochastic rounding against the oracle on the same seed."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(7))
    fmt = QuantFormat.parse("nvfp4:stochastic")
    q = quantize(x, fmt, generator=torch.Generator().manual_seed(1))
    xb = x.reshape(64, 16, 16)
    amax = xb.abs().amax(-1, keepdim=True)
    t = (x.abs().amax() / (448.0 * 6.0)).clamp_min(2.0**-120)
    blk = ((amax / 6.0) / t).clamp(torch.finfo(torch.float8_e4m3fn).tiny, 448.0)
    blk = blk.to(torch.float8_e4m3fn).float()
    v = (xb * ((1.0 / t) / blk)).clamp(-6.0, 6.0)
    ref = _old_round_grid(v, fmt, torch.Generator().manual_seed(1))
    assert torch.equal(q.codes.view(torch.uint8), ref.reshape(64, 256).to(
        torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(q.scale, t * blk)
