"""dsq with the study's semantics against a transcription of the authors' quantized linear.

The transcription below is written from the formulas of the authors' code, not imported: it is
the reference the study's recipes (``configs/recipes/study/``) must equal bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dsq.config import load_config
from dsq.quant import LinearQuant, QuantFormat, quantized_linear

ROOT = Path(__file__).resolve().parents[3]


def authors_fake_quant(x: torch.Tensor, bits: int, per_row: bool, minimum_range: float):
    """The authors' symmetric linear quantizer, quantize then dequantize.

    Transcribed from chandar-lab/EfficientLLMs, ``src/quantization/quantizer.py``,
    ``Normal.update_step_size`` / ``linear_quantize`` / ``linear_dequantize`` (symmetric,
    ``per-tensor`` or ``per-column``, which reduces over the last dimension: one scale per
    output channel of ``W[out, in]`` and per token of the 2-D ``X[tokens, in]`` and
    ``G[tokens, out]`` their autograd Function quantizes)::

        scale     = input.abs().max(dim=-1, keepdim=True)[0].clamp_(min=minimum_range)
        step_size = scale / Qp
        x         = torch.clamp(input / step_size - zero_point, Qn, Qp).round()
        return (x + zero_point) * step_size          # zero_point = 0
    """
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if per_row:
        scale = x.abs().max(dim=-1, keepdim=True)[0].clamp_(min=minimum_range)
    else:
        scale = x.abs().max().clamp_(min=minimum_range)
    step = scale / qp
    zero_point = torch.tensor(0.0)
    q = torch.clamp(x / step - zero_point, qn, qp).round()
    return (q + zero_point) * step


class AuthorsLinear(torch.autograd.Function):
    """Transcribed from chandar-lab/EfficientLLMs, ``src/quantization/quantizer.py``,
    ``_qauntize_global`` (with ``Tim_flag`` False, as in every config of theirs)::

        forward:  X = X_3D.view(-1, in); out = Qa(X) @ Qw(W).t() + bias
                  ctx.save_for_backward = X, W           # full precision
        backward: G = grad_output.reshape(-1, out)
                  grad_X = G @ W;  grad_W = Qg(G).t() @ X;  grad_bias = G.sum(dim=0)
    """

    @staticmethod
    def forward(ctx, x3, w, b, bits_w, bits_a, bits_g, floor_wa, floor_g):
        x = x3.view(-1, x3.size(-1))
        wq = authors_fake_quant(w, bits_w, True, floor_wa)
        xq = authors_fake_quant(x, bits_a, True, floor_wa)
        ctx.save_for_backward(x, w)
        ctx.bits_g, ctx.floor_g = bits_g, floor_g
        out = xq.matmul(wq.t())
        out += b.unsqueeze(0).expand_as(out)
        return out.view(*x3.size()[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        g = grad_output.reshape(-1, grad_output.size(-1))
        x, w = ctx.saved_tensors
        gq = authors_fake_quant(g, ctx.bits_g, True, ctx.floor_g)
        grad_x = torch.matmul(g, w.to(g.dtype)).view(*grad_output.size()[:-1], -1)
        grad_w = torch.matmul(gq.t(), x.to(gq.dtype))
        grad_b = g.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _study_qc(bits: int, compute: str = "simulate") -> LinearQuant:
    """The recipe of configs/recipes/study/w{b}a{b}g{b}.yaml, read from the file."""
    cfg = load_config([str(ROOT / "configs/tiny.yaml"),
                       str(ROOT / f"configs/recipes/study/w{bits}a{bits}g{bits}.yaml")],
                      world_size=1)
    return dataclasses.replace(LinearQuant.from_config(cfg.quant), compute=compute)


def _tensors(seed: int, tiny_rows: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 64, generator=g)
    w = torch.randn(48, 64, generator=g) * 0.05
    b = torch.randn(48, generator=g) * 0.1
    gy = torch.randn(2, 24, 48, generator=g) * 1e-3
    if tiny_rows:  # rows whose range lies below the floors: 1e-5 for W and A, 1e-9 for G
        w[3] = torch.randn(64, generator=g) * 1e-7
        w[7] = 0.0
        x[0, 5] = torch.randn(64, generator=g) * 3e-6
        x[1, 2] = 0.0
        gy[0, 4] = torch.randn(48, generator=g) * 1e-11
        gy[1, 9] = torch.randn(48, generator=g) * 4e-10
    return x, w, b, gy


def _run_dsq(qc, x, w, b, gy):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = quantized_linear(x, w, qc, bias=b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad


def _run_authors(bits, x, w, b, gy):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = AuthorsLinear.apply(x, w, b, bits, bits, bits, 1e-5, 1e-9)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tiny_rows", [False, True], ids=["normal", "below-floor"])
def test_study_recipe_equals_the_authors_linear_bit_for_bit(bits, tiny_rows):
    qc = _study_qc(bits)
    assert qc.backward_operands == "full" and qc.grad_gemms == "weight"
    assert (qc.weight.min_range, qc.activation.min_range, qc.grad.min_range) == (1e-5, 1e-5, 1e-9)
    x, w, b, gy = _tensors(bits * 10 + tiny_rows, tiny_rows)
    ours, theirs = _run_dsq(qc, x, w, b, gy), _run_authors(bits, x, w, b, gy)
    for name, a, t in zip(("Y", "dX", "dW", "db"), ours, theirs):
        assert torch.equal(a, t), f"{name}: max |diff| {(a - t).abs().max().item():.3e}"
    if tiny_rows:  # the floors bite: the tiny rows of W are quantized on the 1e-5 grid
        step = 1e-5 / (2 ** (bits - 1) - 1)
        wq = QuantFormat.parse(f"int{bits}:channel:min=1e-5")
        from dsq.quant import fake_quantize

        row = fake_quantize(w[3:4], wq)
        assert torch.all((row / step - torch.round(row / step)).abs() < 1e-3)
        assert (row / step).abs().max() <= 8  # a 1e-7 row gets a few codes of the 1e-5 grid


def test_without_floors_tiny_rows_keep_their_resolution():
    """dsq's default (no min_range) quantizes a 1e-8 row on its own scale; the floor flushes it."""
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 64, generator=g) * 1e-8
    from dsq.quant import fake_quantize, sqnr_db

    assert sqnr_db(row, fake_quantize(row, QuantFormat.parse("int8:channel"))) > 35
    floored = fake_quantize(row, QuantFormat.parse("int8:channel:min=1e-5"))
    assert sqnr_db(row, floored) < 3 and (floored == 0).float().mean() > 0.5


