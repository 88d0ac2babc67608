"""Kernels of the integer-GEMM path: symmetric quantization to int8 codes, and which
implementation (eager, C, compiled) runs the path's kernels.

=================================  =========================================================
``quantize_rows(x, fmt, reduce)``  codes ``[R, C]`` and one scale per row ``[R, 1]`` (token,
                                   channel) or per tensor (0-dim)
``quantize_cols(x, fmt, reduce,    codes and one scale per column ``[1, C]`` (or per tensor);
transpose)``                       with ``transpose`` the codes come as ``x^T`` contiguous
                                   ``[C, R]`` (the row-major left operand of a GEMM that
                                   reduces over ``R``)
=================================  =========================================================

The integer GEMM and its rescale epilogue are :mod:`dsq.quant.gemm`; the kernel choice below
applies to both.

Three implementations with the same arithmetic, chosen by ``DSQ_QUANT_KERNEL`` (read at the
first call) or :func:`set_kernel`:

* ``eager`` (the reference): :func:`dsq.quant.functional.quantize`, the simulation's own
  quantizer, so the codes are those of ``compute: simulate`` by construction; five to eight
  tensor passes per quantization and three per rescale;
* ``cpp`` (``auto``, the default, on CPU): C/OpenMP kernels (:mod:`dsq.quant.cpu_kernels`,
  compiled once and cached): one read of a tensor for all its statistics (row and
  column absmax, column sums), one read for all its codes, one pass per rescale; bit-identical
  codes, scales and outputs (tested); falls back to eager where it does not apply (another
  device or dtype, no compiler);
* ``compile`` (opt-in): the same kernels as plain tensor code under ``torch.compile``
  (inductor's C++/OpenMP on CPU, Triton on GPU), also bit-identical on CPU. On a CPU it costs
  compilation time per kernel (a training run compiles some 15 graphs), the resident memory of
  dynamo and inductor and guard checks per call, and runs slower than ``cpp`` (docs/performance.md),
  so it is not the default there.

Stochastic rounding and ``check_finite`` always run eager.

Tensor parallelism: ``reduce`` max-reduces the statistics across ranks (see
:mod:`dsq.quant.functional`); the fused path then runs as absmax kernel, ``reduce``, codes kernel.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from dsq.native import kernel_choice
from dsq.quant.format import QuantFormat
from dsq.quant.functional import Reduce, quantize

_TINY = torch.finfo(torch.float32).tiny
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_kernel: str | None = None
_compiled: dict[str, object] = {}


def set_kernel(name: str | None) -> None:
    """Use kernel ``name`` from now on (a :mod:`dsq.native.kernel_choice` name or old alias); None: the
    environment's ``DSQ_QUANT_KERNEL``."""
    global _kernel
    _kernel = None if name is None else kernel_choice.impl(name)


def kernel() -> str:
    """The implementation in effect: auto | eager | cpp | compile (``DSQ_QUANT_KERNEL``, default
    auto, unless :func:`set_kernel` chose one)."""
    global _kernel
    if _kernel is None:
        _kernel = kernel_choice.impl(os.environ.get("DSQ_QUANT_KERNEL", "").strip() or "auto")
    return _kernel


def has_triton() -> bool:
    """Whether ``torch.compile`` can generate GPU kernels here (Triton is installed)."""
    try:
        from torch.utils._triton import has_triton as _has_triton

        return bool(_has_triton())
    except Exception:  # an old or stripped PyTorch
        return False


def _impl(x: Tensor, fmt: QuantFormat | None = None, check_finite: bool = False) -> str:
    """eager | cpp | compile for a quantization of ``x`` (or a rescale to ``x``'s dtype).

    Off the CPU (CUDA) ``auto`` means ``compile`` (Triton kernels) where Triton is installed,
    else eager; the CPU native kernels are never built or loaded for a device tensor."""
    k = kernel()
    if k == "eager" or check_finite or (fmt is not None and fmt.rounding != "nearest"):
        return "eager"
    if x.device.type != "cpu":
        if k in ("auto", "compile") and x.dtype in _FUSED_DTYPES and has_triton():
            return "compile"
        return "eager"
    if k == "compile":
        return "compile" if x.dtype in _FUSED_DTYPES else "eager"
    from dsq.quant import cpu_kernels

    if cpu_kernels.supports(x) and cpu_kernels.library() is not None:
        return "cpp"
    return "eager"


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


