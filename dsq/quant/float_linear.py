"""The quantized linear layer with floating-point formats (:mod:`dsq.quant.floatfmt`): the
three GEMMs of :mod:`dsq.quant.linear`, each operand quantized along its GEMM's reduced dimension
as the plan says (:func:`dsq.quant.plan._float_plan`)::

    forward       Y  = Qa(X)   @ Qw(W)^T      X, W along in
    input grad    dX = Qg(G)   @ Qw'(W)       G along out, W's column copy along out
    weight grad   dW = Qg'(G)^T @ Qa'(X)      G's and X's column copies along tokens

A column copy quantizes the operand's transpose along its last dimension (per row, per block,
with its own scales) and is used transposed back; per-tensor formats and N x N tiles need none
(their row cast is the same numbers). The GEMMs run in floating point on the dequantized operands
(simulation), or, with ``compute: fp8`` on a GPU that has them, as ``torch._scaled_mm`` FP8 GEMMs
(:mod:`dsq.quant.fp8_gemm`), the same products up to the GEMM's accumulation order.

Saved for backward: X's column copy (or its forward cast, per tensor) as one-byte codes and
scales, and ``W`` itself where its column copy is made in backward (a parameter: no memory), or
its forward codes. Bias is added outside, in full precision. Straight-through: ``dQ(x)/dx = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsq.quant.floatfmt import FloatQTensor
from dsq.quant.functional import quantize, signal_noise
from dsq.quant.plan import Axis, Cast, GemmKind, LinearPlan, Saved
from dsq.quant.recipe import Reducers


@dataclass(frozen=True)
class _Run:
    plan: LinearPlan
    red: Reducers
    capture: dict[str, Tensor] | None
    x_shape: torch.Size
    w_dtype: torch.dtype
    saved_x: tuple | None
    """(format, dtype, shape, transposed) of the saved X codes, None: X saved as is."""
    saved_w: tuple | None


def _cast(t2: Tensor, cast: Cast, reduce, name: str, capture, cf: bool) -> FloatQTensor | None:
    """``t2`` (2-D) quantized as ``cast`` says: along its rows, or (column copy) its transpose
    along rows; recorded for SQNR under ``name`` (None: do not record)."""
    if cast.format is None:
        return None
    src = t2.t() if cast.axis is Axis.COLUMN else t2
    q = quantize(src, cast.format, reduce=reduce, check_finite=cf, name=cast.operand.value)
    if capture is not None and name:
        terms = signal_noise(src, q.dequantize(t2.dtype))
        capture[name] = capture[name] + terms if name in capture else terms
    return q


def _value(q: FloatQTensor | None, full: Tensor, cast: Cast, dtype) -> Tensor:
    """The operand as the GEMM uses it (the column copy transposed back)."""
    if q is None:
        return full.to(dtype)
    v = q.dequantize(dtype)
    return v.t() if cast.axis is Axis.COLUMN else v


def _pack(q: FloatQTensor | None, full: Tensor, cast: Cast):
    if q is None or cast.saved is not Saved.CODES:
        return (full, None), None
    return (q.codes, q.scale), (q.fmt, q.dtype, q.shape, cast.axis is Axis.COLUMN)


def _unpack(saved, meta) -> FloatQTensor | None:
    """The saved cast (None: the operand was saved as is)."""
    if meta is None:
        return None
    fmt, qdtype, shape, _ = meta
    return FloatQTensor(saved[0], saved[1], fmt, qdtype, shape)


def _mm(a: Tensor, b: Tensor, kind: GemmKind, qa, qb) -> Tensor:
    """``a @ b`` of the dequantized operands, or, for an FP8 GEMM where it runs, the product of
    their codes: ``qa``/``qb`` are ``(cast, transposed)`` with ``a = cast`` (or its transpose)."""
    if kind is GemmKind.FP8:
        from dsq.quant.fp8_gemm import scaled_mm

        y = scaled_mm(qa, qb, a.dtype)
        if y is not None:
            return y
    return a @ b


class FloatLinear(torch.autograd.Function):
    """Every operand of every GEMM cast along that GEMM's reduced dimension; bias outside."""

    @staticmethod
    def forward(ctx, x, w, plan: LinearPlan, red: Reducers, capture):
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        cf = plan.recipe.check_finite
        x2 = x.reshape(-1, x.shape[-1])
        qx = _cast(x2, plan.x_for_y, red.x, "activation", capture, cf)
        qw = _cast(w, plan.w_for_y, red.w, "weight", capture, cf)
        xv, wv = _value(qx, x2, plan.x_for_y, x.dtype), _value(qw, w, plan.w_for_y, x.dtype)
        y = _mm(xv, wv.t(), plan.x_for_y.kind, (qx, False), (qw, True)).view(
            *x.shape[:-1], w.shape[0])
        sx = sw = ((None, None), None)
        if needs_dw:
            xd = plan.x_for_dw
            qxd = qx if xd.axis is Axis.ROW else _cast(x2, xd, red.xt, None, None, cf)
            sx = _pack(qxd, x2, xd)
        if needs_dx:
            sw = _pack(qw, w, plan.w_for_dx)
        ctx.save_for_backward(*sx[0], *sw[0])
        ctx.run = _Run(plan, red, capture, x.shape, w.dtype, sx[1], sw[1])
        return y

    @staticmethod
    def backward(ctx, g):
        run, saved = ctx.run, ctx.saved_tensors
        plan, red, capture = run.plan, run.red, run.capture
        cf = plan.recipe.check_finite
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        g2 = g.reshape(-1, g.shape[-1])
        dx = dw = None
        recorded = False
        if needs_dx:  # dX[T, in] = G[T, out] @ W[out, in]
            gc, wc = plan.g_for_dx, plan.w_for_dx
            qg = _cast(g2, gc, red.g, "grad", capture, cf)
            recorded = qg is not None
            qw = _unpack(saved[2:], run.saved_w)
            if qw is None:  # W itself: its column copy (or W unquantized)
                qw = _cast(saved[2], wc, red.wt, None, None, cf)
            wv = _value(qw, saved[2], wc, g.dtype) if run.saved_w is None else qw.dequantize(
                g.dtype)
            dx = _mm(_value(qg, g2, gc, g.dtype), wv, wc.kind, (qg, False),
                     (qw, wc.axis is Axis.COLUMN)).view(run.x_shape)
        if needs_dw:  # dW[out, in] = G^T[out, T] @ X[T, in]
            gc, xc = plan.g_for_dw, plan.x_for_dw
            if not (recorded and gc.axis is Axis.ROW):  # else dX's Qg(G), one rounding
                qg = _cast(g2, gc, red.gt if gc.axis is Axis.COLUMN else red.g,
                           None if recorded else "grad", capture, cf)
            qx = _unpack(saved[:2], run.saved_x)
            xv = saved[0].to(g.dtype) if qx is None else _value(qx, None, xc, g.dtype)
            dw = _mm(_value(qg, g2, gc, g.dtype).t(), xv, xc.kind,
                     (qg, gc.axis is not Axis.COLUMN), (qx, xc.axis is Axis.COLUMN))
            dw = dw.to(run.w_dtype)
        return dx, dw, None, None, None
