import math

import pytest
import torch

from dsq.quant import QuantFormat, dequantize, fake_quantize, quantize, sqnr_db

F = QuantFormat.parse
FORMATS = [f"int{b}:{g}{a}" for b in (2, 4, 8) for g in ("tensor", "channel", "group16")
           for a in ("", ":asym")]


def elem_scale(q):
    """The scale of every element of ``q.codes`` (undoing the group view)."""
    s = q.scale
    if q.fmt.granularity == "group":
        return s.expand(*q.codes.shape[:-1], -1, q.fmt.group_size).flatten(-2)
    return s.expand_as(q.codes)


@pytest.fixture
def gauss():
    return torch.randn(64, 128, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", FORMATS)
def test_round_to_nearest_error_is_at_most_half_a_step(spec, gauss):
    x = gauss * 3 + (0.5 if "asym" in spec else 0.0)
    q = quantize(x, F(spec))
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= q.fmt.qmin and int(q.codes.max()) <= q.fmt.qmax
    err = (x - dequantize(q)).abs()
    bound = elem_scale(q) / 2
    assert bool((err <= bound * (1 + 1e-5)).all()), float((err / bound).max())
    # the bound is tight: some element is close to it (else the test could not fail)
    assert float((err / bound).max()) > 0.9


@pytest.mark.parametrize("spec", FORMATS + ["int8:token", "int4:token:asym"])
def test_quantization_is_idempotent(spec, gauss):
    fmt = F(spec)
    q1 = quantize(gauss, fmt)
    q2 = quantize(dequantize(q1), fmt)
    assert torch.equal(q1.codes, q2.codes)
    torch.testing.assert_close(q2.scale, q1.scale, rtol=1e-6, atol=0)
    assert torch.equal(dequantize(q1), dequantize(q2)) or \
        torch.allclose(dequantize(q1), dequantize(q2), rtol=1e-6, atol=0)


def test_sqnr_of_gaussian_weights_matches_uniform_noise_model():
    # noise of round-to-nearest is ~U(-s/2, s/2): power s^2/12 with s = max|w_row| / Qp. For
    # rows of 512 Gaussians max|w| lies in about [3, 4] sigma, so
    # SQNR = 10 log10(12 Qp^2 sigma^2 / max^2) is in [40.8, 43.3] dB at 8 bits and
    # [15.7, 18.1] dB at 4 bits, and the two differ by 20 log10(127 / 7) = 25.2 dB.
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    db = {s: float(sqnr_db(w, fake_quantize(w, F(s)))) for s in
          ("int8:channel", "int4:channel", "int8:tensor", "int4:tensor", "int8:group32")}
    assert 40.5 <= db["int8:channel"] <= 43.5, db
    assert 15.5 <= db["int4:channel"] <= 18.5, db
    assert db["int8:channel"] - db["int4:channel"] == pytest.approx(25.2, abs=0.4)
    # per-tensor: one max over 131k samples (~4.5 sigma) costs ~1-3 dB; small groups gain
    assert db["int8:channel"] - 3.5 < db["int8:tensor"] < db["int8:channel"]
    assert db["int8:group32"] > db["int8:channel"] + 1.5


def test_asymmetric_gains_one_bit_on_one_signed_data():
    # on U[0, 1): symmetric s = 1/127 wastes the negative half, asymmetric s = 1/255:
    # 20 log10(255 / 127) = 6.05 dB
    x = torch.rand(128, 256, generator=torch.Generator().manual_seed(2))
    gain = float(sqnr_db(x, fake_quantize(x, F("int8:token:asym")))
                 - sqnr_db(x, fake_quantize(x, F("int8:token"))))
    assert gain == pytest.approx(6.05, abs=0.3)


@pytest.mark.parametrize("spec", FORMATS + ["int8:token:stochastic"])
def test_all_zero_gives_exact_zeros(spec):
    x = torch.zeros(4, 32)
    q = quantize(x, F(spec))
    assert bool(torch.isfinite(q.scale).all()) and float(q.scale.min()) > 0
    assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("spec", ["int8:tensor", "int8:token", "int4:token:asym",
                                  "int8:tensor:asym", "int8:group1", "int2:channel:asym"])
@pytest.mark.parametrize("value", [3.0, -1e-30, 7e30, 1e-35, 1e-40])
def test_single_element(spec, value):
    # exact to fp32 rounding, or to the scale floor (finfo.tiny) for values near it
    x = torch.tensor([[value]])
    tiny = torch.finfo(torch.float32).tiny
    torch.testing.assert_close(fake_quantize(x, F(spec)), x, rtol=1e-6, atol=tiny)


def test_tiny_gradients_are_not_flushed():
    # the study's 1e-9 range floor would zero these; the scale floor is finfo.tiny
    g = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 1e-12
    assert float(sqnr_db(g, fake_quantize(g, F("int8:token")))) > 38


@pytest.mark.parametrize("spec", ["int8:token", "int8:token:asym", "int4:group8"])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_rows_never_become_finite(spec, bad):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    x[1, 5] = bad
    x_hat = fake_quantize(x, F(spec))
    group = slice(0, 8) if "group" in spec else slice(None)
    assert not bool(x_hat[1, group].isfinite().any())  # the poisoned row (group): all nan/inf
    clean = [0, 2]
    torch.testing.assert_close(x_hat[clean], fake_quantize(x[clean], F(spec)))
    with pytest.raises(FloatingPointError, match="activation: .* inf or nan .*1 of"):
        quantize(x, F(spec), check_finite=True, name="activation")


def test_non_finite_per_tensor_poisons_everything():
    x = torch.ones(4, 4)
    x[0, 0] = float("nan")
    assert bool(fake_quantize(x, F("int8:tensor")).isnan().all())
    quantize(torch.ones(4, 4), F("int8:tensor"), check_finite=True)  # finite: no error


def test_stochastic_rounding_is_unbiased():
    # 0.3 / s = 38.1 with s = 1 / 127: codes 39 w.p. p = 0.1, else 38; E[x_hat] = 0.3
    n = 200_000
    x = torch.full((n,), 0.3)
    x[0] = 1.0  # sets the scale
    q = quantize(x, F("int8:tensor:stochastic"), generator=torch.Generator().manual_seed(5))
    codes, x_hat = q.codes[1:], dequantize(q)[1:].double()
    assert set(codes.unique().tolist()) == {38, 39}
    s, p = 1 / 127, 0.3 * 127 - 38
    se = s * math.sqrt(p * (1 - p) / (n - 1))
    assert abs(float(x_hat.mean()) - 0.3) < 5 * se
    assert abs(float((codes == 39).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    # round-to-nearest is biased by 0.1 s = 150 standard errors: the test can tell
    nearest = dequantize(quantize(x, F("int8:tensor")))[1:].double()
    assert abs(float(nearest.mean()) - 0.3) > 100 * se


def test_stochastic_rounding_error_is_below_one_step():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    q = quantize(x, F("int4:token:stochastic"))
    assert bool(((x - dequantize(q)).abs() < elem_scale(q) * (1 + 1e-5)).all())


@pytest.mark.parametrize("spec", ["int8:tensor", "int8:token", "int4:token:asym",
                                  "int8:tensor:asym"])
def test_reduce_hook_makes_shards_quantize_like_the_whole(spec):
    # a row-sharded tensor's per-token / per-tensor statistics need the max over both shards
    fmt = F(spec)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(7)) * 2 + 0.3
    x[2, 40] = 9.0  # the row maximum sits in the second shard
    shards = x.chunk(2, dim=-1)
    stats = []
    quantize(shards[0], fmt, reduce=lambda t: stats.append(t.clone()) or t)
    quantize(shards[1], fmt, reduce=lambda t: stats.append(t.clone()) or t)
    other = {0: stats[1], 1: stats[0]}
    calls = []

    def all_reduce_max(i):
        def hook(t):
            calls.append(t.shape)
            return t.copy_(torch.maximum(t, other[i]))
        return hook

    got = [quantize(s, fmt, reduce=all_reduce_max(i)) for i, s in enumerate(shards)]
    want = quantize(x, fmt)
    assert torch.equal(torch.cat([q.codes for q in got], -1), want.codes)
    assert torch.equal(got[0].scale, want.scale) and torch.equal(got[1].scale, want.scale)
    assert len(calls) == 2
    # without the reduction the shards disagree with the whole
    alone = torch.cat([quantize(s, fmt).codes for s in shards], -1)
    assert not torch.equal(alone, want.codes)


def test_bf16_input_uses_fp32_scales():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    q = quantize(x.bfloat16(), F("int8:token"))
    assert q.scale.dtype == torch.float32 and dequantize(q).dtype == torch.bfloat16
    ref = fake_quantize(x.bfloat16().float(), F("int8:token"))
    torch.testing.assert_close(dequantize(q).float(), ref.bfloat16().float(), rtol=0, atol=0)


def test_group_size_must_divide_last_dim():
    with pytest.raises(ValueError, match="not a multiple of the group size 16"):
        quantize(torch.ones(2, 40), F("int8:group16"))


def test_sqnr_db():
    x = torch.ones(10)
    assert float(sqnr_db(x, x * 1.1)) == pytest.approx(20.0, abs=1e-4)
    assert float(sqnr_db(x, x)) == math.inf
