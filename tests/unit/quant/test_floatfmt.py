"""Floating-point formats (dsq.quant.floatfmt): parsing, and quantize-dequantize against the
reference quantizers (torchao's MX and NVFP4 ones, the FP8 formula of torchao and Transformer
Engine), bit for bit."""

import warnings

import pytest
import torch

from dsq.quant import QuantFormat, fake_quantize, quantize, sqnr_db
from dsq.quant.floatfmt import FloatFormat

F = QuantFormat.parse
SPECS = ["fp8e4m3:tensor", "fp8e4m3:token", "fp8e4m3:channel", "fp8e5m2:token",
         "fp8e4m3:block128", "mxfp8", "mxfp8e5m2", "mxfp6", "mxfp4", "nvfp4"]


def _cases(dtype=torch.float32):
    """Normal, tiny-range, zero (whole tensor and single blocks) and extreme finite tensors."""
    g = torch.Generator().manual_seed(0)
    n = torch.randn(32, 256, generator=g)
    extreme = n.clone()
    extreme[0] *= 1e37  # near the fp32 maximum (finite after the scale)
    extreme[1] *= 1e-30  # next to a row of ordinary values
    extreme[2, :64] = 0.0  # zero blocks in a nonzero row
    extreme[3, ::7] *= 1e20  # outliers inside blocks
    out = {"normal": n * 3, "tiny": n * 1e-12, "tinier": n * 1e-30, "zero": torch.zeros(8, 256),
           "extreme": extreme}
    if dtype == torch.bfloat16:
        out["extreme"][0] /= 1e4  # bf16 holds the same range; keep within it after rounding
    return {k: v.to(dtype) for k, v in out.items()}


@pytest.mark.parametrize("spec", SPECS + ["nvfp4:2d", "nvfp4:stochastic", "fp8e5m2:block32:2d",
                                          "mxfp8e4m3", "fp8e4m3:tensor:stochastic"])
def test_strings_parse_and_round_trip(spec):
    f = F(spec)
    assert isinstance(f, FloatFormat) and f.is_float
    assert F(str(f)) == f
    assert str(F(spec.upper())) == str(f)


@pytest.mark.parametrize("spec, part", [
    ("fp8e4m3", "needs a scaling"), ("fp8e4m3:group32", "unknown or repeated part"),
    ("fp8e3m4:tensor", "not a floating-point format"), ("mxfp4:tensor", "scaling"),
    ("mxfp8:2d", "square"), ("fp8e4m3:token:2d", "square"), ("nvfp4:block32", "block"),
    ("fp8e4m3:block0", "positive block size"), ("fp8e4m3:tensor:tensor", "repeated")])
