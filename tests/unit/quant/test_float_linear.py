"""quantized_linear with floating-point formats: each operand of each GEMM quantized along that
GEMM's reduced dimension (W along in for Y, along out for dX; X and G along tokens for dW)."""

import pytest
import torch

from dsq.quant import LinearQuant, QuantFormat, fake_quantize, quantized_linear, signal_noise
from dsq.quant.plan import Axis, Compute, Gemm, GemmKind, describe_plan

# (weight, activation, grad): each family with its row/block/tensor scales
RECIPES = [
    ("fp8e4m3:tensor", "fp8e4m3:tensor", "fp8e5m2:tensor"),
    ("fp8e4m3:channel", "fp8e4m3:token", "fp8e5m2:token"),
    ("fp8e4m3:block32", "fp8e4m3:block32", "fp8e4m3:block32"),
    ("mxfp8", "mxfp8", "mxfp8e5m2"),
    ("mxfp6", "mxfp6", "mxfp6"),
    ("mxfp4", "mxfp4", "mxfp4"),
    ("nvfp4", "nvfp4", "nvfp4"),
    ("nvfp4:2d", "nvfp4", "nvfp4"),
]


def operands(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 64, generator=g).to(dtype)  # 80 tokens: a short last block of 32
    w = (torch.randn(96, 64, generator=g) * 0.1).to(dtype)
    gy = torch.randn(2, 40, 96, generator=g).to(dtype)
    return x, w, gy


def reference(x, w, gy, qc):
    """Straight-line: every operand quantized along its GEMM's reduced dimension, the column
    copies as the quantization of the transpose."""
    fw, fa, fg = qc.weight, qc.activation, qc.grad
    x2, g2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    y = fake_quantize(x2, fa) @ fake_quantize(w, fw).t()
    g_dx = fake_quantize(g2, fg) if qc.grad_gemms != "weight" else g2
    dx = g_dx @ fake_quantize(w.t(), fw).t()  # W along out
    g_dw = fake_quantize(g2.t(), fg).t() if qc.grad_gemms != "input" else g2  # G along tokens
    dw = g_dw.t() @ fake_quantize(x2.t(), fa).t()  # X along tokens
    return y.view(*x.shape[:-1], -1), dx.view(x.shape), dw


@pytest.mark.parametrize("grad_gemms", ["both", "weight"])
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: "-".join(r))
def test_gemms_equal_the_straight_line_reference(recipe, grad_gemms):
    qc = LinearQuant(*recipe, grad_gemms=grad_gemms)
    x, w, gy = operands()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = quantized_linear(xr, wr, qc)
    y.backward(gy)
    y_ref, dx_ref, dw_ref = reference(x, w, gy, qc)
    assert torch.equal(y.detach(), y_ref)
    assert torch.equal(xr.grad, dx_ref)
    assert torch.equal(wr.grad, dw_ref)
    # the column copies are other numbers than the row casts (else the test could not tell)
    if qc.weight.scaling not in ("tensor",) and not qc.weight.square:
        assert not torch.equal(fake_quantize(w.t(), qc.weight).t(), fake_quantize(w, qc.weight))


def test_bf16_and_bias():
    qc = LinearQuant("mxfp8", "mxfp8", "mxfp8", grad_gemms="both")
    x, w, gy = operands(torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    y = quantized_linear(x, w, qc, bias=b)
    y_ref = reference(x, w, gy, qc)[0] + b
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)


def test_plan_says_which_copy_each_gemm_uses():
    p = LinearQuant("mxfp8", "mxfp8", "mxfp8", grad_gemms="both").plan((96, 64))
    assert (p.x_for_y.axis, p.w_for_y.axis, p.g_for_dx.axis) == (Axis.ROW,) * 3
    assert (p.w_for_dx.axis, p.g_for_dw.axis, p.x_for_dw.axis) == (Axis.COLUMN,) * 3
    assert all(c.kind is GemmKind.FLOAT for c in p.casts())
    sq = LinearQuant("fp8e4m3:block128", "fp8e4m3:block128", None).plan((96, 64))
    assert str(sq.recipe.weight) == "fp8e4m3:block128:2d"  # weights in 128 x 128 tiles
    assert sq.w_for_dx.axis is Axis.ROW  # a tile quantization is its own transpose's
    fp8 = LinearQuant("fp8e4m3:channel", "fp8e4m3:token", "fp8e4m3:token", grad_gemms="both",
                      compute="fp8").plan()
    assert all(fp8.kind(g) is GemmKind.FP8 for g in Gemm)
    line, warn = describe_plan(LinearQuant("mxfp4", "mxfp4", None))
    assert "simulated (quantize-dequantize, float GEMMs): forward" in line and not warn
    line, warn = describe_plan(LinearQuant("fp8e4m3:channel", "mxfp8", None, compute="fp8"))
    assert "forward Y = X W^T because activation mxfp8 is not FP8 with tensor or row" in line
    assert warn


