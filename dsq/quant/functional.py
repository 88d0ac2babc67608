"""The linear quantizer: quantize, dequantize, fake-quantize, and SQNR.

``quantize(x, fmt)`` returns a :class:`QTensor`: int8 codes of ``x``'s shape, an fp32 scale
and (asymmetric formats) an integer-valued fp32 zero point, shaped to broadcast against the
codes (for ``group`` granularity, against the codes viewed as ``[..., n_groups, group_size]``).
As in the study, the scale is recomputed from the current tensor at every call (no running
statistics):

* symmetric: ``s = max|x| / Qp``, ``q = clamp(round(x / s), Qn, Qp)``, ``x_hat = q s``;
* asymmetric: ``s = (max - min) / (Qp - Qn)``, ``z = Qn - round(min / s)``,
  ``q = clamp(round(x / s) + z, Qn, Qp)``, ``x_hat = (q - z) s``.

Round-to-nearest keeps ``|x - x_hat| <= s / 2`` for every element; stochastic rounding
``floor(x / s + U[0, 1))`` is unbiased, ``E[x_hat] = x`` (except, for asymmetric formats,
within half a step of the range ends, where the integer zero point makes the clamp bite).

Scale floor. The study clamps the range at 1e-5 (weights, activations) or 1e-9 (gradients);
such absolute floors flush legitimately tiny tensors (e.g. unscaled gradients of 1e-10) to
zero. A format's ``min_range`` applies such a floor, as the study's code does (``s =
max(max|x|, min_range) / Qp``; asymmetric: ``max(max - min, min_range)``), after the
tensor-parallel reduction. By default the scale is only kept off zero: ``s >= finfo(compute dtype).tiny`` (1.2e-38 for
fp32 and bf16 inputs, whose scales are computed in fp32), so an all-zero row quantizes to exact
zeros and every nonzero range keeps its full resolution. Asymmetric formats also bound
``s >= max(|min|, |max|) * 2^-16`` so the zero point stays an exact fp32 integer when the range
is tiny next to the values (a constant row, a single element): such rows are reproduced to a
relative 2^-17, far below bf16's resolution.

Non-finite inputs. A row (group, tensor) holding inf or nan gets a non-finite scale, and its
dequantized values are all nan (or inf): non-finite numbers are never turned into finite ones.
They reach the loss and the gradient norm, which training loops check anyway, without a host
sync here. ``check_finite=True`` instead raises :class:`FloatingPointError` naming the operand
at the call (one device-to-host sync per call: a debugging switch).

Tensor parallelism. When the dimensions a statistic reduces over are sharded across ranks,
pass ``reduce``: a callable that max-reduces a tensor across the group in place and returns it
(e.g. ``all_reduce(t, op=MAX)``). It receives ``max|x|`` (symmetric) or ``stack([max, -min])``
(asymmetric), one call per quantization. This module never imports ``torch.distributed``.

The functions here carry no gradient (statistics and codes are computed under ``no_grad``);
the straight-through estimator lives in :mod:`dsq.quant.linear`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dsq.quant.floatfmt import FloatFormat, FloatQTensor, quantize_float
from dsq.quant.format import QuantFormat

Reduce = Callable[[Tensor], Tensor]
"""Max-reduces a statistics tensor across a process group (in place) and returns it."""

_ASYM_REL_FLOOR = 2.0**-16


@dataclass
class QTensor:
    """Integer codes with their scale (and zero point): ``x_hat = (codes - zero_point) * scale``."""

    codes: Tensor
    """int8, the shape of the quantized tensor."""
    scale: Tensor
    """fp32 (fp64 for fp64 input), broadcastable to the (grouped) codes."""
    zero_point: Tensor | None
    """Integer-valued, the scale's shape and dtype; None for symmetric formats."""
    fmt: QuantFormat
    dtype: torch.dtype
    """dtype of the tensor that was quantized (the default of :meth:`dequantize`)."""

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        q = self.codes.to(self.scale.dtype)
        grouped = self.fmt.granularity == "group"
        if grouped:
            q = q.unflatten(-1, (-1, self.fmt.group_size))
        if self.zero_point is not None:
            q = q - self.zero_point
        x = q * self.scale
        if grouped:
            x = x.flatten(-2)
        return x.to(dtype or self.dtype)


