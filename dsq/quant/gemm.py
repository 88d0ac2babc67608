"""The integer GEMM of the int8 path and its epilogue: ``int_mm`` (int8 x int8 -> int32),
``rescale`` (``acc * row_scale * col_scale (+ bias)`` in the output dtype) and ``scaled_mm``
(both, chunked or fused into the AMX driver's tiles). The implementation of the rescale follows
:func:`dsq.quant.fused.kernel` (eager, C or compiled), as the quantization kernels do.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from dsq.quant.fused import _FUSED_DTYPES, _compiled_kernel, _impl

_K_CHUNK = 1 << 16
"""int32 holds K products of |code| <= 128 when K * 2^14 < 2^31; longer reductions are chunked."""


@contextlib.contextmanager
def counting_int_gemms():
    """Record the integer GEMMs run inside the block, ``torch._int_mm`` calls and AMX driver
    calls alike, as ``(M, K, N)`` in the yielded list (tests and benchmarks use it to check
    that a path really multiplies integers)."""
    from dsq.quant import cpu_gemm

    calls: list[tuple[int, int, int]] = []
    real_mm, real_amx = torch._int_mm, cpu_gemm.scaled_mm

    def mm(a, b, *args, **kwargs):
        calls.append((a.shape[0], a.shape[1], b.shape[1]))
        return real_mm(a, b, *args, **kwargs)

    def amx(a, b, *args, **kwargs):
        y = real_amx(a, b, *args, **kwargs)
        if y is not None:
            n = kwargs["b_shape"][1] if kwargs.get("b_shape") else b.shape[1]
            calls.append((a.shape[0], a.shape[1], n))
        return y

    torch._int_mm, cpu_gemm.scaled_mm = mm, amx
    try:
        yield calls
    finally:
        torch._int_mm, cpu_gemm.scaled_mm = real_mm, real_amx


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a[M, K] @ b[K, N]`` for int8 codes: exact int32 (int64 past ``K = 2^16``) products.

    CPU ``torch._int_mm`` takes any shape and layout (a transposed ``a`` at full speed). CUDA's
    needs a row-major ``a``, ``M > 16`` and ``K``, ``N`` multiples of 8: operands are made
    contiguous and zero-padded there (:func:`cuda_operands`), the result cut.
    """
    M, K = a.shape
    N = b.shape[1]
    if K > _K_CHUNK:
        out = torch.zeros(M, N, dtype=torch.int64, device=a.device)
        for k in range(0, K, _K_CHUNK):
            out += int_mm(a[:, k:k + _K_CHUNK], b[k:k + _K_CHUNK])
        return out
    if a.is_cuda:
        a, b = cuda_operands(a, b)
        return torch._int_mm(a, b)[:M, :N]
    return torch._int_mm(a, b)


