"""Kernels of the integer-GEMM path: symmetric quantization to int8 codes, int8 GEMM, rescale.

=================================  =========================================================
``quantize_rows(x, fmt, reduce)``  codes ``[R, C]`` and one scale per row ``[R, 1]`` (token,
                                   channel) or per tensor (0-dim)
``quantize_cols(x, fmt, reduce,    codes and one scale per column ``[1, C]`` (or per tensor);
transpose)``                       with ``transpose`` the codes come as ``x^T`` contiguous
                                   ``[C, R]`` (the row-major left operand of a GEMM that
                                   reduces over ``R``)
``int_mm(a, b)``                   ``a[M, K] @ b[K, N]`` int8 x int8 -> int32 (int64 when ``K``
                                   could overflow int32), ``torch._int_mm``
``rescale(acc, rs, cs, bias,       ``(acc * rs * cs + bias)`` in ``dtype`` (transposed with
dtype, transpose)``                ``transpose``): the epilogue of a scaled integer GEMM
=================================  =========================================================

Two implementations with the same arithmetic:

* eager (the default and the reference): :func:`dsq.quant.functional.quantize`, the simulation's
  own quantizer, so the codes are those of ``compute: simulate`` by construction;
* fused (opt-in): each kernel through ``torch.compile`` (inductor's C++/OpenMP code on CPU), one
  pass per quantization (absmax, scale, divide, round, clamp, cast) and one epilogue pass per
  GEMM instead of five to eight eager passes. Switch it on with ``DSQ_QUANT_COMPILE=1`` in the
  environment (read at the first call) or :func:`set_fused`. Its codes equal the eager codes
  (same fp32 division and round-half-even, tested). It is opt-in because compiling costs about
  5-15 s per kernel and shape class on a 2-core CPU (a training run compiles some 15 graphs:
  one to three minutes cold, seconds with inductor's on-disk cache warm) and the test suite must
  not pay that. Stochastic rounding, fp64 inputs and ``check_finite`` always run eager.

Tensor parallelism: ``reduce`` max-reduces the statistics across ranks (see
:mod:`dsq.quant.functional`); the fused path then runs as absmax kernel, ``reduce``, codes kernel.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from dsq.quant.format import QuantFormat
from dsq.quant.functional import Reduce, quantize

_TINY = torch.finfo(torch.float32).tiny
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# int32 holds K products of |code| <= 128 when K * 2^14 < 2^31; longer reductions are chunked
_K_CHUNK = 1 << 16

_fused: bool | None = None
_compiled: dict[str, object] = {}


def set_fused(on: bool) -> None:
    """Use the torch.compile kernels (True) or the eager reference (False) from now on."""
    global _fused
    _fused = bool(on)


def fused_enabled() -> bool:
    global _fused
    if _fused is None:
        _fused = os.environ.get("DSQ_QUANT_COMPILE", "0").lower() in ("1", "true", "yes", "on")
    return _fused


def _use_fused(x: Tensor, fmt: QuantFormat, check_finite: bool) -> bool:
    return (fused_enabled() and fmt.rounding == "nearest" and not check_finite
            and x.dtype in _FUSED_DTYPES)


def _rowwise(fmt: QuantFormat) -> QuantFormat:
    return fmt if fmt.granularity in ("tensor", "channel") else dataclasses.replace(
        fmt, granularity="channel")


# ----------------------------------------------------------------------------- fused kernels
# Plain tensor code, compiled lazily with dynamic shapes. One function per variant (dynamo
# keeps at most 8 graphs per function): graphs then differ only in dtype and bit width.
def _codes(xf: Tensor, s: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.round(xf / s).clamp(qmin, qmax).to(torch.int8)


def _scale(stat: Tensor, qmax: int) -> Tensor:
    return (stat / qmax).clamp_min(_TINY)


def _k_quant_rows(x, qmin: int, qmax: int):
    xf = x.float()
    s = _scale(xf.abs().amax(-1, keepdim=True), qmax)
    return _codes(xf, s, qmin, qmax), s


def _k_quant_tensor(x, qmin: int, qmax: int):
    xf = x.float()
    s = _scale(xf.abs().amax(), qmax)
    return _codes(xf, s, qmin, qmax), s


def _k_quant_cols(x, qmin: int, qmax: int):
    xf = x.float()
    s = _scale(xf.abs().amax(0, keepdim=True), qmax)
    return _codes(xf, s, qmin, qmax), s


def _k_quant_cols_t(x, qmin: int, qmax: int):
    xf = x.float()
    s = _scale(xf.abs().amax(0, keepdim=True), qmax)
    return _codes(xf, s, qmin, qmax).t().contiguous(), s


def _k_amax_rows(x):
    return x.float().abs().amax(-1, keepdim=True)


def _k_amax_cols(x):
    return x.float().abs().amax(0, keepdim=True)


def _k_amax_tensor(x):
    return x.float().abs().amax()


def _k_codes(x, stat, qmin: int, qmax: int):
    s = _scale(stat, qmax)
    return _codes(x.float(), s, qmin, qmax), s


def _k_codes_t(x, stat, qmin: int, qmax: int):
    s = _scale(stat, qmax)
    return _codes(x.float(), s, qmin, qmax).t().contiguous(), s


def _k_rescale(acc, rs, cs, dtype: torch.dtype):
    return (acc.float() * rs * cs).to(dtype)


def _k_rescale_bias(acc, rs, cs, bias, dtype: torch.dtype):
    return (acc.float() * rs * cs + bias.float()).to(dtype)


def _k_rescale_t(acc, rs, cs, dtype: torch.dtype):
    return (acc.float() * rs * cs).to(dtype).t().contiguous()


_KERNELS = {f.__name__[3:]: f for f in (
    _k_quant_rows, _k_quant_tensor, _k_quant_cols, _k_quant_cols_t, _k_amax_rows, _k_amax_cols,
    _k_amax_tensor, _k_codes, _k_codes_t, _k_rescale, _k_rescale_bias, _k_rescale_t)}


def _compiled_kernel(name: str):
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(_KERNELS[name], fullgraph=True, dynamic=True)
    return fn


# ----------------------------------------------------------------------------- quantization
def _fused_quant(x: Tensor, fmt: QuantFormat, axis: str, transpose: bool,
                 reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    """``axis``: rows | cols | tensor (what one scale spans)."""
    if reduce is None:
        name = f"quant_{axis}" + ("_t" if transpose else "")
        return _compiled_kernel(name)(x, fmt.qmin, fmt.qmax)
    stat = reduce(_compiled_kernel(f"amax_{axis}")(x))
    return _compiled_kernel("codes_t" if transpose else "codes")(x, stat, fmt.qmin, fmt.qmax)


def _check_int8_format(fmt: QuantFormat) -> None:
    if not fmt.symmetric or fmt.granularity == "group":
        raise ValueError(f"{fmt}: integer GEMMs need a symmetric per-tensor/channel/token format")


def quantize_rows(x: Tensor, fmt: QuantFormat, reduce: Reduce | None = None, *,
                  check_finite: bool = False, name: str = "tensor") -> tuple[Tensor, Tensor]:
    """2-D ``x`` to int8 codes with one scale per row (``[R, 1]``) or per tensor (0-dim)."""
    _check_int8_format(fmt)
    if _use_fused(x, fmt, check_finite):
        return _fused_quant(x, fmt, "tensor" if fmt.granularity == "tensor" else "rows", False,
                            reduce)
    q = quantize(x, fmt, reduce=reduce, check_finite=check_finite, name=name)
    return q.codes, q.scale


def quantize_cols(x: Tensor, fmt: QuantFormat, reduce: Reduce | None = None, *,
                  transpose: bool = False, check_finite: bool = False,
                  name: str = "tensor") -> tuple[Tensor, Tensor]:
    """2-D ``x`` to int8 codes with one scale per column (``[1, C]``) or per tensor (0-dim).

    ``fmt``'s granularity says per tensor or not (channel/token both mean: per column here).
    The codes are ``[R, C]`` contiguous, or ``[C, R]`` contiguous (``x^T``) with ``transpose``.
    """
    _check_int8_format(fmt)
    per_tensor = fmt.granularity == "tensor"
    if _use_fused(x, fmt, check_finite):
        if per_tensor:
            codes, scale = _fused_quant(x, fmt, "tensor", False, reduce)
            return (codes.t().contiguous() if transpose else codes), scale
        return _fused_quant(x, fmt, "cols", transpose, reduce)
    q = quantize(x.t(), _rowwise(fmt), reduce=reduce, check_finite=check_finite, name=name)
    codes = q.codes.contiguous() if transpose else q.codes.t().contiguous()
    return codes, (q.scale if per_tensor else q.scale.t())


# ----------------------------------------------------------------------------- GEMM
def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a[M, K] @ b[K, N]`` for int8 codes: exact int32 (int64 past ``K = 2^16``) products.

    CPU ``torch._int_mm`` takes any shape. CUDA's needs ``M > 16`` and ``K``, ``N`` multiples
    of 8: operands are zero-padded there (zeros add nothing to the sums) and the result cut.
    """
    M, K = a.shape
    N = b.shape[1]
    if K > _K_CHUNK:
        out = torch.zeros(M, N, dtype=torch.int64, device=a.device)
        for k in range(0, K, _K_CHUNK):
            out += int_mm(a[:, k:k + _K_CHUNK], b[k:k + _K_CHUNK])
        return out
    if a.is_cuda:
        pm, pk, pn = max(0, 17 - M), -K % 8, -N % 8
        if pm or pk or pn:
            a = torch.nn.functional.pad(a, (0, pk, 0, pm))
            b = torch.nn.functional.pad(b, (0, pn, 0, pk))
            return torch._int_mm(a, b)[:M, :N]
    return torch._int_mm(a, b)


def rescale(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None,
            dtype: torch.dtype, transpose: bool = False) -> Tensor:
    """``acc * row_scale * col_scale (+ bias)`` in ``dtype``; ``transpose`` returns its ``.t()``
    contiguous. Scales broadcast (``[M, 1]``, ``[1, N]`` or 0-dim); the product is in fp32
    (fp64 for fp64 scales)."""
    if (fused_enabled() and dtype in _FUSED_DTYPES and row_scale.dtype == torch.float32
            and col_scale.dtype == torch.float32):
        if transpose and bias is None:
            return _compiled_kernel("rescale_t")(acc, row_scale, col_scale, dtype)
        if not transpose:
            if bias is None:
                return _compiled_kernel("rescale")(acc, row_scale, col_scale, dtype)
            return _compiled_kernel("rescale_bias")(acc, row_scale, col_scale, bias, dtype)
    cdtype = torch.promote_types(row_scale.dtype, col_scale.dtype)
    y = acc.to(cdtype) * row_scale * col_scale
    if bias is not None:
        y = y + bias.to(cdtype)
    y = y.to(dtype)
    return y.t().contiguous() if transpose else y