def test_bad_strings_name_the_part(spec, part):
    with pytest.raises(ValueError, match=part):
        F(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_fake_quantize_is_along_the_last_dimension(spec):
    """A 2-D tensor quantizes row by row (rows: tokens or output channels), as the integer
    formats do: a row scaled by 2^k quantizes to 2^k times its own quantization (powers of two
    commute with every scale), and moving a row's outlier changes only that row (or, per tensor,
    nothing is local)."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    f = F(spec)
    y = fake_quantize(x, f)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(sqnr_db(x, y)) > {4: 15, 6: 24, 8: 24}[f.bits]
    x2 = x.clone()
    x2[3] *= 64.0
    y2 = fake_quantize(x2, f)
    if f.scaling in ("tensor", "nvfp4"):  # (NVFP4's tensor scale moves with the outlier)
        assert not torch.equal(y2[0], y[0])
    else:
        rows = [i for i in range(16) if i != 3]
        assert torch.equal(y2[rows], y[rows])
        assert torch.equal(y2[3], y[3] * 64.0)
    # the last dimension, not the first: the transposed tensor quantizes differently
    if f.scaling != "tensor":
        assert not torch.equal(fake_quantize(x.t().contiguous(), f).t(), y)


@pytest.mark.parametrize("spec", ["fp8e4m3:tensor", "fp8e4m3:token", "fp8e5m2:token",
                                  "fp8e5m2:tensor", "fp8e4m3:block128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_equals_the_scaled_cast_formula(spec, dtype):
    """``(x s).clamp(-m, m).to(fp8).float() / s`` with ``s = m / amax`` in fp32, per tensor, row
    or 1 x 128 block."""
    f = F(spec)
    fp8 = torch.float8_e4m3fn if f.element == "e4m3" else torch.float8_e5m2
    m = torch.finfo(fp8).max
    for name, x in _cases(dtype).items():
        xf = x.float()
        if f.scaling == "tensor":
            amax = xf.abs().amax()
        elif f.scaling == "block":
            amax = xf.abs().unflatten(-1, (-1, 128)).amax(-1, keepdim=True)
            xf = xf.unflatten(-1, (-1, 128))
        else:
            amax = xf.abs().amax(-1, keepdim=True)
        s = m / amax
        ref = ((xf * s).clamp(-m, m).to(fp8).float() / s)
        ok = amax > 0  # all-zero rows: dsq gives zeros where the formula divides 0 by 0
        ref = torch.where(ok, ref, 0.0).reshape(x.shape).to(dtype)
        got = fake_quantize(x, f)
        assert torch.equal(got, ref), (name, (got - ref).abs().max())


def _torchao():
    pytest.importorskip("torchao", reason="torchao is the test extra (pip install -e .[test])")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats import mx_tensor, nvfp4_tensor
    return mx_tensor, nvfp4_tensor


@pytest.mark.parametrize("spec", ["mxfp8", "mxfp8e5m2", "mxfp6", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_equals_torchao_to_mx(spec, dtype):
    mx, _ = _torchao()
    elem = {"mxfp8": torch.float8_e4m3fn, "mxfp8e5m2": torch.float8_e5m2, "mxfp6": "fp6_e2m3",
            "mxfp4": torch.float4_e2m1fn_x2}[spec]
    for name, x in _cases(dtype).items():
        scale, data = mx.to_mx(x, elem, 32)
        ref = mx.to_dtype(data, scale, elem, 32, torch.float32).to(dtype)
        got = fake_quantize(x, F(spec))
        assert torch.equal(got, ref), (name, (got.float() - ref.float()).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_equals_torchao_nvfp4_quantize(dtype):
    """Two-level scales: the fp32 tensor scale of ``per_tensor_amax_to_scale``, E4M3 block scales
    of 16 elements, E2M1 elements; then NVFP4Tensor's dequantize."""
    _, nv = _torchao()
    for name, x in _cases(dtype).items():
        got = fake_quantize(x, F("nvfp4"))
        if name == "zero":  # torchao's tensor scale is 0 there, and its blocks NaN
            assert torch.equal(got, x)
            continue
        t = nv.per_tensor_amax_to_scale(x.abs().amax())
        scale, data = nv.nvfp4_quantize(x, 16, t)
        ref = nv.NVFP4Tensor(data, scale, 16, dtype, per_tensor_scale=t).dequantize(dtype)
        assert torch.equal(got, ref), (name, (got.float() - ref.float()).abs().max())


def test_square_blocks_are_transposable_and_blocks_may_be_short():
    """N x N tiles quantize W and W^T alike (a weight's two GEMMs share one quantization); a last
    dimension that is not a multiple of the block gets a short last block, as if zero-padded."""
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(2))
    for spec in ("fp8e4m3:block16:2d", "nvfp4:2d"):
        f = F(spec)
        assert torch.equal(fake_quantize(w.t().contiguous(), f).t(), fake_quantize(w, f))
    x = torch.randn(4, 40)
    padded = torch.nn.functional.pad(x, (0, 24))
    for spec in ("mxfp4", "nvfp4", "fp8e4m3:block32"):
        assert torch.equal(fake_quantize(x, F(spec)), fake_quantize(padded, F(spec))[:, :40])


def test_stochastic_rounding_is_unbiased_and_on_the_grid():
    x = torch.full((2000, 16), 0.7).mul_(torch.linspace(0.5, 1.0, 16))
    x[:, 0] = 6.0  # pins each block's scale
    f = F("nvfp4:stochastic")
    g = torch.Generator().manual_seed(3)
    ys = torch.stack([fake_quantize(x, f, generator=g) for _ in range(4)])
    nearest = fake_quantize(x, F("nvfp4"))
    assert float((nearest - x)[:, 1:].abs().mean()) > 0.05  # nearest is biased here
    assert float((ys.mean((0, 1)) - x[0]).abs().max()) < 0.01  # stochastic is not
    q = quantize(x, f, generator=g)
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float32)
    assert bool(torch.isin(q.codes.float().abs(), grid).all())


def test_non_finite_inputs_stay_non_finite():
    x = torch.randn(4, 64)
    x[1, 5] = float("inf")
    x[2, 9] = float("nan")
    for spec in SPECS:
        y = fake_quantize(x, F(spec))
        assert not bool(torch.isfinite(y[1:3]).all()), spec
        with pytest.raises(FloatingPointError, match="grad"):
            quantize(x, F(spec), check_finite=True, name="grad")


@pytest.mark.parametrize("spec, bits", [
    ("mxfp8", 8.25), ("mxfp6", 6.25), ("mxfp4", 4.25), ("nvfp4", 4.5 + 32 / 4096),
    ("nvfp4:2d", 4 + 8 / 256 + 32 / 4096), ("fp8e4m3:block128", 8 + 32 / 128),
    ("fp8e4m3:block128:2d", 8 + 32 / 128**2), ("fp8e4m3:token", 8 + 32 / 64),
    ("fp8e5m2:tensor", 8 + 32 / 4096), ("int8:channel", 8.5), ("int4:group32:asym", 6.0),
    ("int8:tensor", 8 + 32 / 4096)])
def test_bits_per_element_count_the_scales(spec, bits):
    assert F(spec).bits_per_element(cols=64, rows=64) == pytest.approx(bits)