def cuda_operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a[M, K]``, ``b[K, N]`` as CUDA's ``torch._int_mm`` takes them: ``a`` row-major,
    ``M > 16``, ``K`` and ``N`` multiples of 8, zero-padded where a shape falls short (zero
    rows and columns add nothing to the products; the caller cuts the result to ``[M, N]``).
    Device-agnostic, so its arithmetic is tested on the CPU too."""
    M, K = a.shape
    N = b.shape[1]
    pm, pk, pn = max(0, 17 - M), -K % 8, -N % 8
    a = a.contiguous()
    if pm or pk or pn:
        a = torch.nn.functional.pad(a, (0, pk, 0, pm))
        b = torch.nn.functional.pad(b, (0, pn, 0, pk))
    return a, b


def rescale(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None,
            dtype: torch.dtype, transpose: bool = False,
            out_shape: tuple[int, ...] | None = None, out: Tensor | None = None) -> Tensor:
    """``acc * row_scale * col_scale (+ bias)`` in ``dtype``; ``transpose`` returns its ``.t()``
    contiguous. Scales broadcast (``[M, 1]``, ``[1, N]`` or 0-dim); the product is in fp32
    (fp64 for fp64 scales). ``out_shape`` (``[..., N]``, not with ``transpose``): the result is
    a fresh tensor of that shape, not a view (callers may modify a layer's output in place).
    ``out``: write into this 2-D view instead (see :func:`scaled_mm`)."""
    M, N = acc.shape
    impl = _impl(torch.empty(0, 0, dtype=dtype, device=acc.device))
    if impl == "cpp":
        from dsq.quant import cpu_kernels as ck

        if (acc.dtype == torch.int32 and acc.is_contiguous()
                and row_scale.dtype == col_scale.dtype == torch.float32
                and row_scale.numel() in (1, M) and col_scale.numel() in (1, N)
                and row_scale.is_contiguous() and col_scale.is_contiguous()
                and (bias is None or (bias.dtype == dtype and bias.is_contiguous()))
                and (out is None or out.stride(-1) == 1)):
            return ck.rescale(acc, row_scale, col_scale, bias, dtype, transpose, out_shape, out)
        impl = "eager"
    if out_shape is not None and not transpose and out is None:
        acc = acc.view(out_shape)  # the elementwise ops then make a fresh tensor of that shape
        if row_scale.numel() > 1:
            row_scale = row_scale.view(*out_shape[:-1], 1)
    y = None
    if (impl == "compile" and dtype in _FUSED_DTYPES and row_scale.dtype == torch.float32
            and col_scale.dtype == torch.float32):
        if transpose and bias is None:
            y = _compiled_kernel("rescale_t")(acc, row_scale, col_scale, dtype)
        elif not transpose:
            y = (_compiled_kernel("rescale")(acc, row_scale, col_scale, dtype) if bias is None
                 else _compiled_kernel("rescale_bias")(acc, row_scale, col_scale, bias, dtype))
    if y is None:
        cdtype = torch.promote_types(row_scale.dtype, col_scale.dtype)
        y = acc.to(cdtype) * row_scale * col_scale
        if bias is not None:
            y = y + bias.to(cdtype)
        y = y.to(dtype)
        y = y.t().contiguous() if transpose else y
    if out is not None:
        return out.copy_(y)
    return y


_ACC_ELEMENTS = 1 << 22
"""int32 elements of one integer GEMM's accumulator (16 MiB): larger GEMMs run in row chunks."""


def scaled_mm(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor,
              bias: Tensor | None, dtype: torch.dtype, *, transpose: bool = False,
              out_shape: tuple[int, ...] | None = None,
              b_shape: tuple[int, int] | None = None) -> Tensor:
    """``rescale(int_mm(a, b), row_scale, col_scale, bias, dtype, transpose, out_shape)``, in
    chunks of ``a``'s rows so that the int32 accumulator stays within 16 MiB (an LM head's
    ``tokens x vocab`` int32 result would otherwise be twice its bf16 output, on top of it).

    With the ``cpp`` kernels on a CPU whose PyTorch can run oneDNN's int8 micro-kernel
    (AMX-INT8), the whole product is one call of :func:`dsq.quant.cpu_gemm.scaled_mm`: the
    rescale is the epilogue of each output tile and no int32 matrix is written. ``b_shape``:
    ``b`` is such a GEMM's packed ``B[K, N]`` (see :func:`quantize_cols`)."""
    if b_shape is not None or _impl(torch.empty(0, 0, dtype=dtype, device=a.device)) == "cpp":
        from dsq.quant import cpu_gemm

        y = cpu_gemm.scaled_mm(a, b, row_scale, col_scale, bias, dtype, transpose=transpose,
                               out_shape=out_shape, b_shape=b_shape)
        if y is not None:
            return y
    M, N = a.shape[0], b.shape[1]
    rows = max(64, _ACC_ELEMENTS // max(N, 1))
    if M > rows:  # equal chunks, not a remainder of a few rows
        chunks = -(-M // rows)
        rows = -(-M // chunks)
    if M <= rows:
        return rescale(int_mm(a, b), row_scale, col_scale, bias, dtype, transpose, out_shape)
    full = torch.empty((N, M) if transpose else (out_shape or (M, N)), dtype=dtype,
                       device=a.device)
    out2 = full if transpose else full.view(M, N)
    for m0 in range(0, M, rows):
        m1 = min(M, m0 + rows)
        rs = row_scale[m0:m1] if row_scale.numel() > 1 else row_scale
        rescale(int_mm(a[m0:m1], b), rs, col_scale, bias, dtype, transpose,
                out=out2[:, m0:m1] if transpose else out2[m0:m1])
    return full
