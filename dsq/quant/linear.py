"""The quantized linear layer: one autograd Function, three GEMMs, each with its quantizers.

With ``X[tokens, in]`` (any leading shape, flattened), ``W[out, in]`` and the output gradient
``G = dL/dY [tokens, out]``::

    forward       Y  = Qa(X)  @ Qw(W)^T          [tokens, out]
    input grad    dX = Qg'(G) @ Qw(W)            [tokens, in]
    weight grad   dW = Qg''(G)^T @ Qa(X)         [out, in]

``Qa``, ``Qw``, ``Qg`` are fake quantizers (quantize then dequantize, :mod:`dsq.quant.functional`)
with the formats of :class:`~dsq.quant.recipe.LinearQuant`; a format of None is the identity. ``grad_gemms``
chooses which backward GEMM sees the quantized gradient: ``weight`` (the study's default,
``Qg''= Qg``, ``Qg' = id``), ``input`` (the reverse) or ``both`` (one ``Qg(G)`` shared by the two).
The quantizers are straight-through: ``dX`` and ``dW`` are the exact gradients of the quantized
forward with ``dQ(x)/dx = 1``, so ``dW`` sees the same ``Qa(X)`` the forward used. Bias is
added in full precision.

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
column in ``dW``) is what int8 equals to float rounding (tests/quant/test_int8.py). With
per-tensor formats nothing is requantized and int8 equals ``simulate`` itself; the forward
always equals it (same codes, same scales).

A GEMM runs as an integer GEMM only when both of its operands are quantized, symmetric (no zero
point), per tensor/channel/token (not per group), at most 8 bits (always, here). Stochastic
rounding is allowed (its codes are codes). Otherwise that GEMM is simulated exactly as
``compute: simulate`` does, and :func:`~dsq.quant.recipe.gemm_plan` says which and why, e.g.
the input gradient under
``grad_gemms: weight``: the recipe leaves ``G`` in full precision there, and it is not quantized
for speed's sake. :func:`~dsq.quant.recipe.describe_plan` is the start-up line naming what
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

import dataclasses

import torch
from torch import Tensor

from dsq.quant.format import QuantFormat
from dsq.quant.functional import QTensor, Reduce, quantize, signal_noise, signal_noise_q
from dsq.quant.fused import can_pack, quantize_cols, quantize_rows, quantize_rows_cols
from dsq.quant.gemm import scaled_mm
from dsq.quant.recipe import NO_REDUCERS, GemmPlan, LinearQuant, Reducers, gemm_plan, int8_reason


def _col_fmt(fmt: QuantFormat) -> QuantFormat:
    """The per-column version of a per-row format (per-tensor stays)."""
    return fmt if fmt.granularity == "tensor" else dataclasses.replace(fmt, granularity="channel")


def _tscale(s: Tensor | None) -> Tensor | None:
    """A per-row scale ``[R, 1]`` as a per-column one ``[1, R]`` and back (0-dim stays)."""
    return s.t() if s is not None and s.dim() == 2 else s


def _record(capture, name: str, x: Tensor, q: QTensor, simulate: bool) -> None:
    """Accumulate ``[signal, noise]`` of ``x`` and its quantization: against the values the
    simulated GEMM uses (``x``'s dtype), or against fp32 dequantized codes for integer GEMMs."""
    if capture is not None:
        terms = signal_noise(x, q.dequantize(x.dtype)) if simulate else signal_noise_q(x, q)
        capture[name] = capture[name] + terms if name in capture else terms


def _quant(x: Tensor, fmt: QuantFormat | None, reduce: Reduce | None, qc: LinearQuant,
           name: str, capture) -> QTensor | None:
    """The recipe's quantization of ``x`` (None: not quantized), recorded for SQNR.

    Under ``compute: int8``, integer-GEMM formats go through
    :func:`dsq.quant.fused.quantize_rows` (eager: the very
    :func:`~dsq.quant.functional.quantize` of the simulation; fused: the same codes), others
    through ``quantize`` (their GEMM is simulated)."""
    if fmt is None:
        return None
    if qc.compute == "int8" and int8_reason(fmt, name) is None:
        codes, scale = quantize_rows(x, fmt, reduce, check_finite=qc.check_finite, name=name)
        q = QTensor(codes, scale, None, fmt, x.dtype)
    else:
        q = quantize(x, fmt, reduce=reduce, check_finite=qc.check_finite, name=name)
    _record(capture, name, x, q, qc.compute == "simulate")
    return q


def _pack(q: QTensor | None, full: Tensor) -> tuple:
    return (full, None, None) if q is None else (q.codes, q.scale, q.zero_point)


def _unpack(saved, fmt: QuantFormat | None, dtype: torch.dtype) -> Tensor:
    codes, scale, zero_point = saved
    if fmt is None:
        return codes.to(dtype)
    return QTensor(codes, scale, zero_point, fmt, dtype).dequantize()


def _value(q: QTensor | None, full: Tensor, dtype: torch.dtype) -> Tensor:
    return full.to(dtype) if q is None else q.dequantize(dtype)


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, qc: LinearQuant, plan: GemmPlan, red: Reducers, capture):
        rx, rw, rxt = red.x, red.w, red.xt
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        x2 = x.reshape(-1, x.shape[-1])
        n_in, n_out = w.shape[1], w.shape[0]
        cf = qc.check_finite
        # dW's GEMM takes the smaller of X[tok, in] and G[tok, out] as its row-major left
        # operand: that one's per-column codes are written transposed ([features, tok])
        xt = n_in <= n_out
        saved_x = saved_w = (None, None, None)
        a = qc.activation
        x_packed = False
        if needs_dw and plan.weight_grad is None and a.granularity != "tensor":
            # X per token for Y and per column for dW, in one pass; only the latter is saved
            # (as dW's packed B operand when X is the right-hand side and the driver runs)
            x_packed = not xt and can_pack(x2, a, cf)
            rc, rs, cc, cs, _ = quantize_rows_cols(x2, a, reduce=rx, col_reduce=rxt,
                                                   transpose=xt, pack=x_packed,
                                                   check_finite=cf, name="activation")
            qx = QTensor(rc, rs, None, a, x.dtype)
            _record(capture, "activation", x2, qx, False)
            saved_x = (cc, cs, None)
        else:
            qx = _quant(x2, a, rx, qc, "activation", capture)
            if needs_dw:
                if plan.weight_grad is not None:
                    saved_x = (x2, None, None) if qc.full_backward else _pack(qx, x2)
                else:  # per tensor: the forward's codes
                    saved_x = (qx.codes, qx.scale, None)
        qw = _quant(w, qc.weight, rw, qc, "weight", capture)
        # a fresh output of x's leading shape, not a view: callers such as megatron's
        # vocab-parallel cross entropy modify it in place
        if plan.forward is None:
            y = scaled_mm(qx.codes, qw.codes.t(), qx.scale, _tscale(qw.scale), bias, x.dtype,
                          out_shape=(*x.shape[:-1], n_out))
        else:
            y = torch.matmul(_value(qx, x2, x.dtype).view(x.shape), _value(qw, w, x.dtype).t())
            if bias is not None:
                y = y + bias
        if needs_dx:
            if qc.full_backward:
                saved_w = (w, None, None)
            elif plan.input_grad is not None or qc.weight.granularity == "tensor":
                saved_w = _pack(qw, w)
            else:
                saved_w = (w, None, None)  # requantized per input column in backward
        ctx.save_for_backward(*saved_x, *saved_w)
        ctx.meta = (qc, plan, red, capture, x.shape, w.dtype, xt, x_packed)
        return y

    @staticmethod
    def backward(ctx, g):
        qc, plan, red, capture, x_shape, w_dtype, xt, x_packed = ctx.meta
        rg, rwt, rgt = red.g, red.wt, red.gt
        saved = ctx.saved_tensors
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        g2 = g.reshape(-1, g.shape[-1])
        cf, fg = qc.check_finite, qc.grad
        q_dx = fg is not None and qc.grad_gemms in ("input", "both") and needs_dx
        q_dw = fg is not None and qc.grad_gemms in ("weight", "both") and needs_dw
        int8_dw = needs_dw and plan.weight_grad is None
        # G's quantizations: the recipe's Qg(G) (per token/tensor) for dX and simulated GEMMs,
        # per column for an integer dW; with the bias gradient, in one pass where possible
        want_rows = q_dx or (q_dw and (not int8_dw or fg.granularity == "tensor"))
        want_cols = int8_dw and fg.granularity != "tensor"
        qg = g_cols = db = None
        # G as dW's right-hand side: packed for the driver, unless its codes are recorded
        g_packed = (want_cols and xt and (want_rows or capture is None)
                    and can_pack(g2, fg, cf))
        if want_cols:
            rc, rs, cc, cs, colsum = quantize_rows_cols(
                g2, fg, rows=want_rows, col_sum=needs_db, reduce=rg, col_reduce=rgt,
                transpose=not xt, pack=g_packed, check_finite=cf, name="grad")
            g_cols = (cc, cs)
            if want_rows:
                qg = QTensor(rc, rs, None, fg, g.dtype)
                _record(capture, "grad", g2, qg, False)
            else:  # G's only quantization: record it
                _record(capture, "grad", g2,
                        QTensor(cc if xt else cc.t(), cs, None, fg, g.dtype), False)
            if needs_db:
                db = colsum.to(g.dtype)
        elif want_rows:
            qg = _quant(g2, fg, rg, qc, "grad", capture)
        if needs_db and db is None:
            db = g2.sum(0)

        dx = dw = None
        if needs_dx:
            if plan.input_grad is None:
                w_codes, w_scale, _ = saved[3:]
                w_shape = None
                if w_codes.dtype != torch.int8:  # per input column, from W itself
                    fw = _col_fmt(qc.weight)
                    if can_pack(w_codes, fw, cf):
                        w_shape = tuple(w_codes.shape)
                    w_codes, w_scale = quantize_cols(w_codes, fw, rwt, pack=w_shape is not None,
                                                     check_finite=cf, name="weight")
                else:
                    w_scale = _tscale(w_scale)
                dx = scaled_mm(qg.codes, w_codes, qg.scale, w_scale, None, g.dtype,
                               b_shape=w_shape)
            else:
                gd = _value(qg, g2, g.dtype) if q_dx else g2
                dx = gd @ _unpack(saved[3:], None if qc.full_backward else qc.weight, g.dtype)
            dx = dx.view(x_shape)
        if needs_dw:
            if int8_dw:
                x_codes, x_scale, _ = saved[:3]
                if g_cols is None:  # per tensor: the same Qg(G) as the input gradient
                    g_cols = (qg.codes, qg.scale)
                g_codes, g_scale = g_cols
                # per-column codes of the left operand come transposed ([features, tok]);
                # per-tensor ones are the forward's [tok, features] codes: transposed here
                if xt:  # dW^T[in, out] = X''^T[in, tok] @ G''[tok, out]
                    xT = (x_codes if qc.activation.granularity != "tensor"
                          else x_codes.t().contiguous())
                    dw = scaled_mm(xT, g_codes, _tscale(x_scale), g_scale, None,
                                   w_dtype, transpose=True,
                                   b_shape=tuple(g2.shape) if g_packed else None)
                else:  # dW[out, in] = G''^T[out, tok] @ X''[tok, in]
                    gT = g_codes if fg.granularity != "tensor" else g_codes.t().contiguous()
                    dw = scaled_mm(gT, x_codes, _tscale(g_scale), x_scale, None, w_dtype,
                                   b_shape=(g2.shape[0], x_shape[-1]) if x_packed else None)
            else:
                gw = _value(qg, g2, g.dtype) if q_dw else g2
                dw = (gw.t() @ _unpack(saved[:3], None if qc.full_backward else qc.activation,
                                       g.dtype)).to(w_dtype)
        return dx, dw, db, None, None, None, None


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
    docstring; each GEMM runs as :func:`~dsq.quant.recipe.gemm_plan` says.

    ``bias`` is added in full precision (by an integer forward GEMM in its epilogue).
    ``reducers`` max-reduce the statistics of each operand across tensor-parallel ranks
    (:class:`~dsq.quant.recipe.Reducers`). ``capture``, when a dict, accumulates
    ``[signal, noise]`` power sums of every quantized operand under the keys ``weight``,
    ``activation`` and ``grad`` (see :func:`dsq.quant.functional.signal_noise`); None (default)
    costs nothing.
    """
    plan = gemm_plan(qconfig)
    red = reducers or NO_REDUCERS
    if not plan.any_int8:  # bias outside: its gradient is autograd's own reduction
        y = _QuantizedLinear.apply(x, weight, None, qconfig, plan, red, capture)
        return y if bias is None else y + bias
    return _QuantizedLinear.apply(x, weight, bias, qconfig, plan, red, capture)