def _rows(xf, qmin, qmax):
    s = _scale(xf.abs().amax(-1, keepdim=True), qmax)
    return _codes(xf, s, qmin, qmax), s


def _cols(xf, qmin, qmax, transpose: bool):
    s = _scale(xf.abs().amax(0, keepdim=True), qmax)
    q = _codes(xf, s, qmin, qmax)
    return (q.t().contiguous() if transpose else q), s


def _quant_kernel(rows: bool, cols: bool, transpose: bool, col_sum: bool, tensor: bool):
    """The fused quantization of one variant: per-tensor codes, or any of per-row codes,
    per-column codes (transposed with ``transpose``) and column sums, from one read of ``x``.
    Each variant is its own function object, so each keeps its own compiled graphs."""

    def kernel(x, qmin: int, qmax: int):
        xf = x.float()
        if tensor:
            s = _scale(xf.abs().amax(), qmax)
            return _codes(xf, s, qmin, qmax), s
        out = ()
        if rows:
            out += _rows(xf, qmin, qmax)
        if cols:
            out += _cols(xf, qmin, qmax, transpose)
        if col_sum:
            out += (xf.sum(0),)
        return out

    return kernel


def _quant_key(rows: bool = False, cols: bool = False, transpose: bool = False,
               col_sum: bool = False, tensor: bool = False) -> tuple:
    """The ``_KERNELS`` key of a fused quantization variant."""
    return (rows, cols, cols and transpose, col_sum, tensor)


_QUANT_VARIANTS = [(True, False, False, False, False), (False, False, False, False, True)] + [
    (r, True, t, c, False) for r in (False, True) for t in (False, True) for c in (False, True)
] + [(True, False, False, True, False)]
"""(rows, cols, transpose, col_sum, tensor) of the fused quantizations the int8 path uses."""

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


_KERNELS = {**{key: _quant_kernel(*key) for key in _QUANT_VARIANTS}, **{
    f.__name__[3:]: f for f in (_k_amax_rows, _k_amax_cols, _k_amax_tensor, _k_codes, _k_codes_t,
                                _k_rescale, _k_rescale_bias, _k_rescale_t)}}
"""Kernels by key: a quantization variant's tuple, or the name of an amax / codes / rescale
kernel."""


_compile_failed: str | None = None


def _compiled_kernel(name):
    """Kernel ``name`` (a key of ``_KERNELS``) under ``torch.compile``; if compiling fails (no working compiler or
    Triton), warns once and runs the same tensor code eagerly from then on (same arithmetic)."""
    if _compile_failed is not None:
        return _KERNELS[name]
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = _guarded(name, torch.compile(_KERNELS[name], fullgraph=True,
                                                            dynamic=True))
    return fn


def _guarded(name, compiled):
    def run(*args):
        global _compile_failed
        if _compile_failed is not None:
            return _KERNELS[name](*args)
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # inductor/Triton build errors surface at the first call
            _compile_failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            import warnings

            warnings.warn(f"dsq.quant: torch.compile kernels unavailable ({_compile_failed}); "
                          f"running them eagerly", stacklevel=2)
            return _KERNELS[name](*args)

    return run


