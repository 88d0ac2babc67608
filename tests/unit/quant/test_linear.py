from types import SimpleNamespace

import pytest
import torch

from dsq.quant import (
    LinearQuant,
    QuantFormat,
    Reducers,
    fake_quantize,
    quantized_linear,
    sqnr_db,
)

CONFIGS = [
    LinearQuant("int8:channel", "int8:token", "int8:token"),
    LinearQuant("int4:tensor:asym", "int4:group8:asym", "int8:tensor"),
    LinearQuant("int8:group16", None, "int4:token:asym"),
    LinearQuant(None, "int8:tensor", None),
]


def operands(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 32, generator=g).to(dtype)
    w = (torch.randn(48, 32, generator=g) * 0.1).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    gy = torch.randn(2, 5, 48, generator=g).to(dtype)
    return x, w, b, gy


def run(qc, x, w, b, gy, **kw):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = quantized_linear(x, w, qc, **kw) + b
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("grad_gemms", ["weight", "input", "both"])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_matches_fp32_linear_on_dequantized_operands(cfg, grad_gemms):
    qc = LinearQuant(CONFIGS[cfg].weight, CONFIGS[cfg].activation, CONFIGS[cfg].grad, grad_gemms)
    x, w, b, gy = operands()
    y, dx, dw, db = run(qc, x, w, b, gy)

    # reference: nn.Linear holding Qw(W), fed Qa(X); backward with Qg(G) where the GEMM uses it
    x_hat = fake_quantize(x, qc.activation).reshape(-1, 32).requires_grad_()
    ref = torch.nn.Linear(32, 48)
    with torch.no_grad():
        ref.weight.copy_(fake_quantize(w, qc.weight))
        ref.bias.copy_(b)
    g2 = gy.reshape(-1, 48)
    g_hat = fake_quantize(g2, qc.grad)
    g_dx = g_hat if grad_gemms in ("input", "both") else g2
    g_dw = g_hat if grad_gemms in ("weight", "both") else g2
    y_ref = ref(x_hat)
    torch.autograd.backward(y_ref, g_dx, inputs=[x_hat])
    dw_ref = torch.autograd.grad(ref(x_hat), ref.weight, g_dw)[0]

    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.reshape(-1, 48), y_ref.detach(), **tol)
    torch.testing.assert_close(dx.reshape(-1, 32), x_hat.grad, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)
    torch.testing.assert_close(db, g2.sum(0), **tol)  # bias: full-precision G
    # the same by the formulas of the module docstring
    w_hat = fake_quantize(w, qc.weight)
    torch.testing.assert_close(dx.reshape(-1, 32), g_dx @ w_hat, **tol)
    torch.testing.assert_close(dw, g_dw.t() @ x_hat.detach(), **tol)

    # and a wrong answer would not pass: skipping a quantizer moves results far beyond tol
    if qc.grad is not None:
        if grad_gemms in ("input", "both"):
            assert (dx.reshape(-1, 32) - g2 @ w_hat).abs().max() > 1e-3
        if grad_gemms in ("weight", "both"):
            assert (dw - g2.t() @ x_hat.detach()).abs().max() > 1e-3
    if qc.activation is not None:
        assert (y.reshape(-1, 48) - (x.reshape(-1, 32) @ w_hat.t() + b)).abs().max() > 1e-3


def test_no_quantization_is_plain_linear():
    x, w, b, gy = operands()
    y, dx, dw, db = run(LinearQuant(), x, w, b, gy)
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    y_ref = torch.nn.functional.linear(*ref)
    y_ref.backward(gy)
    for got, want in zip((y, dx, dw, db), (y_ref.detach(), *(t.grad for t in ref))):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_saves_int8_codes_not_full_precision():
    qc = LinearQuant("int8:channel", "int8:token", None)
    x, w, _, _ = operands()
    x.requires_grad_()
    w.requires_grad_()
    y = quantized_linear(x, w, qc)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert [t.dtype for t in saved] == [torch.int8, torch.float32, torch.int8, torch.float32]
    assert saved[0].shape == (10, 32) and saved[1].shape == (10, 1)
    assert saved[2].shape == (48, 32) and saved[3].shape == (48, 1)


def test_saves_only_what_the_requested_gradients_need():
    qc = LinearQuant("int8:channel", "int8:token", "int8:token", "both")
    x, w, _, gy = operands()
    frozen = quantized_linear(x.requires_grad_(), w, qc)  # W frozen: dX only, X not saved
    assert [t.dtype for t in frozen.grad_fn.saved_tensors if t is not None] == \
        [torch.int8, torch.float32]
    (dx,) = torch.autograd.grad(frozen, x, gy)
    g_hat = fake_quantize(gy.reshape(-1, 48), qc.grad)
    torch.testing.assert_close(dx.reshape(-1, 32), g_hat @ fake_quantize(w, qc.weight))
    w.requires_grad_()
    y = quantized_linear(x.detach(), w, qc)  # input without grad: dW only
    (dw,) = torch.autograd.grad(y, w, gy)
    torch.testing.assert_close(dw, g_hat.t() @ fake_quantize(x, qc.activation).reshape(-1, 32))


