"""``compute: int8``: the quantized linear's GEMMs as integer GEMMs (int8 x int8 -> int32).

A scaled integer GEMM ``C = (sa qa) (sb qb)`` is ``C[m, n] = sa[m] sb[n] sum_k qa[m, k] qb[k, n]``
only when no scale varies along the reduced dimension ``k``: one ``torch._int_mm`` and one
rescale (:mod:`dsq.quant.fused`). With ``X[tokens, in]``, ``W[out, in]``, ``G[tokens, out]``:

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
``compute: simulate`` does, and :func:`int8_plan` says which and why, e.g. the input gradient under
``grad_gemms: weight``: the recipe leaves ``G`` in full precision there, and it is not quantized
for speed's sake. :func:`describe_plan` is the start-up line naming what falls back.

Saved for backward: for ``dW``, the int8 codes of ``X`` (per column for an integer ``dW``, the
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
int32 result is read once by a rescale (+ bias) pass. See :mod:`dsq.quant.fused` for the kernels.

Tensor parallelism: ``reduce_x/w/g`` max-reduce the recipe's statistics, ``reduce_xt/wt/gt`` those
of the per-column quantizations (a per-column statistic reduces over the rows: ``W``'s over
``out``, sharded in a column-parallel layer; ``X``'s and ``G``'s over tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dsq.quant.format import QuantFormat
from dsq.quant.functional import QTensor, Reduce, quantize, signal_noise_q
from dsq.quant.fused import (
    can_pack,
    quantize_cols,
    quantize_rows,
    quantize_rows_cols,
    scaled_mm,
)

if TYPE_CHECKING:
    from dsq.quant.matmul import LinearQuant

GEMMS = {"forward": "forward Y = X W^T", "input_grad": "input grad dX = G W",
         "weight_grad": "weight grad dW = G^T X"}


def int8_reason(fmt: QuantFormat | None, operand: str) -> str | None:
    """Why ``fmt`` cannot feed an integer GEMM (None: it can)."""
    if fmt is None:
        return f"{operand} is not quantized"
    if not fmt.symmetric:
        return f"{operand} {fmt} is asymmetric (zero point)"
    if fmt.granularity == "group":
        return f"{operand} {fmt} has group scales"
    if fmt.bits > 8:
        return f"{operand} {fmt} is wider than 8 bits"
    if fmt.min_range is not None:
        return f"{operand} {fmt} has a range floor (min_range), which the integer kernels do not apply"
    return None


@dataclass(frozen=True)
class Int8Plan:
    """For each GEMM, None when it runs as an integer GEMM, else why it is simulated."""

    forward: str | None
    input_grad: str | None
    weight_grad: str | None

    @property
    def any_int8(self) -> bool:
        return None in (self.forward, self.input_grad, self.weight_grad)

    def fallbacks(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _first(*reasons: str | None) -> str | None:
    return "; ".join(r for r in reasons if r) or None


@functools.lru_cache(maxsize=64)
def int8_plan(qc: LinearQuant) -> Int8Plan:
    """Which GEMMs of ``qc``'s recipe can run as integer GEMMs (see the module docstring)."""
    a, w = int8_reason(qc.activation, "activation"), int8_reason(qc.weight, "weight")
    g = int8_reason(qc.grad, "grad")
    if qc.full_backward:  # the study's backward: W and X in full precision, float GEMMs
        a_bw = w_bw = "backward_operands=full keeps X and W in full precision for backward"
        return Int8Plan(forward=_first(a, w),
                        input_grad=w_bw, weight_grad=a_bw)
    gd = {"input": "input", "both": "input"}.get(qc.grad_gemms)
    gw = {"weight": "weight", "both": "weight"}.get(qc.grad_gemms)
    return Int8Plan(
        forward=_first(a, w),
        input_grad=_first(g if gd else f"grad is not quantized for this GEMM "
                          f"(grad_gemms={qc.grad_gemms})", w),
        weight_grad=_first(g if gw else f"grad is not quantized for this GEMM "
                           f"(grad_gemms={qc.grad_gemms})", a))


def describe_plan(qc: LinearQuant, kinds: list[str] | None = None) -> tuple[str, bool]:
    """A one-line account of what ``compute: int8`` does with ``qc`` on layers ``kinds``,
    and whether any GEMM falls back to simulation."""
    plan = int8_plan(qc)
    where = f" ({', '.join(kinds)})" if kinds else ""
    int8 = [GEMMS[k] for k, v in dataclasses.asdict(plan).items() if v is None]
    fb = plan.fallbacks()
    msg = f"quant.compute=int8 for {qc}{where}: integer GEMMs: {', '.join(int8) or 'none'}"
    if fb:
        msg += "; simulated (float GEMM on dequantized operands): " + "; ".join(
            f"{GEMMS[k]} because {v}" for k, v in fb.items())
    return msg, bool(fb)


def _col_fmt(fmt: QuantFormat) -> QuantFormat:
    """The per-column version of a per-row format (per-tensor stays)."""
    return fmt if fmt.granularity == "tensor" else dataclasses.replace(fmt, granularity="channel")


def _tscale(s: Tensor | None) -> Tensor | None:
    """A per-row scale ``[R, 1]`` as a per-column one ``[1, R]`` and back (0-dim stays)."""
    return s.t() if s is not None and s.dim() == 2 else s


def _record(capture, name: str, x: Tensor, q: QTensor) -> None:
    if capture is not None:
        terms = signal_noise_q(x, q)
        capture[name] = capture[name] + terms if name in capture else terms


def _quant(x: Tensor, fmt: QuantFormat | None, reduce: Reduce | None, qc: LinearQuant,
           name: str, capture) -> QTensor | None:
    """The recipe's quantization of ``x`` (None: not quantized), recorded for SQNR.

    Integer-GEMM formats go through :func:`dsq.quant.fused.quantize_rows` (eager: the very
    :func:`~dsq.quant.functional.quantize` of the simulation; fused: the same codes), others
    through ``quantize`` (their GEMM is simulated)."""
    if fmt is None:
        return None
    if int8_reason(fmt, name) is None:
        codes, scale = quantize_rows(x, fmt, reduce, check_finite=qc.check_finite, name=name)
        q = QTensor(codes, scale, None, fmt, x.dtype)
    else:
        q = quantize(x, fmt, reduce=reduce, check_finite=qc.check_finite, name=name)
    _record(capture, name, x, q)
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


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, qc: LinearQuant, plan: Int8Plan, reducers, capture):
        rx, rw, _, rxt, _, _ = reducers
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
            _record(capture, "activation", x2, qx)
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
        ctx.meta = (qc, plan, reducers, capture, x.shape, w.dtype, xt, x_packed)
        return y

    @staticmethod
    def backward(ctx, g):
        qc, plan, reducers, capture, x_shape, w_dtype, xt, x_packed = ctx.meta
        _, _, rg, _, rwt, rgt = reducers
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
                _record(capture, "grad", g2, qg)
            else:  # G's only quantization: record it
                _record(capture, "grad", g2,
                        QTensor(cc if xt else cc.t(), cs, None, fg, g.dtype))
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


def int8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, qc: LinearQuant,
                reducers: tuple, capture) -> Tensor:
    """``Qa(x) Qw(weight)^T + bias`` with integer GEMMs where :func:`int8_plan` allows."""
    return _Int8Linear.apply(x, weight, bias, qc, int8_plan(qc), reducers, capture)
