"""Scaled int8 GEMMs on CPUs with AMX-INT8: oneDNN's micro-kernel plus dsq's epilogue.

``torch._int_mm`` on CPU goes through oneDNN's legacy ``gemm_s8s8s32`` entry point, which does not
use AMX tiles and writes a full int32 matrix (twice the bytes of a bf16 one) that a second pass
must rescale. :func:`scaled_mm` instead drives ``at::native::cpublas::brgemm`` (oneDNN's
batch-reduce GEMM micro-kernel, the one PyTorch's own CPU GEMM templates use) over tiles of the
output from a small C++ driver (``dsq/csrc/amx_gemm.cpp``): ``B`` is packed once into the
micro-kernel's VNNI layout, each ``64 x 64`` int32 tile is rescaled (``acc * row_scale *
col_scale + bias``, the arithmetic of :func:`dsq.quant.gemm.rescale` operation for operation)
and written as fp32 or bf16 while it is in cache, so no int32 matrix ever reaches memory.

Its throughput against ``torch.mm`` and ``torch._int_mm``: docs/performance.md.

Built once (:data:`LIBRARY`, :mod:`dsq.native`) with the system C++ compiler against the
installed PyTorch headers with explicit flags for its AVX-512 epilogue
(:data:`dsq.native.AMX_FLAGS`), cached under ``$DSQ_CACHE_DIR`` (default ``~/.cache/dsq``)
keyed by sources, compiler flags and PyTorch version. Only built where the CPU has
:data:`dsq.native.AMX_NEEDS` (AMX-INT8: PyTorch's oneDNN packs int8 operands for its
micro-kernel only on AMX, so AMD CPUs and Intel ones before Sapphire Rapids, AVX-512 VNNI
included, use ``torch._int_mm``; :func:`status` says which and why, quietly: that is no
fault). Where it should build but does not (no compiler, no headers), one line says
so with the path of the compiler's output, and :func:`scaled_mm` returns None (callers use
``torch._int_mm``).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from torch import Tensor

from dsq.native import Library

PACK_NB = 64
"""Columns per block of a packed ``B`` (the driver's and the quantization kernels' layout:
``DSQ_PACK_NB`` of ``dsq/csrc/dsq_common.h``, checked against the loaded driver)."""
MAX_K = 1 << 16
"""Longest reduction: int32 holds K products of |code| <= 128 when K * 2^14 < 2^31."""

_OUT = {torch.float32: 0, torch.bfloat16: 1}


def _options() -> dict:
    """Flags and libraries of the driver: the installed PyTorch's headers and libraries."""
    root = Path(torch.__file__).parent
    inc, lib = root / "include", root / "lib"
    if not (inc / "ATen" / "native" / "CPUBlas.h").is_file():
        raise RuntimeError(f"PyTorch headers not found under {inc}")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    flags = ("-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(inc))
    libs = (f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}")
    return {"flags": flags, "libs": libs, "key": torch.__version__}


def _setup(so: ctypes.CDLL, isa: str) -> None:
    L, P, I = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    so.dsq_amx_ready.restype = I
    so.dsq_gemm_s8.restype = None
    so.dsq_gemm_s8.argtypes = [L, L, L, P, L, P, L, L, P, L, P, L, P, P, L, I, I, I]
    so.dsq_pack_s8.restype = None
    so.dsq_pack_s8.argtypes = [L, L, P, L, L, P, I]
    so.dsq_pack_block_n.restype = L
    if so.dsq_pack_block_n() != PACK_NB:
        raise RuntimeError(f"driver packs blocks of {so.dsq_pack_block_n()} columns, the "
                           f"quantization kernels {PACK_NB}")
    if not so.dsq_amx_ready():
        raise RuntimeError("PyTorch's oneDNN cannot pack int8 operands on this CPU")


def _unavailable() -> str | None:
    from dsq.native import AMX_NEEDS, cpu_flags

    if os.environ.get("DSQ_AMX_GEMM", "1").strip() in ("0", "false", "no", "off"):
        return "disabled by DSQ_AMX_GEMM=0"
    missing = [f for f in AMX_NEEDS if f not in cpu_flags()]
    return f"this CPU has no {', '.join(missing)}" if missing else None


LIBRARY = Library("amx_gemm", ("amx_gemm.cpp", "dsq_common.h"), what="dsq AMX GEMM driver",
                  fallback="torch._int_mm", setup=_setup, cxx=True, options=_options,
                  isa="amx", unavailable=_unavailable)
"""The driver's native library (:mod:`dsq.native`; variant ``amx``:
:data:`dsq.native.AMX_FLAGS`)."""


def build_variant(isa: str = "amx") -> ctypes.CDLL:
    """The driver, built (cached) and checked; raises :class:`dsq.native.BuildError`, or
    RuntimeError where it cannot serve (no PyTorch headers, no AMX for oneDNN)."""
    return LIBRARY.variant(isa)


def library() -> ctypes.CDLL | None:
    """The compiled driver, built on first use on CPUs with AMX-INT8; None elsewhere (see
    :func:`status`), or with one line naming the fallback where the build fails."""
    return LIBRARY.load()


def status() -> str:
    """Which integer GEMM runs here and why, e.g. ``torch._int_mm (this CPU has no amx_int8)``."""
    return ("dsq AMX driver (oneDNN brgemm)" if available()
            else f"torch._int_mm ({LIBRARY.choice().reason})")


def int8_outlook(flags=None) -> tuple[bool, str]:
    """Whether integer GEMMs are expected to beat the fastest float GEMM on a CPU with
    ``flags`` (default: this one's), and the hardware that decides it, as one clause. From the
    measurements in docs/performance.md (``torch._int_mm`` against fp32 and bf16
    GEMMs at ``dsq bench linear``'s shapes)."""
    from dsq.native import cpu_flags, has_native_bf16, int8_units

    f = cpu_flags() if flags is None else frozenset(flags)
    unit = int8_units(f)
    if unit == "amx_int8":
        return True, "AMX-INT8 tiles (dsq's GEMM driver)"
    if unit:
        return True, (f"{unit} int8 dot products in torch._int_mm (oneDNN; no AMX for dsq's "
                      f"driver)")
    if "avx2" in f:
        base = "bf16" if has_native_bf16(f) else "fp32 (bf16 is emulated here)"
        return True, (f"no int8 dot-product unit (VNNI/AMX): torch._int_mm widens int8 products "
                      f"with AVX2, still ahead of {base} GEMMs")
    return False, ("no AVX2: torch._int_mm has no vector int8 kernel on this CPU and runs "
                   "slower than fp32 GEMMs")


def has_amx_int8() -> bool:
    """Whether the CPU (``/proc/cpuinfo`` flags) has AMX-INT8 tiles."""
    from dsq.native import cpu_flags

    return "amx_int8" in cpu_flags()


def available() -> bool:
    return library() is not None


def _scale_ok(s: Tensor, n: int) -> bool:
    return (s.device.type == "cpu" and s.dtype == torch.float32 and s.is_contiguous()
            and s.numel() in (1, n))


def can_take(k: int) -> bool:
    """Whether a GEMM reducing over ``k`` runs here (so its ``B`` may be packed in advance)."""
    return k % 4 == 0 and 0 < k <= MAX_K and available()


def pack(b: Tensor) -> Tensor:
    """``b[K, N]`` int8 (any strides with a unit one) as the flat packed ``B`` the driver reads
    (the layout :func:`dsq.quant.cpu_kernels.codes` writes with ``packed=True``)."""
    if b.device.type != "cpu" or b.dtype != torch.int8 or b.dim() != 2:
        raise ValueError(f"pack needs a 2-D int8 CPU tensor, got {tuple(b.shape)} {b.dtype} "
                         f"on {b.device}")
    K, N = b.shape
    if K % 4 or not 0 < K <= MAX_K:
        raise ValueError(f"pack needs K % 4 == 0 and 0 < K <= {MAX_K}, got K={K}")
    lib = library()
    if lib is None:
        raise RuntimeError(f"no AMX GEMM driver here ({LIBRARY.choice().reason})")
    if b.stride(1) != 1 and b.stride(0) != 1:
        b = b.contiguous()
    out = torch.empty(K * N, dtype=torch.int8)
    lib.dsq_pack_s8(K, N, b.data_ptr(), b.stride(0), b.stride(1), out.data_ptr(),
                          torch.get_num_threads())
    return out


def scaled_mm(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None,
              dtype: torch.dtype, transpose: bool = False,
              out_shape: tuple[int, ...] | None = None,
              b_shape: tuple[int, int] | None = None) -> Tensor | None:
    """``(a @ b) * row_scale * col_scale (+ bias)`` in ``dtype`` (``.t()`` of it, contiguous, with
    ``transpose``), or None when these operands do not fit the driver (then use ``int_mm`` +
    ``rescale``): ``a[M, K]`` int8 with unit column stride, ``b[K, N]`` int8 row-major or
    column-major (or, with ``b_shape=(K, N)``, already packed: see :func:`pack`), ``K`` a
    multiple of 4 up to 65536, fp32 scales of ``M``/``N`` (or 1) elements, ``bias`` of
    ``dtype``, ``dtype`` fp32 or bf16, CPU tensors."""
    packed = b_shape is not None
    if a.dim() != 2 or b.dim() != (1 if packed else 2) or a.dtype != torch.int8 \
            or b.dtype != torch.int8:
        return None
    M, K = a.shape
    N = b_shape[1] if packed else b.shape[1]
    if (a.device.type != "cpu" or b.device.type != "cpu" or dtype not in _OUT
            or K % 4 or not 0 < K <= MAX_K or M == 0 or N == 0
            or (b_shape[0] if packed else b.shape[0]) != K
            or a.stride(1) != 1 or a.stride(0) < K
            or (packed and (b.numel() != K * N or not b.is_contiguous()))
            or (not packed and not (b.stride(1) == 1 or b.stride(0) == 1))
            or not _scale_ok(row_scale, M) or not _scale_ok(col_scale, N)
            or (bias is not None and (bias.dtype != dtype or not bias.is_contiguous()
                                      or bias.device.type != "cpu"
                                      or bias.numel() != N))):
        if packed:
            raise ValueError("a packed B operand that the AMX GEMM driver cannot take")
        return None
    lib = library()
    if lib is None:
        if packed:
            raise RuntimeError("a packed B operand but no AMX GEMM driver")
        return None
    out = torch.empty((N, M) if transpose else (out_shape or (M, N)), dtype=dtype)
    sbk, sbn = (0, 0) if packed else (b.stride(0), b.stride(1))
    lib.dsq_gemm_s8(M, N, K, a.data_ptr(), a.stride(0), b.data_ptr(), sbk, sbn,
                    row_scale.data_ptr(), int(row_scale.numel() > 1), col_scale.data_ptr(),
                    int(col_scale.numel() > 1), None if bias is None else bias.data_ptr(),
                    out.data_ptr(), M if transpose else N, _OUT[dtype], int(transpose),
                    torch.get_num_threads())
    return out
