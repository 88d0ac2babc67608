"""The quantized linear layer: three GEMMs, each operand cast as its plan says.

With ``X[T, in]`` (any leading shape, flattened to ``T`` tokens), ``W[out, in]`` and the output
gradient ``G = dL/dY [T, out]``::

    forward       Y[T, out]  = Qa(X) @ Qw(W)^T       reduces over in
    input grad    dX[T, in]  = Qg'(G) @ Qw'(W)       reduces over out
    weight grad   dW[out, in] = Qg''(G)^T @ Qa''(X)  reduces over T

Each ``Q`` is one :class:`~dsq.quant.plan.Cast` of the recipe's plan
(:meth:`LinearQuant.plan <dsq.quant.recipe.LinearQuant.plan>`, :mod:`dsq.quant.plan`): a fake
quantizer (quantize then dequantize, :mod:`dsq.quant.functional`) of the recipe's format, or
the identity. ``grad_gemms`` chooses which backward GEMM sees the quantized gradient:
``weight`` (the study's default, ``Qg'' = Qg``, ``Qg' = id``), ``input`` (the reverse) or
``both`` (one ``Qg(G)`` shared by the two). The quantizers are straight-through: ``dX`` and
``dW`` are the exact gradients of the quantized forward with ``dQ(x)/dx = 1``, so ``dW`` sees
the same ``Qa(X)`` the forward used (``Qw' = Qw``, ``Qa'' = Qa``). Bias is added in full
precision.

Two autograd Functions run a plan: :class:`_SimulatedLinear` when every GEMM is a float GEMM on
dequantized operands (``compute: simulate``, or ``int8`` where no GEMM can be integer), and
:class:`_IntegerLinear` when at least one is an integer GEMM (its other GEMMs run as the
simulated ones do).

``backward_operands: full`` is the study's backward instead (its code saves the full-precision
``X`` and ``W``): ``dX = Qg'(G) @ W`` and ``dW = Qg''(G)^T @ X``. The forward is the same; the
gradients are those of the full-precision layer evaluated at the quantized forward's ``G``, and
``X`` is held for backward in its own dtype (2-4 bytes per element, not 1).

Scales are computed in fp32 from the current tensors (fp32 or bf16 inputs); with
``compute: simulate`` (the default) the GEMMs run in the input dtype on the dequantized operands:
simulated quantization, as in the study. ``compute: int8`` runs each GEMM whose operands allow
it as an integer GEMM (int8 x int8 -> int32, then one rescale): the section below says which,
and where its backward GEMMs need other scale granularities than the recipe's.

Saved for backward (``backward_operands: quantized``, the default): the int8 codes and scales
of ``Qa(X)`` and ``Qw(W)`` rather than the full-precision operands, and only those the requested gradients need (``X`` only for ``dW``,
``W`` only for ``dX``). The activation held per linear drops from 2-4 bytes to about 1 byte per
element; ``W``'s codes cost 1 byte per parameter but spare a second quantization (and, under
tensor parallelism, a second statistics all-reduce) in backward, and keep ``dX`` consistent
with the forward even with stochastic rounding. An unquantized operand is saved as is.

Integer GEMMs (``compute: int8``)
---------------------------------
A scaled integer GEMM ``C = (sa qa) (sb qb)`` is ``C[m, n] = sa[m] sb[n] sum_k qa[m, k] qb[k, n]``
only when no scale varies along the reduced dimension ``k``: one ``torch._int_mm`` and one
rescale (:mod:`dsq.quant.gemm`). With ``X[tokens, in]``, ``W[out, in]``, ``G[tokens, out]``:

=========== ===================================== ======= ==================================
GEMM        integer form                          reduces scales
=========== ===================================== ======= ==================================
forward     ``Y  = sx sw (qx @ qw^T)``            in      X per token/tensor, W per
                                                          channel/tensor: the recipe's own
input grad  ``dX = sg sw' (qg @ qw')``            out     G per token/tensor (the recipe's),
                                                          W per *input column* (or tensor)
weight grad ``dW = sg'' sx'' (qg''^T @ qx'')``    tokens  G per *output column*, X per
                                                          *input column* (or both per tensor)
=========== ===================================== ======= ==================================

So a per-channel ``W`` is quantized a second time for the input gradient, with one scale per
input column, from the full-precision weight (same bits and rounding; the parameter itself is
saved for backward, which costs no memory); per-token ``X`` and ``G`` are quantized a second time
for the weight gradient with one scale per feature (column), ``X``'s in the forward (its codes
are what is saved for backward, in place of the per-token ones) and ``G``'s in backward. These
backward GEMMs therefore differ from ``compute: simulate`` in exactly that granularity: the
simulation of the same granularities (``Qw`` per input column in ``dX``; ``Qg``, ``Qa`` per
column in ``dW``) is what int8 equals to float rounding (tests/unit/quant/test_int8.py). With
per-tensor formats nothing is requantized and int8 equals ``simulate`` itself; the forward
always equals it (same codes, same scales).

A GEMM runs as an integer GEMM only when both of its operands are quantized, symmetric (no zero
point), per tensor/channel/token (not per group), at most 8 bits (always, here). Stochastic
rounding is allowed (its codes are codes). Otherwise that GEMM is simulated exactly as
``compute: simulate`` does, and the plan (:class:`~dsq.quant.plan.LinearPlan`) says which and why, e.g.
the input gradient under
``grad_gemms: weight``: the recipe leaves ``G`` in full precision there, and it is not quantized
for speed's sake. :func:`~dsq.quant.plan.describe_plan` is the start-up line naming what
falls back.

Saved for backward by integer GEMMs: for ``dW``, the int8 codes of ``X`` (per column for an integer ``dW``, the
recipe's per-token codes for a simulated one) and their scales; for ``dX``, ``W`` itself when it
is requantized per input column in backward, otherwise ``W``'s int8 codes: about one byte per
activation element instead of two (bf16) or four (fp32). The ``dW`` GEMM takes the smaller of
``X``/``G`` as its row-major left operand (``dW^T = X''^T G''`` when ``in <= out``, else
``dW = G''^T X''``), so that operand's per-column codes are written transposed (``[features,
tokens]``) by the quantization kernel itself; the other keeps its layout.

Passes: the forward reads ``X`` twice (statistics, then both its per-token and per-column codes)
and ``W`` twice; backward reads ``G`` twice for its per-token codes, per-column codes and the
bias gradient (column sums), ``W`` twice for its per-column codes. On CPUs with AMX-INT8 each
GEMM rescales its output tiles in cache (:mod:`dsq.quant.cpu_gemm`); elsewhere its
int32 result is read once by a rescale (+ bias) pass. See :mod:`dsq.quant.fused` and
:mod:`dsq.quant.gemm` for the kernels.

Tensor parallelism: :class:`~dsq.quant.recipe.Reducers` ``x``, ``w``, ``g`` max-reduce the
statistics of ``X``, ``W`` and ``G`` across the ranks sharing a scale (see
:func:`dsq.quant.functional.quantize`), ``xt``, ``wt``, ``gt`` those of the per-column
quantizations (a per-column statistic reduces over the rows: ``W``'s over ``out``, sharded in a
column-parallel layer; ``X``'s and ``G``'s over tokens); the caller
(``dsq.models.quant_layers``) decides which operands need them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsq.quant.format import QuantFormat
from dsq.quant.functional import QTensor, Reduce, quantize, signal_noise, signal_noise_q
from dsq.quant.fused import can_pack, quantize_cols, quantize_rows, quantize_rows_cols
from dsq.quant.gemm import scaled_mm
from dsq.quant.plan import Axis, Cast, Compute, GemmKind, LinearPlan, Operand, Saved, int8_reason
from dsq.quant.recipe import NO_REDUCERS, LinearQuant, Reducers

_NOTHING = (None, None, None)


@dataclass(frozen=True)
class _Run:
    """What backward needs besides the saved tensors (``ctx.run``)."""

    plan: LinearPlan
    red: Reducers
    capture: dict[str, Tensor] | None
    x_shape: torch.Size
    w_dtype: torch.dtype
    x_packed: bool = False
    """X's per-column codes are dW's packed right-hand operand."""


def _tscale(s: Tensor | None) -> Tensor | None:
    """A per-row scale ``[R, 1]`` as a per-column one ``[1, R]`` and back (0-dim stays)."""
    return s.t() if s is not None and s.dim() == 2 else s


def _record(capture, name: str, x: Tensor, q: QTensor, simulate: bool) -> None:
    """Accumulate ``[signal, noise]`` of ``x`` and its quantization: against the values the
    simulated GEMM uses (``x``'s dtype), or against fp32 dequantized codes for integer GEMMs."""
    if capture is not None:
        terms = signal_noise(x, q.dequantize(x.dtype)) if simulate else signal_noise_q(x, q)
        capture[name] = capture[name] + terms if name in capture else terms


def _quant(x: Tensor, fmt: QuantFormat | None, reduce: Reduce | None, plan: LinearPlan,
           name: str, capture) -> QTensor | None:
    """``x`` cast to ``fmt`` along its rows (None: not quantized), recorded for SQNR.

    Under ``compute: int8``, integer-GEMM formats go through
    :func:`dsq.quant.fused.quantize_rows` (eager: the very
    :func:`~dsq.quant.functional.quantize` of the simulation; fused: the same codes), others
    through ``quantize`` (their GEMM is simulated)."""
    if fmt is None:
        return None
    qc = plan.recipe
    if qc.compute is Compute.INT8 and int8_reason(fmt, name) is None:
        codes, scale = quantize_rows(x, fmt, reduce, check_finite=qc.check_finite, name=name)
        q = QTensor(codes, scale, None, fmt, x.dtype)
    else:
        q = quantize(x, fmt, reduce=reduce, check_finite=qc.check_finite, name=name)
    _record(capture, name, x, q, qc.compute is Compute.SIMULATE)
    return q


def _saved(cast: Cast, q: QTensor | None, full: Tensor) -> tuple:
    """What the forward saves for ``cast``: the forward's codes, or the full operand."""
    if cast.saved is Saved.CODES and q is not None:
        return q.codes, q.scale, q.zero_point
    return full, None, None


def _unpack(saved, fmt: QuantFormat | None, dtype: torch.dtype) -> Tensor:
    codes, scale, zero_point = saved
    if fmt is None:
        return codes.to(dtype)
    return QTensor(codes, scale, zero_point, fmt, dtype).dequantize()


def _value(q: QTensor | None, full: Tensor, dtype: torch.dtype) -> Tensor:
    return full.to(dtype) if q is None else q.dequantize(dtype)


def _float_dx(g2: Tensor, qg: QTensor | None, saved_w, cast: Cast) -> Tensor:
    """``dX = Qg'(G) @ W'`` in floating point (``qg`` None: ``G`` as it is)."""
    return _value(qg, g2, g2.dtype) @ _unpack(saved_w, cast.format, g2.dtype)


def _float_dw(g2: Tensor, qg: QTensor | None, saved_x, cast: Cast, w_dtype) -> Tensor:
    """``dW = Qg''(G)^T @ X''`` in floating point (``qg`` None: ``G`` as it is)."""
    return (_value(qg, g2, g2.dtype).t() @ _unpack(saved_x, cast.format, g2.dtype)).to(w_dtype)


class _SimulatedLinear(torch.autograd.Function):
    """Every GEMM a float GEMM on dequantized operands; bias is added outside."""

    @staticmethod
    def forward(ctx, x, w, plan: LinearPlan, red: Reducers, capture):
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        x2 = x.reshape(-1, x.shape[-1])
        qx = _quant(x2, plan.x_for_y.format, red.x, plan, "activation", capture)
        qw = _quant(w, plan.w_for_y.format, red.w, plan, "weight", capture)
        y = torch.matmul(_value(qx, x2, x.dtype).view(x.shape), _value(qw, w, x.dtype).t())
        ctx.save_for_backward(*(_saved(plan.x_for_dw, qx, x2) if needs_dw else _NOTHING),
                              *(_saved(plan.w_for_dx, qw, w) if needs_dx else _NOTHING))
        ctx.run = _Run(plan, red, capture, x.shape, w.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        run, saved = ctx.run, ctx.saved_tensors
        plan = run.plan
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        g2 = g.reshape(-1, g.shape[-1])
        q_dx = needs_dx and plan.g_for_dx.format is not None
        q_dw = needs_dw and plan.g_for_dw.format is not None
        qg = (_quant(g2, plan.recipe.grad, run.red.g, plan, "grad", run.capture)
              if q_dx or q_dw else None)
        dx = dw = None
        if needs_dx:
            dx = _float_dx(g2, qg if q_dx else None, saved[3:], plan.w_for_dx).view(run.x_shape)
        if needs_dw:
            dw = _float_dw(g2, qg if q_dw else None, saved[:3], plan.x_for_dw, run.w_dtype)
        return dx, dw, None, None, None


class _IntegerLinear(torch.autograd.Function):
    """At least one integer GEMM (:mod:`dsq.quant.gemm`); the others as :class:`_SimulatedLinear`
    runs them. Bias goes into the forward GEMM's epilogue, its gradient into G's pass."""

    @staticmethod
    def forward(ctx, x, w, bias, plan: LinearPlan, red: Reducers, capture):
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        cf = plan.recipe.check_finite
        x2 = x.reshape(-1, x.shape[-1])
        xy, xd = plan.x_for_y, plan.x_for_dw
        saved_x = saved_w = _NOTHING
        x_packed = False
        if needs_dw and xd.axis is Axis.COLUMN:
            # X per token for Y and per column for dW, in one pass; only the latter is saved
            # (as dW's packed B operand when X is the right-hand side and the driver runs)
            x_packed = xd.packed and can_pack(x2, xy.format, cf)
            rc, rs, cc, cs, _ = quantize_rows_cols(
                x2, xy.format, reduce=red.x, col_reduce=red.xt,
                transpose=plan.dw_left is Operand.X, pack=x_packed, check_finite=cf,
                name="activation")
            qx = QTensor(rc, rs, None, xy.format, x.dtype)
            _record(capture, "activation", x2, qx, False)
            saved_x = (cc, cs, None)
        else:
            qx = _quant(x2, xy.format, red.x, plan, "activation", capture)
            if needs_dw:
                saved_x = _saved(xd, qx, x2)
        qw = _quant(w, plan.w_for_y.format, red.w, plan, "weight", capture)
        # a fresh output of x's leading shape, not a view: callers such as megatron's
        # vocab-parallel cross entropy modify it in place
        if xy.kind is GemmKind.INT8:
            y = scaled_mm(qx.codes, qw.codes.t(), qx.scale, _tscale(qw.scale), bias, x.dtype,
                          out_shape=(*x.shape[:-1], w.shape[0]))
        else:
            y = torch.matmul(_value(qx, x2, x.dtype).view(x.shape), _value(qw, w, x.dtype).t())
            if bias is not None:
                y = y + bias
        if needs_dx:
            saved_w = _saved(plan.w_for_dx, qw, w)  # W itself when requantized in backward
        ctx.save_for_backward(*saved_x, *saved_w)
        ctx.run = _Run(plan, red, capture, x.shape, w.dtype, x_packed)
        return y

    @staticmethod
    def backward(ctx, g):
        run, saved = ctx.run, ctx.saved_tensors
        plan, red, capture = run.plan, run.red, run.capture
        gx, wd, gd, xd = plan.g_for_dx, plan.w_for_dx, plan.g_for_dw, plan.x_for_dw
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        g2 = g.reshape(-1, g.shape[-1])
        cf, fg = plan.recipe.check_finite, plan.recipe.grad
        q_dx = needs_dx and gx.format is not None
        q_dw = needs_dw and gd.format is not None
        # G's casts: the recipe's Qg(G) (per token/tensor) for dX and row-wise dW casts, per
        # column for an integer dW; with the bias gradient, in one pass where possible
        want_rows = q_dx or (q_dw and gd.axis is Axis.ROW)
        want_cols = needs_dw and gd.axis is Axis.COLUMN
        qg = g_cols = db = None
        # G as dW's right-hand side: packed for the driver, unless its codes are recorded
        g_packed = (want_cols and gd.packed and (want_rows or capture is None)
                    and can_pack(g2, fg, cf))
        g_left = plan.dw_left is Operand.G
        if want_cols:
            rc, rs, cc, cs, colsum = quantize_rows_cols(
                g2, fg, rows=want_rows, col_sum=needs_db, reduce=red.g, col_reduce=red.gt,
                transpose=g_left, pack=g_packed, check_finite=cf, name="grad")
            g_cols = (cc, cs)
            if want_rows:
                qg = QTensor(rc, rs, None, fg, g.dtype)
                _record(capture, "grad", g2, qg, False)
            else:  # G's only quantization: record it
                _record(capture, "grad", g2,
                        QTensor(cc.t() if g_left else cc, cs, None, fg, g.dtype), False)
            if needs_db:
                db = colsum.to(g.dtype)
        elif want_rows:
            qg = _quant(g2, fg, red.g, plan, "grad", capture)
        if needs_db and db is None:
            db = g2.sum(0)

        dx = dw = None
        if needs_dx and wd.kind is GemmKind.INT8:
            w_codes, w_scale, _ = saved[3:]
            w_shape = None
            if wd.axis is Axis.COLUMN:  # per input column, from W itself
                if wd.packed and can_pack(w_codes, wd.format, cf):
                    w_shape = tuple(w_codes.shape)
                w_codes, w_scale = quantize_cols(w_codes, wd.format, red.wt,
                                                 pack=w_shape is not None, check_finite=cf,
                                                 name="weight")
            else:
                w_scale = _tscale(w_scale)
            dx = scaled_mm(qg.codes, w_codes, qg.scale, w_scale, None, g.dtype, b_shape=w_shape)
        elif needs_dx:
            dx = _float_dx(g2, qg if q_dx else None, saved[3:], wd)
        if dx is not None:
            dx = dx.view(run.x_shape)
        if needs_dw and xd.kind is GemmKind.INT8:
            x_codes, x_scale, _ = saved[:3]
            g_codes, g_scale = g_cols or (qg.codes, qg.scale)  # per tensor: dX's Qg(G)
            # per-column codes of the left operand come transposed ([features, tok]);
            # per-tensor ones are the forward's [tok, features] codes: transposed here
            if plan.dw_left is Operand.X:  # dW^T[in, out] = X''^T[in, tok] @ G''[tok, out]
                xT = x_codes if xd.axis is Axis.COLUMN else x_codes.t().contiguous()
                dw = scaled_mm(xT, g_codes, _tscale(x_scale), g_scale, None, run.w_dtype,
                               transpose=True, b_shape=tuple(g2.shape) if g_packed else None)
            else:  # dW[out, in] = G''^T[out, tok] @ X''[tok, in]
                gT = g_codes if gd.axis is Axis.COLUMN else g_codes.t().contiguous()
                dw = scaled_mm(gT, x_codes, _tscale(g_scale), x_scale, None, run.w_dtype,
                               b_shape=(g2.shape[0], run.x_shape[-1]) if run.x_packed else None)
        elif needs_dw:
            dw = _float_dw(g2, qg if q_dw else None, saved[:3], xd, run.w_dtype)
        return dx, dw, db, None, None, None


def quantized_linear(
    x: Tensor,
    weight: Tensor,
    qconfig: LinearQuant,
    *,
    bias: Tensor | None = None,
    reducers: Reducers | None = None,
    capture: dict[str, Tensor] | None = None,
) -> Tensor:
    """``Qa(x) @ Qw(weight)^T (+ bias)`` with the quantized backward described in the module
    docstring; each operand cast as ``qconfig.plan(weight.shape)`` says.

    ``bias`` is added in full precision (by an integer forward GEMM in its epilogue).
    ``reducers`` max-reduce the statistics of each operand across tensor-parallel ranks
    (:class:`~dsq.quant.recipe.Reducers`). ``capture``, when a dict, accumulates
    ``[signal, noise]`` power sums of every quantized operand under the keys ``weight``,
    ``activation`` and ``grad`` (see :func:`dsq.quant.functional.signal_noise`); None (default)
    costs nothing.
    """
    plan = qconfig.plan(weight.shape)
    red = reducers or NO_REDUCERS
    if qconfig.is_float:  # floating-point formats: dsq.quant.float_linear
        from dsq.quant.float_linear import FloatLinear

        y = FloatLinear.apply(x, weight, plan, red, capture)
        return y if bias is None else y + bias
    if not plan.any_int8:  # bias outside: its gradient is autograd's own reduction
        y = _SimulatedLinear.apply(x, weight, plan, red, capture)
        return y if bias is None else y + bias
    return _IntegerLinear.apply(x, weight, bias, plan, red, capture)