def _grouped(x: Tensor, fmt: QuantFormat) -> Tensor:
    """``x`` viewed so that one scale is shared along the last dimension (or the whole tensor)."""
    if fmt.granularity == "tensor":
        return x
    if x.dim() == 0:
        raise ValueError(f"{fmt} quantization needs a tensor with at least one dimension")
    if fmt.granularity == "group":
        n, gs = x.shape[-1], fmt.group_size
        if n % gs:
            raise ValueError(f"{fmt}: the last dimension ({n}) is not a multiple of the "
                             f"group size {gs}")
        return x.unflatten(-1, (n // gs, gs))
    return x  # channel / token: one scale per row (reduce over the last dimension)


def _amax(x: Tensor, fmt: QuantFormat) -> Tensor:
    return x.amax() if fmt.granularity == "tensor" else x.amax(dim=-1, keepdim=True)


@torch.no_grad()
def quantize(
    x: Tensor,
    fmt: QuantFormat | FloatFormat,
    *,
    reduce: Reduce | None = None,
    generator: torch.Generator | None = None,
    check_finite: bool = False,
    name: str = "tensor",
) -> QTensor | FloatQTensor:
    """Quantize ``x`` to ``fmt`` with a scale computed from ``x`` (see the module docstring;
    floating-point formats: :func:`dsq.quant.floatfmt.quantize_float`).

    ``reduce`` max-reduces the statistics across the ranks that share them; ``generator``
    drives stochastic rounding; ``check_finite`` raises ``FloatingPointError`` (naming
    ``name``) when ``x`` holds inf or nan.
    """
    if fmt.is_float:
        return quantize_float(x, fmt, reduce=reduce, generator=generator,
                              check_finite=check_finite, name=name)
    cdtype = torch.promote_types(x.dtype, torch.float32)
    xg = _grouped(x.to(cdtype), fmt)
    tiny = torch.finfo(cdtype).tiny
    if fmt.symmetric:
        stat = _amax(xg.abs(), fmt)
        if reduce is not None:
            stat = reduce(stat)
        if fmt.min_range is not None:
            stat = stat.clamp_min(fmt.min_range)
        scale = (stat / fmt.qmax).clamp_min(tiny)
        zero_point = None
        v = xg / scale
    else:
        stat = torch.stack([_amax(xg, fmt), _amax(-xg, fmt)])
        if reduce is not None:
            stat = reduce(stat)
        hi, lo = stat[0], -stat[1]
        rng = hi - lo if fmt.min_range is None else (hi - lo).clamp_min(fmt.min_range)
        scale = torch.maximum(rng / (fmt.qmax - fmt.qmin),
                              torch.maximum(hi.abs(), lo.abs()) * _ASYM_REL_FLOOR).clamp_min(tiny)
        zero_point = fmt.qmin - torch.round(lo / scale)
        v = xg / scale + zero_point
    if check_finite and not bool(torch.isfinite(scale).all()):
        bad = int((~torch.isfinite(scale)).sum())
        raise FloatingPointError(f"{name}: the input of the {fmt} quantizer holds inf or nan "
                                 f"({bad} of {scale.numel()} scale(s) are not finite)")
    if fmt.rounding == "stochastic":
        v = torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device,
                                       dtype=v.dtype))
    else:
        v = torch.round(v)
    codes = v.clamp_(fmt.qmin, fmt.qmax).to(torch.int8).reshape(x.shape)
    return QTensor(codes, scale, zero_point, fmt, x.dtype)


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(codes - zero_point) * scale`` in ``dtype`` (default: the quantized tensor's)."""
    return q.dequantize(dtype)


def fake_quantize(x: Tensor, fmt: QuantFormat | None, **kwargs) -> Tensor:
    """``dequantize(quantize(x, fmt))`` in ``x``'s dtype; ``x`` itself when ``fmt`` is None."""
    return x if fmt is None else quantize(x, fmt, **kwargs).dequantize()


_SQNR_CHUNK = 1 << 14
"""Elements per chunk of the SQNR sums: their fp32 temporaries stay at 1 MiB, not the size of
an LM head's gradient (so measuring SQNR does not raise a run's peak memory)."""


def _chunked_terms(x2: Tensor, hat_rows) -> Tensor:
    """``[sum x^2, sum (x - x_hat)^2]`` over 2-D ``x2``, ``hat_rows(i, j)`` giving rows ``i:j`` of
    ``x_hat`` in fp32, a chunk of rows at a time."""
    acc = torch.zeros(2, dtype=torch.float32, device=x2.device)
    step = max(1, _SQNR_CHUNK // max(1, x2.shape[1]))
    for i in range(0, x2.shape[0], step):
        j = min(x2.shape[0], i + step)
        a = x2[i:j].float()
        acc += torch.stack([a.square().sum(), (a - hat_rows(i, j)).square().sum()])
    return acc


def signal_noise(x: Tensor, x_hat: Tensor) -> Tensor:
    """``[sum x^2, sum (x - x_hat)^2]`` in fp32: SQNR terms that add up across shards and calls."""
    x2 = x.detach().reshape(-1, x.shape[-1] if x.dim() else 1)
    h2 = x_hat.detach().reshape(x2.shape)
    return _chunked_terms(x2, lambda i, j: h2[i:j].float())


def signal_noise_q(x: Tensor, q: QTensor) -> Tensor:
    """:func:`signal_noise` of ``x`` and ``q.dequantize()``, dequantizing a chunk of rows at a time
    (``x`` and ``q.codes`` 2-D, scales per row, per column or per tensor, or grouped per row)."""
    R = q.codes.shape[0]

    def rows(t: Tensor | None, i: int, j: int) -> Tensor | None:
        return t[i:j] if t is not None and t.dim() > 0 and t.shape[0] == R and R > 1 else t

    return _chunked_terms(x.detach(), lambda i, j: QTensor(
        q.codes[i:j], rows(q.scale, i, j), rows(q.zero_point, i, j), q.fmt,
        q.dtype).dequantize(torch.float32))


def sqnr_db(x: Tensor, x_hat: Tensor) -> Tensor:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB.

    A 0-dim fp32 tensor (no host sync); ``inf`` when ``x_hat == x``.
    """
    return power_db(signal_noise(x, x_hat))


def power_db(terms: Tensor) -> Tensor:
    """dB from ``[signal, noise]`` power sums (the last dimension)."""
    return 10 * torch.log10(terms[..., 0] / terms[..., 1])