@pytest.mark.parametrize("bits, lo, hi", [(8, 1e-3, 0.03), (4, 0.03, 0.5)])
def test_quantized_backward_operands_differ_from_the_authors_backward(bits, lo, hi):
    """Same forward; dsq's default backward (quantized W and X) moves dX and dW by an amount
    that grows as bits shrink."""
    full = _study_qc(bits)
    quant = dataclasses.replace(full, backward_operands="quantized")
    x, w, b, gy = _tensors(3, False)
    a, q = _run_dsq(full, x, w, b, gy), _run_dsq(quant, x, w, b, gy)
    assert torch.equal(a[0], q[0]) and torch.equal(a[3], q[3])
    for i in (1, 2):
        rel = ((a[i] - q[i]).norm() / a[i].norm()).item()
        assert lo < rel < hi, rel


def test_full_backward_under_int8_runs_float_backward_gemms_equal_to_simulate():
    from dsq.quant.plan import describe_plan

    qc = _study_qc(8, compute="int8")
    nomin = dataclasses.replace(
        qc, weight=dataclasses.replace(qc.weight, min_range=None),
        activation=dataclasses.replace(qc.activation, min_range=None),
        grad=dataclasses.replace(qc.grad, min_range=None))
    msg, warn = describe_plan(nomin)
    assert not warn and "integer GEMMs: forward Y = X W^T;" in msg
    assert "backward_operands=full keeps X and W in full precision" in msg
    # the backward GEMMs are the simulation's: same dX, dW for the same G
    x, w, b, gy = _tensors(5, False)
    i8 = _run_dsq(nomin, x, w, b, gy)
    sim = _run_dsq(dataclasses.replace(nomin, compute="simulate"), x, w, b, gy)
    for i in (1, 2, 3):
        assert torch.equal(i8[i], sim[i])
    # with the floors every GEMM is simulated, and says why
    msg, warn = describe_plan(qc)
    assert warn and "integer GEMMs: none" in msg and "range floor" in msg


def test_saved_for_backward_bytes_of_both_backward_operands():
    """quantized: int8 codes of X and W (+ scales); full: X and W in their dtype."""
    x = torch.randn(4, 256, 128, requires_grad=True)
    w = torch.randn(64, 128, requires_grad=True)
    sizes = {}
    for mode in ("quantized", "full"):
        qc = LinearQuant(weight="int8:channel", activation="int8:token", grad="int8:token",
                         backward_operands=mode)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            quantized_linear(x, w, qc)
        sizes[mode] = sum(saved)
    n_x, n_w = 4 * 256 * 128, 64 * 128
    assert sizes["quantized"] == n_x + 4 * 1024 + n_w + 4 * 64
    assert sizes["full"] == 4 * (n_x + n_w)


def test_study_recipes_load_and_bad_values_name_the_key():
    from dsq.config import ConfigError

    cfg = load_config([str(ROOT / "configs/small.yaml"), str(ROOT / "configs/recipes/w8a8g8.yaml")],
                      ["quant.backward_operands=full"], world_size=1)
    assert LinearQuant.from_config(cfg.quant).full_backward
    base = [str(ROOT / "configs/tiny.yaml")]
    for name in ("w8a8", "w4a4", "w8a8g8", "w4a4g4", "m8v8"):
        c = load_config(base + [str(ROOT / f"configs/recipes/study/{name}.yaml")], world_size=1)
        assert c.tracking.recipe == f"study/{name}"
        if name == "m8v8":
            assert (c.optim.block_size, c.optim.v_signed) == ("row", True)
        else:
            assert c.quant.backward_operands == "full" and c.quant.lm_head
    with pytest.raises(ConfigError, match="quant.backward_operands='fully' is unknown: use "
                                          "quantized or full"):
        load_config(base, ["quant.backward_operands=fully"], world_size=1)
    with pytest.raises(ConfigError, match="optim.v_signed=true applies to a linearly quantized v"):
        load_config(base + [str(ROOT / "configs/recipes/optim/m8.yaml")], ["optim.v_signed=true"],
                    world_size=1)