def test_reduce_hooks_are_called_once_per_operand():
    calls = []

    def hook(name):
        return lambda t: calls.append(name) or t

    qc = LinearQuant("int8:tensor", "int8:token", "int8:token", "both")
    run(qc, *operands(), reducers=Reducers(x=hook("x"), w=hook("w"), g=hook("g")))
    assert sorted(calls) == ["g", "w", "x"]  # one Qg(G) shared by both backward GEMMs


def test_bf16_inputs():
    qc = LinearQuant("int8:channel", "int8:token", "int8:token", "both")
    x, w, b, gy = operands()
    ref = run(qc, x, w, b, gy)
    got = run(qc, *(t.bfloat16() for t in (x, w, b, gy)))
    for g, r in zip(got, ref):
        assert g.dtype == torch.bfloat16
        assert float(sqnr_db(r, g.float())) > 35  # bf16 rounding (~2^-9) on top of int8


def test_sqnr_capture():
    qc = LinearQuant("int8:channel", "int4:token", "int8:token")
    x, w, b, gy = operands()
    cap = {}
    run(qc, x, w, b, gy, capture=cap)
    assert set(cap) == {"weight", "activation", "grad"}
    from dsq.quant import power_db
    got = {k: float(power_db(v)) for k, v in cap.items()}
    assert got["weight"] == pytest.approx(float(sqnr_db(w, fake_quantize(w, qc.weight))), 1e-5)
    assert got["grad"] == pytest.approx(float(sqnr_db(gy, fake_quantize(
        gy.reshape(-1, 48), qc.grad).reshape(gy.shape))), 1e-5)
    assert got["activation"] < got["weight"] - 15  # 4 vs 8 bits: ~24 dB apart
    run(qc, x, w, b, gy, capture=cap)  # accumulates: same data twice, same ratio
    assert float(power_db(cap["weight"])) == pytest.approx(got["weight"], 1e-5)


def test_linear_quant_parsing_and_validation():
    qc = LinearQuant.from_config(SimpleNamespace(weight="int8:channel", activation=None,
                                                 grad={"bits": 8, "granularity": "token"},
                                                 grad_gemms="both"))
    assert qc.weight == QuantFormat(8, "channel") and qc.activation is None
    assert qc.grad == QuantFormat(8, "token") and qc.grad_gemms == "both" and qc.enabled
    assert not LinearQuant.from_config(SimpleNamespace(weight="none", activation="",
                                                       grad=None, grad_gemms="weight")).enabled
    from dsq.config import QuantConfig
    assert LinearQuant.from_config(QuantConfig(weight="int4:group32")).weight.group_size == 32
    with pytest.raises(ValueError, match="granularity 'token' does not apply to the weight"):
        LinearQuant(weight="int8:token")
    with pytest.raises(ValueError, match="granularity 'channel' does not apply to the grad"):
        LinearQuant(grad="int8:channel")
    with pytest.raises(ValueError, match="grad_gemms='all' is unknown"):
        LinearQuant(grad_gemms="all")


def test_check_finite_names_the_operand():
    qc = LinearQuant("int8:channel", "int8:token", "int8:token", check_finite=True)
    x, w, b, gy = operands()
    x[0, 1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="activation"):
        run(qc, x, w, b, gy)
    x, w, b, gy = operands()
    gy[1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="grad"):
        run(qc, x, w, b, gy)
    # without the check, the output row of the poisoned token is non-finite, never finite
    x, w, b, gy = operands()
    x[0, 1, 2] = float("nan")
    y, *_ = run(LinearQuant("int8:channel", "int8:token", None), x, w, b, gy)
    assert not bool(y[0, 1].isfinite().any()) and bool(y[1].isfinite().all())


def test_output_is_not_a_view():
    # megatron's vocab-parallel cross entropy edits the LM head's logits in place
    qc = LinearQuant("int8:channel", "int8:token", "int8:token")
    x, w, _, gy = operands()
    y = quantized_linear(x.requires_grad_(), w.requires_grad_(), qc)
    assert y._base is None and y.shape == (2, 5, 48)
    y.mul_(2.0)  # allowed on a non-view
    y.backward(gy)
    g_hat = fake_quantize(gy.reshape(-1, 48), qc.grad)
    torch.testing.assert_close(w.grad, 2 * g_hat.t() @ fake_quantize(x, qc.activation).reshape(
        -1, 32))
