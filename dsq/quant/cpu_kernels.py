"""C/OpenMP kernels of the integer-GEMM path on CPU (the ``cpp`` kernels of dsq.quant.fused).

The C source is ``dsq/csrc/quant.c``; :data:`LIBRARY` builds it once per process with the
system C compiler (``-O3 -ffp-contract=off`` and the flags of the CPU's variant) through
:mod:`dsq.native`, cached under ``$DSQ_CACHE_DIR`` (default ``~/.cache/dsq``), called through
``ctypes`` (which releases the GIL). CPU tensors, fp32 and bf16, 2-D; every entry point checks
device, dtype, contiguity and sizes before the call (ValueError).

Variants (:mod:`dsq.native`): ``avx512`` (16 lanes in one AVX-512 register), ``avx2`` (the
same 16 lanes as two AVX2 registers, FMA for the division), ``portable`` (scalar C, SSE2 byte
shuffles on x86); :func:`isa` names the one in use, :func:`build_variant` builds any of them.
All three give the same bits (tested variant by variant against the eager kernels).

``stats``
    One read of ``x[R, C]``: per-row absmax, per-column absmax and column sums (thread-local
    partial columns, merged), tensor absmax; each output optional.
``codes``
    One read of ``x``: int8 codes with per-row scales (``stride 0``: one scale) and/or with
    per-column scales, the latter optionally written transposed (``[C, R]``, through 64 x 64
    tiles).
``rescale``
    ``out = (float(acc) * rs * cs) + bias`` in fp32 or bf16, optionally transposed.

The arithmetic is that of :func:`dsq.quant.functional.quantize` and of the eager rescale,
operation for operation: ``s = max(amax / qmax, FLT_MIN)``, ``rint(x / s)`` (round half to
even), clamp, ``(acc * rs) * cs + bias``, bf16 by round-to-nearest-even; no fused multiply-add.
So codes and scales equal the eager ones bit for bit (tested); only column sums (the bias
gradient) add in another order.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from dsq.native import Library

DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}



def _setup(lib: ctypes.CDLL, isa: str) -> None:
    P, L, N, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.dsq_scale.argtypes = [P, L, F]
    for s in DTYPES.values():
        getattr(lib, f"dsq_stats_{s}").argtypes = [P, L, L, P, P, P, P, N]
        getattr(lib, f"dsq_codes_{s}").argtypes = [P, L, L, P, L, P, P, L, P, N, F, F, N]
        getattr(lib, f"dsq_rescale_{s}").argtypes = [P, L, L, P, L, P, L, P, P, L, N, N]
    for name in ("dsq_scale", *(f"dsq_{k}_{s}" for k in ("stats", "codes", "rescale")
                                for s in DTYPES.values())):
        getattr(lib, name).restype = None


LIBRARY = Library("quant", ("quant.c", "dsq_common.h"), what="dsq quantization kernels",
                  fallback="the eager PyTorch kernels", setup=_setup)
"""The kernels' native library (:mod:`dsq.native`)."""


def build_variant(isa: str) -> ctypes.CDLL:
    """The kernels compiled as variant ``isa`` (see :mod:`dsq.native`), cached; raises
    :class:`dsq.native.BuildError`. Only call on a CPU that supports ``isa``."""
    return LIBRARY.variant(isa)


def library() -> ctypes.CDLL | None:
    """The kernels of this CPU's variant (:func:`dsq.native.select_isa`), built on first use;
    None where that is ``reference`` or the build fails (then one line says so, with the path
    of the compiler's output, and the eager kernels run)."""
    return LIBRARY.load()


def isa() -> str:
    """The variant the quantization kernels run as here (``reference``: the eager ones)."""
    return LIBRARY.choice().isa


def supports(x: Tensor) -> bool:
    """Whether ``x`` can go to the quantization kernels (CPU, fp32/bf16, 2-D; they take it
    contiguous)."""
    return x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 2


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"dsq quantization kernels: {what}")


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"dsq quantization kernels not loaded (running as {isa()})")
    return lib


def _input(x: Tensor) -> Tensor:
    _need(supports(x), f"need a 2-D fp32/bf16 CPU tensor, got {tuple(x.shape)} {x.dtype} on "
                       f"{x.device}")
    return x.contiguous()


def _scale(s: Tensor | None, n: int, name: str) -> None:
    _need(s is None or (s.device.type == "cpu" and s.dtype == torch.float32
                        and s.is_contiguous() and s.numel() in (1, n)),
          f"{name} must be a contiguous fp32 CPU tensor of {n} or 1 elements")


