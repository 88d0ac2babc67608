"""FP8 GEMMs of ``quant.compute: fp8``: ``torch._scaled_mm`` on CUDA GPUs of compute capability
8.9+ (Ada, Hopper, Blackwell), for operands quantized to FP8 with one scale per tensor or per
row along the GEMM's reduced dimension (:mod:`dsq.quant.floatfmt`). Elsewhere (the CPU, older
GPUs, shapes or dtypes ``_scaled_mm`` refuses) :func:`scaled_mm` returns None and the caller runs
the simulated GEMM; :func:`fp8_outlook` is the start-up line's account of which it is.

The product is that of the same codes and scales as the simulation; ``_scaled_mm`` multiplies by
the reciprocal scales ``1 / s`` (fp32) and accumulates in its own order, so results agree with the
simulated GEMM to the output dtype's rounding, not bit for bit.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dsq.quant.floatfmt import FloatQTensor

MIN_CAPABILITY = (8, 9)


@functools.lru_cache(maxsize=8)
def fp8_outlook(device: str) -> tuple[bool, str]:
    """Whether ``device`` runs FP8 GEMMs (``torch._scaled_mm``), and a phrase saying so."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False, "on CPU every floating-point format is simulated (float GEMMs)"
    cap = torch.cuda.get_device_capability(torch.device(device))
    name = torch.cuda.get_device_name(torch.device(device))
    if cap < MIN_CAPABILITY or not hasattr(torch, "_scaled_mm"):
        return False, (f"{name} (compute capability {cap[0]}.{cap[1]}) has no FP8 GEMMs "
                       f"(8.9+ needed): FP8 GEMMs are simulated")
    return True, f"FP8 GEMMs: torch._scaled_mm on {name} (compute capability {cap[0]}.{cap[1]})"


def _operand(q: FloatQTensor, transposed: bool, left: bool):
    """``(codes, scale)`` as ``_scaled_mm`` takes the left (row-major, ``[M, K]``, scale
    ``[M, 1]``) or right (column-major ``[K, N]``, scale ``[1, N]``) operand; None where a row
    scale would lie along the reduced dimension."""
    if q is None or not q.fmt.is_float or not q.fmt.fp8 or q.fmt.scaling not in (
            "tensor", "channel", "token") or q.codes.dim() != 2:
        return None
    codes, inv = q.codes, (1.0 / q.scale).float()
    per_row = inv.dim() > 0
    if left:
        if per_row and transposed:
            return None
        return (codes.t() if transposed else codes).contiguous(), inv
    if per_row and not transposed:
        return None
    # right operand [K, N], column-major: the transpose of a row-major [N, K]
    mat = codes.t() if transposed else codes.t().contiguous().t()
    return mat, inv.t() if per_row else inv


def scaled_mm(a: tuple, b: tuple, dtype: torch.dtype) -> Tensor | None:
    """``op(a) @ op(b)`` from FP8 codes, ``a``/``b`` being ``(FloatQTensor, transposed)`` with
    ``op`` the cast or its transpose; None where it cannot run here (see the module docstring)."""
    qa, qb = a[0], b[0]
    if qa is None or qb is None or not qa.codes.is_cuda or not fp8_outlook(
            str(qa.codes.device))[0]:
        return None
    A, B = _operand(qa, a[1], True), _operand(qb, b[1], False)
    if A is None or B is None:
        return None
    (ma, sa), (mb, sb) = A, B
    if ma.shape[1] % 16 or mb.shape[1] % 16:
        return None
    try:
        return torch._scaled_mm(ma, mb, scale_a=sa, scale_b=sb, out_dtype=dtype)
    except (RuntimeError, ValueError):  # a dtype/scale combination this build refuses
        return None