@pytest.mark.parametrize("kw, match", [
    (dict(weight="int8:channel", activation="mxfp8"), "mix integer and floating-point"),
    (dict(weight="mxfp8", compute="int8"), "compute=int8 runs integer formats"),
    (dict(weight="int8:channel", compute="fp8"), "compute=fp8 runs floating-point"),
    (dict(activation="fp8e4m3:channel"), "granularity 'channel' does not apply"),
])
def test_bad_recipes_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LinearQuant(**kw)


def test_sqnr_capture_of_float_formats():
    """The captured [signal, noise] of each operand is that of its first cast (X and W in the
    forward, G for dX), the terms the MLflow SQNR is made of."""
    qc = LinearQuant("nvfp4", "mxfp4", "fp8e4m3:token", grad_gemms="both")
    x, w, gy = operands()
    cap = {}
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    quantized_linear(xr, wr, qc, capture=cap).backward(gy)
    x2, g2 = x.reshape(-1, 64), gy.reshape(-1, 96)
    for name, t, f in (("activation", x2, qc.activation), ("weight", w, qc.weight),
                       ("grad", g2, qc.grad)):
        assert torch.equal(cap[name], signal_noise(t, fake_quantize(t, f))), name
    db = {k: float(10 * torch.log10(v[0] / v[1])) for k, v in cap.items()}
    assert 15 < db["activation"] < 22 and 15 < db["weight"] < 22 and 28 < db["grad"] < 35


def test_compute_fp8_on_cpu_is_the_simulation():
    qc = LinearQuant("fp8e4m3:channel", "fp8e4m3:token", "fp8e4m3:token", grad_gemms="both")
    qc8 = LinearQuant("fp8e4m3:channel", "fp8e4m3:token", "fp8e4m3:token", grad_gemms="both",
                      compute=Compute.FP8)
    x, w, gy = operands()
    outs = []
    for q in (qc, qc8):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = quantized_linear(xr, wr, q)
        y.backward(gy)
        outs.append((y.detach(), xr.grad, wr.grad))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert QuantFormat.parse("fp8e4m3:token").bits == 8


def test_config_refuses_blocks_that_straddle_tp_shards():
    """``dsq config``'s validation: on tiny at TP=2 the proj input is 64 wide per rank, so a
    128-element block would straddle it; 32-element MX blocks fit every shard."""
    from dsq.config import ConfigError, load_config
    from tests.conftest import ROOT

    base = [str(ROOT / "configs/tiny.yaml")]
    with pytest.raises(ConfigError, match=r"quant.weight=fp8e4m3:block128: its 128-element "
                                          r"blocks would straddle .*proj in 64 per rank"):
        load_config(base, ["quant.weight=fp8e4m3:block128", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"quant.grad=mxfp4: .*lm_head out 1040 per rank"):
        load_config(base, ["quant.grad=mxfp4", "parallel.tp=2", "quant.lm_head=true",
                           "model.vocab_size=2080"])
    cfg = load_config(base + [str(ROOT / "configs/recipes/formats/mxfp8.yaml")],
                      ["parallel.tp=2"])
    assert str(LinearQuant.from_config(cfg.quant).weight) == "mxfp8"


def test_startup_line_says_float_formats_are_simulated_on_cpu(dist_one, capfd):
    """apply_quantization's one start-up line for a float recipe: what each GEMM quantizes and
    that the CPU simulates it; SQNR of the model's float-quantized operands is collected."""
    from types import SimpleNamespace

    from dsq.config.schema import QuantConfig
    from dsq.models.gpt import build_gpt
    from dsq.models.quant_layers import apply_quantization, collect_sqnr, set_sqnr_capture

    cfg = SimpleNamespace(num_layers=1, hidden_size=64, num_heads=4, ffn_hidden_size=128,
                          seq_len=16, vocab_size=128, tie_embeddings=False, dropout=0.0,
                          init_std=0.02)
    model = build_gpt(cfg, "fp32", seed=0)
    names = apply_quantization(model, QuantConfig(weight="mxfp8", activation="mxfp8",
                                                  grad="nvfp4", grad_gemms="both"))
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert len(names) == 4 and line.startswith("dsq: quant.compute=simulate for w=mxfp8")
    assert line.endswith("on CPU every floating-point format is simulated (float GEMMs)")
    set_sqnr_capture(model, True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, torch.arange(16).expand(2, -1), None, labels=ids).float().mean().backward()
    sqnr = collect_sqnr(model)
    assert set(sqnr) == {f"{k}/{o}" for k in ("qkv", "proj", "fc1", "fc2")
                         for o in ("weight", "activation", "grad")}
    assert all(28 < sqnr[f"{k}/weight"] < 34 for k in ("qkv", "fc1")), sqnr  # MXFP8: ~31 dB
    assert all(15 < sqnr[f"{k}/grad"] < 24 for k in ("qkv", "fc1")), sqnr  # NVFP4: ~20 dB