def stats(x: Tensor, rows: bool, cols: bool, col_sum: bool, tensor: bool) -> tuple:
    """``(row_amax [R, 1], col_amax [1, C], col_sum [C], tensor_amax [])``, None where not asked."""
    x = _input(x)
    R, C = x.shape
    f = {"dtype": torch.float32}
    ra = torch.empty(R, 1, **f) if rows else None
    ca = torch.empty(1, C, **f) if cols else None
    cs = torch.empty(C, **f) if col_sum else None
    ta = torch.empty((), **f) if tensor else None
    getattr(_lib(), f"dsq_stats_{DTYPES[x.dtype]}")(
        x.data_ptr(), R, C, _p(ra), _p(ca), _p(cs), _p(ta), torch.get_num_threads())
    return ra, ca, cs, ta


def to_scale(stat: Tensor, qmax: int) -> Tensor:
    """``max(stat / qmax, FLT_MIN)`` in place (fp32, contiguous)."""
    _scale(stat, stat.numel(), "stat")
    _lib().dsq_scale(stat.data_ptr(), stat.numel(), float(qmax))
    return stat


def codes(x: Tensor, qmin: int, qmax: int, row_scale: Tensor | None = None,
          col_scale: Tensor | None = None, transpose: bool = False,
          packed: bool = False) -> tuple:
    """Codes of ``x`` with per-row (``[R, 1]`` or 0-dim) and/or per-column (``[1, C]`` or 0-dim)
    scales: ``(row_codes [R, C], col_codes [R, C] or [C, R])``, None where not asked. With
    ``packed`` the column codes come as the flat ``[R * C]`` B operand of the AMX GEMM driver
    (:mod:`dsq.quant.cpu_gemm`, ``K = R``; ``R`` a multiple of 4)."""
    x = _input(x)
    R, C = x.shape
    if packed and (transpose or R % 4):
        raise ValueError("packed column codes need R % 4 == 0 and no transpose")
    _scale(row_scale, R, "row_scale")
    _scale(col_scale, C, "col_scale")
    qr = torch.empty(R, C, dtype=torch.int8) if row_scale is not None else None
    qc = (torch.empty(R * C if packed else ((C, R) if transpose else (R, C)), dtype=torch.int8)
          if col_scale is not None else None)
    rstr = 0 if row_scale is None or row_scale.numel() == 1 else 1
    cstr = 0 if col_scale is None or col_scale.numel() == 1 else 1
    getattr(_lib(), f"dsq_codes_{DTYPES[x.dtype]}")(
        x.data_ptr(), R, C, _p(row_scale), rstr, _p(qr), _p(col_scale), cstr, _p(qc),
        2 if packed else int(transpose), float(qmin), float(qmax), torch.get_num_threads())
    return qr, qc


def rescale(acc: Tensor, rs: Tensor, cs: Tensor, bias: Tensor | None, dtype: torch.dtype,
            transpose: bool, out_shape: tuple | None = None, out: Tensor | None = None) -> Tensor:
    """``(acc * rs * cs + bias)`` in ``dtype`` (fp32/bf16), transposed with ``transpose``;
    allocated as ``out_shape`` (same elements) when given, or written into ``out`` (a 2-D view
    with unit column stride, e.g. a slice of rows, or of columns when transposed). ``acc``:
    contiguous int32 ``[M, N]``; scales fp32 of ``M`` / ``N`` (or 1) elements; ``bias``:
    ``N`` elements of ``dtype``; all on the CPU."""
    _need(acc.device.type == "cpu" and acc.dtype == torch.int32 and acc.dim() == 2
          and acc.is_contiguous(), "acc must be a contiguous 2-D int32 CPU tensor")
    _need(dtype in DTYPES, f"output dtype {dtype} is not fp32 or bf16")
    M, N = acc.shape
    _scale(rs, M, "the row scale")
    _scale(cs, N, "the column scale")
    _need(bias is None or (bias.device.type == "cpu" and bias.dtype == dtype
                           and bias.is_contiguous() and bias.numel() == N),
          f"bias must be a contiguous {dtype} CPU tensor of {N} elements")
    if out is None:
        shape = (N, M) if transpose else (out_shape or (M, N))
        out = torch.empty(shape, dtype=dtype)
        _need(out.numel() == M * N, f"out_shape {out_shape} does not hold {M} x {N} elements")
        ldo = M if transpose else N
    else:
        _need(out.device.type == "cpu" and out.dtype == dtype and out.dim() == 2
              and out.stride(-1) == 1 and out.shape == ((N, M) if transpose else (M, N)),
              "out must be a 2-D CPU view of the output's shape and dtype, unit column stride")
        ldo = out.stride(0)
    getattr(_lib(), f"dsq_rescale_{DTYPES[dtype]}")(
        acc.data_ptr(), M, N, rs.data_ptr(), 0 if rs.numel() == 1 else 1, cs.data_ptr(),
        0 if cs.numel() == 1 else 1, _p(bias), out.data_ptr(), ldo, int(transpose),
        torch.get_num_threads())
    return out