# ----------------------------------------------------------------------------- quantization
def _fused_quant(x: Tensor, fmt: QuantFormat, axis: str, transpose: bool,
                 reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    """``axis``: rows | cols | tensor (what one scale spans)."""
    if reduce is None:
        key = _quant_key(rows=axis == "rows", cols=axis == "cols", transpose=transpose,
                         tensor=axis == "tensor")
        return _compiled_kernel(key)(x, fmt.qmin, fmt.qmax)
    stat = reduce(_compiled_kernel(f"amax_{axis}")(x))
    return _compiled_kernel("codes_t" if transpose else "codes")(x, stat, fmt.qmin, fmt.qmax)


def _check_int8_format(fmt: QuantFormat) -> None:
    if not fmt.symmetric or fmt.granularity == "group":
        raise ValueError(f"{fmt}: integer GEMMs need a symmetric per-tensor/channel/token format")


def quantize_rows(x: Tensor, fmt: QuantFormat, reduce: Reduce | None = None, *,
                  check_finite: bool = False, name: str = "tensor") -> tuple[Tensor, Tensor]:
    """2-D ``x`` to int8 codes with one scale per row (``[R, 1]``) or per tensor (0-dim)."""
    _check_int8_format(fmt)
    impl = _impl(x, fmt, check_finite)
    if impl == "cpp":
        return _cpp_quant(x, fmt, rows=True, cols=False, transpose=False, col_sum=False,
                          reduce=reduce, col_reduce=None)[:2]
    if impl == "compile":
        return _fused_quant(x, fmt, "tensor" if fmt.granularity == "tensor" else "rows", False,
                            reduce)
    q = quantize(x, fmt, reduce=reduce, check_finite=check_finite, name=name)
    return q.codes, q.scale


def can_pack(x: Tensor, fmt: QuantFormat, check_finite: bool = False) -> bool:
    """Whether the per-column codes of ``x[R, C]`` can be written as the packed ``B`` operand of
    the AMX GEMM driver (``K = R``): the ``cpp`` kernels apply and the driver runs here."""
    from dsq.quant import cpu_gemm

    return (x.dim() == 2 and _impl(x, fmt, check_finite) == "cpp"
            and cpu_gemm.can_take(x.shape[0]))


def quantize_cols(x: Tensor, fmt: QuantFormat, reduce: Reduce | None = None, *,
                  transpose: bool = False, pack: bool = False, check_finite: bool = False,
                  name: str = "tensor") -> tuple[Tensor, Tensor]:
    """2-D ``x`` to int8 codes with one scale per column (``[1, C]``) or per tensor (0-dim).

    ``fmt``'s granularity says per tensor or not (channel/token both mean: per column here).
    The codes are ``[R, C]`` contiguous, or ``[C, R]`` contiguous (``x^T``) with ``transpose``,
    or with ``pack`` (only where :func:`can_pack`) the flat ``B`` operand of
    :func:`dsq.quant.cpu_gemm.scaled_mm` for ``x`` as ``B[K=R, N=C]``.
    """
    _check_int8_format(fmt)
    per_tensor = fmt.granularity == "tensor"
    impl = _impl(x, fmt, check_finite)
    if pack and not can_pack(x, fmt, check_finite):
        raise ValueError("packed column codes need the cpp kernels and the AMX GEMM driver")
    if impl == "cpp":
        return _cpp_quant(x, fmt, rows=False, cols=True, transpose=transpose, col_sum=False,
                          reduce=None, col_reduce=reduce, pack=pack)[2:4]
    if impl == "compile":
        if per_tensor:
            codes, scale = _fused_quant(x, fmt, "tensor", False, reduce)
            return (codes.t().contiguous() if transpose else codes), scale
        return _fused_quant(x, fmt, "cols", transpose, reduce)
    q = quantize(x.t(), _rowwise(fmt), reduce=reduce, check_finite=check_finite, name=name)
    codes = q.codes.contiguous() if transpose else q.codes.t().contiguous()
    return codes, (q.scale if per_tensor else q.scale.t())


def quantize_rows_cols(x: Tensor, fmt: QuantFormat, *, rows: bool = True, cols: bool = True,
                       transpose: bool = False, pack: bool = False, col_sum: bool = False,
                       reduce: Reduce | None = None, col_reduce: Reduce | None = None,
                       check_finite: bool = False, name: str = "tensor") -> tuple:
    """Per-row and per-column quantizations of one 2-D ``x`` (and its column sums), each part
    optional: ``(row_codes, row_scale, col_codes, col_scale, col_sum)``, None for parts not
    asked for. ``fmt`` is per token/channel. Fused: one kernel reads ``x`` for all parts (when
    no statistic needs a cross-rank reduction); eager: :func:`quantize_rows`,
    :func:`quantize_cols` and ``x.sum(0)``. The column sum is fp32 (it is the bias gradient).
    Column codes: ``transpose`` and ``pack`` as in :func:`quantize_cols`."""
    _check_int8_format(fmt)
    if fmt.granularity == "tensor":
        raise ValueError(f"{fmt}: quantize_rows_cols is for per-row formats")
    impl = _impl(x, fmt, check_finite)
    if pack and not (cols and can_pack(x, fmt, check_finite)):
        raise ValueError("packed column codes need the cpp kernels and the AMX GEMM driver")
    if impl == "cpp":
        return _cpp_quant(x, fmt, rows=rows, cols=cols, transpose=transpose, col_sum=col_sum,
                          reduce=reduce, col_reduce=col_reduce, pack=pack)
    if impl == "compile" and (rows or cols) and reduce is None and col_reduce is None:
        key = _quant_key(rows, cols, transpose, col_sum)
        got = iter(_compiled_kernel(key)(x, fmt.qmin, fmt.qmax))
        rc, rs = (next(got), next(got)) if rows else (None, None)
        cc, cs = (next(got), next(got)) if cols else (None, None)
        return rc, rs, cc, cs, (next(got) if col_sum else None)
    r = quantize_rows(x, fmt, reduce, check_finite=check_finite, name=name) if rows else (
        None, None)
    c = quantize_cols(x, fmt, col_reduce, transpose=transpose, check_finite=check_finite,
                      name=name) if cols else (None, None)
    return (*r, *c, x.float().sum(0) if col_sum else None)


def _cpp_quant(x: Tensor, fmt: QuantFormat, *, rows: bool, cols: bool, transpose: bool,
               col_sum: bool, reduce: Reduce | None, col_reduce: Reduce | None,
               pack: bool = False) -> tuple:
    """The C kernels: one statistics pass, the (TP) reductions, one codes pass.

    Per-tensor formats give one scale for both the rows' and the columns' codes."""
    from dsq.quant import cpu_kernels as ck

    per_tensor = fmt.granularity == "tensor"
    ra, ca, csum, ta = ck.stats(x, rows and not per_tensor, cols and not per_tensor, col_sum,
                                per_tensor)
    rs = cs = None
    if per_tensor:
        ta = reduce(ta) if reduce is not None and rows else (
            col_reduce(ta) if col_reduce is not None else ta)
        rs = cs = ck.to_scale(ta.contiguous(), fmt.qmax)
    else:
        if rows:
            rs = ck.to_scale((reduce(ra) if reduce is not None else ra).contiguous(), fmt.qmax)
        if cols:
            cs = ck.to_scale((col_reduce(ca) if col_reduce is not None else ca).contiguous(),
                             fmt.qmax)
    qr, qc = ck.codes(x, fmt.qmin, fmt.qmax, rs if rows else None, cs if cols else None,
                      transpose, packed=pack)
    return qr, (rs if rows else None), qc, (cs if cols else None), csum


def engine(device_type: str) -> str:
    """The kernels that run the integer path on ``device_type`` (for the start-up line)."""
    if device_type == "cuda":
        quant = ("torch.compile (Triton)" if kernel() in ("auto", "compile") and has_triton()
                 else "eager PyTorch")
        return (f"on CUDA: torch._int_mm (cuBLASLt int8, int32 accumulation; operands "
                f"zero-padded to M > 16 and K, N multiples of 8 where a shape needs it), "
                f"quantization and rescale kernels: {quant}")
    from dsq import native
    from dsq.quant import cpu_gemm, cpu_kernels

    k = kernel()
    quant = {"eager": "eager PyTorch", "compile": "torch.compile"}.get(k) or (
        f"C/{cpu_kernels.isa()}" if cpu_kernels.isa() != "reference" else "eager PyTorch")
    return (f"on CPU ({native.cpu_model()}): integer GEMMs: {cpu_gemm.status()}, "
            f"quantization and rescale kernels: {quant}")
