"""The plan of casts of a quantized linear: its contents per recipe, and that the layer does
what it says (integer GEMMs run, what backward holds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsq.quant import LinearQuant, quantized_linear
from dsq.quant.gemm import counting_int_gemms
from dsq.quant.plan import (
    Axis,
    BackwardOperands,
    Compute,
    Gemm,
    GemmKind,
    GradGemms,
    Operand,
    Saved,
    describe_plan,
)

F, I8 = GemmKind.FLOAT, GemmKind.INT8
ROW, COL = Axis.ROW, Axis.COLUMN
NO, CODES, FULL = Saved.NO, Saved.CODES, Saved.FULL
ORDER = [(Operand.X, Gemm.FORWARD), (Operand.W, Gemm.FORWARD), (Operand.G, Gemm.INPUT_GRAD),
         (Operand.W, Gemm.INPUT_GRAD), (Operand.G, Gemm.WEIGHT_GRAD), (Operand.X, Gemm.WEIGHT_GRAD)]


def table(plan):
    """(format, axis, saved, packed, kind) of the six casts, in :data:`ORDER`."""
    assert [(c.operand, c.gemm) for c in plan.casts()] == ORDER
    return [(None if c.format is None else str(c.format), c.axis, c.saved, c.packed, c.kind)
            for c in plan.casts()]


W8A8G8 = LinearQuant("int8:channel", "int8:token", "int8:token", "both", compute="int8")


def test_w8a8g8_int8_casts_per_column_where_backward_reduces_over_rows():
    # in <= out: dW^T = X^T G, X is the left operand (transposed codes), G the packed right one
    plan = W8A8G8.plan((48, 32))
    assert plan.dw_left is Operand.X and not plan.fallbacks() and plan.any_int8
    assert table(plan) == [
        ("int8:token", ROW, NO, False, I8),        # X for Y: per token, not kept
        ("int8:channel", ROW, NO, False, I8),      # W for Y: per output channel, not kept
        ("int8:token", ROW, NO, False, I8),        # G for dX: the recipe's
        ("int8:channel", COL, FULL, True, I8),     # W for dX: per input column, from W
        ("int8:channel", COL, NO, True, I8),       # G for dW: per column, packed right side
        ("int8:channel", COL, CODES, False, I8),   # X for dW: per column, made in the forward
    ]
    assert "dX reduces over out" in plan.w_for_dx.reason
    # in > out: G is the left operand, X's per-column codes the packed right-hand side
    plan = W8A8G8.plan((24, 64))
    assert plan.dw_left is Operand.G
    assert (plan.g_for_dw.packed, plan.x_for_dw.packed) == (False, True)
    # without a shape (what the start-up line describes): nothing packed
    assert W8A8G8.plan().dw_left is None
    assert not (W8A8G8.plan().g_for_dw.packed or W8A8G8.plan().x_for_dw.packed)


def test_per_tensor_int8_reuses_the_forward_codes():
    plan = LinearQuant("int8:tensor", "int8:tensor", "int8:tensor", "both",
                       compute="int8").plan((48, 32))
    assert table(plan) == [
        ("int8:tensor", ROW, CODES, False, I8), ("int8:tensor", ROW, CODES, False, I8),
        ("int8:tensor", ROW, NO, False, I8), ("int8:tensor", ROW, CODES, False, I8),
        ("int8:tensor", ROW, NO, False, I8), ("int8:tensor", ROW, CODES, False, I8)]


def test_simulated_default_recipe():
    qc = LinearQuant("int8:channel", "int8:token", "int8:token")  # grad_gemms: weight
    plan = qc.plan((48, 32))
    assert table(plan) == [
        ("int8:token", ROW, CODES, False, F), ("int8:channel", ROW, CODES, False, F),
        (None, ROW, NO, False, F), ("int8:channel", ROW, CODES, False, F),
        ("int8:token", ROW, NO, False, F), ("int8:token", ROW, CODES, False, F)]
    assert {g: r for g, r in plan.fallbacks().items()} == {
        g: "quant.compute=simulate" for g in Gemm}
    assert not plan.any_int8


def test_full_backward_operands_and_unquantized_operands():
    full = dataclasses.replace(W8A8G8, backward_operands="full")
    plan = full.plan((48, 32))
    assert plan.kind(Gemm.FORWARD) is I8
    for c in (plan.w_for_dx, plan.x_for_dw):
        assert (c.format, c.saved, c.kind) == (None, FULL, F)
    assert plan.x_for_y.saved is NO and plan.w_for_y.saved is NO
    assert "backward_operands=full keeps X and W" in plan.reason(Gemm.WEIGHT_GRAD)
    # no weight format: W is held as it is; grad_gemms=weight leaves G alone for dX
    plan = LinearQuant(None, "int8:token", "int8:token", "weight", compute="int8").plan((8, 8))
    assert (plan.w_for_dx.format, plan.w_for_dx.saved) == (None, FULL)
    assert plan.g_for_dx.format is None and str(plan.g_for_dw.format) == "int8:channel"
    assert {g.value for g in plan.fallbacks()} == {"forward", "input_grad"}
    assert plan.kind(Gemm.WEIGHT_GRAD) is I8
    # grad_gemms=input: G is quantized for dX only, so no GEMM can be an integer one here
    plan = LinearQuant(None, "int8:token", "int8:token", "input", compute="int8").plan((8, 8))
    assert plan.g_for_dw.format is None and str(plan.g_for_dx.format) == "int8:token"
    assert not plan.any_int8


def test_options_are_enums_and_plans_frozen_and_shared():
    qc = LinearQuant("int8:channel", "int8:token", "int8:token", "both", compute="int8",
                     backward_operands="quantized")
    assert qc.grad_gemms is GradGemms.BOTH and qc.compute is Compute.INT8
    assert qc.backward_operands is BackwardOperands.QUANTIZED
    assert qc == W8A8G8 and qc.compute == "int8" and str(qc.grad_gemms) == "both"
    with pytest.raises(ValueError, match="grad_gemms='all' is unknown: use one of weight, "
                                         "input, both"):
        LinearQuant(grad_gemms="all")
    plan = qc.plan((48, 32))
    assert plan is W8A8G8.plan((96, 64))  # one plan per recipe and dW operand order
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.x_for_y = plan.w_for_y
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.x_for_y.axis = COL


RECIPES = [W8A8G8,
           LinearQuant("int8:tensor", "int8:tensor", "int8:tensor", "both", compute="int8"),
           LinearQuant("int8:channel", "int8:token", "int8:token", "weight", compute="int8"),
           LinearQuant("int8:channel", "int8:token", "int8:token"),
           LinearQuant("int4:channel:asym", "int8:group8", "int8:token", "both"),
           dataclasses.replace(W8A8G8, backward_operands="full"),
           LinearQuant(None, "int8:token", "int8:token", "input", compute="int8")]


@pytest.mark.parametrize("qc", RECIPES, ids=str)
@pytest.mark.parametrize("shape", [(48, 32), (24, 64)])
def test_the_layer_does_what_its_plan_says(qc, shape):
    """Integer GEMMs run where the plan says; backward holds W and X as the plan says (the
    full operand, or codes)."""
    plan = qc.plan(shape)
    x = torch.randn(3, 5, shape[1], requires_grad=True)
    w = torch.randn(*shape, requires_grad=True)
    held = []
    with counting_int_gemms() as calls:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t) or t,
                                                      lambda t: t):
            y = quantized_linear(x, w, qc)
        y.backward(torch.randn_like(y))
    assert len(calls) == sum(plan.kind(g) is I8 for g in Gemm)
    full_x = any(t.dtype == x.dtype and t.numel() == x.numel() for t in held)
    full_w = any(t is w for t in held)
    assert full_x == (plan.x_for_dw.saved is FULL)
    assert full_w == (plan.w_for_dx.saved is FULL)
    if plan.x_for_dw.saved is CODES:  # one byte per element (int4: a code per byte too)
        assert any(t.dtype == torch.int8 and t.numel() == x.numel() for t in held)


def test_describe_plan_names_each_gemm():
    msg, warn = describe_plan(RECIPES[2], ["fc1"])
    assert "(fc1)" in msg
    assert "integer GEMMs: forward Y = X W^T, weight grad dW = G^T X" in msg
    assert "input grad dX = G W because grad is not quantized for this GEMM" in msg
    assert not warn  # dX in floating point is the recipe's design (grad_gemms=weight)
    asym = LinearQuant("int8:channel", "int8:token:asym", "int8:token", "weight", compute="int8")
    msg, warn = describe_plan(asym)
    assert warn and "activation int8:token:asym is asymmetric" in msg
