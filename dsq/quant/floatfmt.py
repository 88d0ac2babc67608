"""Floating-point formats of the quantizer: FP8 (tensor, row, block scales), the OCP MX formats
(MXFP8, MXFP6, MXFP4) and NVFP4, beside the integer formats of :mod:`dsq.quant.format`.

A :class:`FloatFormat` maps an operand to low-precision floating-point elements times scales,
each scale shared by the elements of a row, a block or the whole tensor, all recomputed from the
current tensor at every call (no calibration, as for the integer formats):

============================ ======= ================= ======================================
string                       element block (reduction  scale
                                     dimension)
============================ ======= ================= ======================================
``fp8e4m3:tensor``           E4M3    whole tensor      fp32 ``s = 448 / amax``
``fp8e4m3:token|channel``    E4M3    one row           fp32 ``s = 448 / amax(row)``
``fp8e4m3:block<N>``         E4M3    1 x N (weights:   fp32 ``s = 448 / amax(block)``
                                     N x N)
``fp8e5m2:...``              E5M2    as above          ``57344 / amax``
``mxfp8`` / ``mxfp8e5m2``    E4M3/   1 x 32            E8M0 (power of two),
                             E5M2                      ``2^(floor(log2 amax) - emax_elem)``
``mxfp6``                    E2M3    1 x 32            E8M0
``mxfp4``                    E2M1    1 x 32            E8M0
``nvfp4`` (``:2d``)          E2M1    1 x 16 (16 x 16)  E4M3 ``amax / 6 / t`` times one fp32
                                                       tensor scale ``t = amax / (448 * 6)``
============================ ======= ================= ======================================

FP8 computes as torchao's float8 and Transformer Engine do: ``q = fp8((x s).clamp(-m, m))``,
``x_hat = q / s`` with ``s = m / amax`` in fp32. MX follows the OCP MX specification v1.0 (the
scale's exponent is ``floor(log2 amax)`` less the element's largest exponent, clamped to E8M0's
``[-127, 127]``; elements saturate at the format's largest value), and NVFP4 NVIDIA's two-level
recipe; both compute the bits of torchao's reference quantizers (``to_mx``, ``nvfp4_quantize``
and their dequantize; tests/unit/quant/test_floatfmt.py). Elements round to the nearest value
(ties to even); ``:stochastic`` rounds to one of the two neighbouring values with probabilities
that make it unbiased (for gradients, as NVIDIA's NVFP4 recipe does).

Blocks lie along the last dimension of a 2-D operand ``[rows, cols]`` (tokens or output channels
by features): :mod:`dsq.quant.plan` passes each GEMM's operand with that GEMM's reduction
dimension last (the column copies of Transformer Engine). ``square`` (``:2d``; always for
``fp8...:block<N>`` weights) makes ``N x N`` tiles, so a weight and its transpose share one
quantization. A last dimension that is not a multiple of the block is padded with zeros for the
statistics (a short last block).

Codes are stored one per byte as ``float8_e4m3fn`` (``float8_e5m2`` for E5M2 elements): every
E2M3 and E2M1 value is an E4M3 value. A zero block or tensor quantizes to zeros; non-finite inputs
give non-finite outputs, never finite ones. Under tensor parallelism ``reduce`` max-reduces the
statistic that may span shards, the tensor amax (tensor scaling, NVFP4's tensor scale) or the row
amax (row scaling); blocks must not straddle shards (``dsq config`` refuses those that would).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

ELEMENTS = {  # element: (exponent bits, mantissa bits, largest value, storage dtype)
    "e4m3": (4, 3, 448.0, torch.float8_e4m3fn),
    "e5m2": (5, 2, 57344.0, torch.float8_e5m2),
    "e2m3": (2, 3, 7.5, torch.float8_e4m3fn),
    "e2m1": (2, 1, 6.0, torch.float8_e4m3fn),
}
SCALINGS = ("tensor", "channel", "token", "block", "mx", "nvfp4")
_FP8_SCALINGS = ("tensor", "channel", "token", "block")
MX_BLOCK, NV_BLOCK = 32, 16
_F32_TINY = torch.finfo(torch.float32).tiny
_F32_MAX = torch.finfo(torch.float32).max
_E4M3_TINY = torch.finfo(torch.float8_e4m3fn).tiny
_MX_NAMES = {"mxfp8": "e4m3", "mxfp8e4m3": "e4m3", "mxfp8e5m2": "e5m2", "mxfp6": "e2m3",
             "mxfp6e2m3": "e2m3", "mxfp4": "e2m1"}
_SHORT = ("e.g. 'fp8e4m3:tensor', 'fp8e4m3:token', 'fp8e5m2:channel', 'fp8e4m3:block128', "
          "'mxfp8', 'mxfp8e5m2', 'mxfp6', 'mxfp4', 'nvfp4', 'nvfp4:2d:stochastic'")


def is_float_spec(s: str) -> bool:
    """Whether the head of a format string names a floating-point format."""
    return s.strip().lower().split(":")[0].startswith(("fp", "mx", "nvfp"))


@dataclass(frozen=True)
class FloatFormat:
    element: str = "e4m3"
    """e4m3 | e5m2 | e2m3 | e2m1."""
    scaling: str = "tensor"
    """tensor | channel | token | block (FP8) | mx | nvfp4."""
    block_size: int | None = None
    """Elements per block along the reduction dimension (block, mx: 32, nvfp4: 16)."""
    rounding: str = "nearest"
    """nearest (ties to even) | stochastic."""
    square: bool = False
    """Blocks of block_size x block_size (weights only)."""

    def __post_init__(self):
        if self.element not in ELEMENTS:
            raise ValueError(f"element {self.element!r} is unknown: use one of "
                             f"{', '.join(ELEMENTS)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling {self.scaling!r} is unknown: use one of "
                             f"{', '.join(SCALINGS)}")
        fixed = {"mx": MX_BLOCK, "nvfp4": NV_BLOCK}.get(self.scaling)
        if fixed is not None:
            object.__setattr__(self, "block_size", fixed)
        bs = self.block_size
        if self.scaling == "block":
            if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
                raise ValueError(f"block scaling needs a positive block size, got {bs!r} "
                                 f"(e.g. 'fp8e4m3:block128')")
        elif fixed is None and bs is not None:
            raise ValueError(f"a block size applies to block scaling, not {self.scaling!r}")
        if self.scaling in _FP8_SCALINGS and not self.fp8:
            raise ValueError(f"{self.element} elements come with mx or nvfp4 scales; "
                             f"FP8 formats are e4m3 and e5m2")
        if self.scaling == "nvfp4" and self.element != "e2m1":
            raise ValueError("nvfp4 has e2m1 elements")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding {self.rounding!r} is unknown: use nearest or stochastic")
        if self.square and self.scaling not in ("block", "nvfp4"):
            raise ValueError(f"square (2d) blocks apply to fp8 block and nvfp4 scaling, not "
                             f"{self.scaling!r}")

    # -- the interface shared with QuantFormat --------------------------------------------
    is_float = True
    symmetric = True
    min_range = None

    @property
    def fp8(self) -> bool:
        return self.element in ("e4m3", "e5m2")

    @property
    def granularity(self) -> str:
        """tensor | channel | token | group (blocks), as for the integer formats."""
        return "group" if self.block_size else self.scaling

    @property
    def group_size(self) -> int | None:
        return self.block_size

    @property
    def bits(self) -> int:
        """Bits of one element (the scales are extra: :attr:`bits_per_element`)."""
        e, m, _, _ = ELEMENTS[self.element]
        return 1 + e + m

    @property
    def max(self) -> float:
        return ELEMENTS[self.element][2]

    def bits_per_element(self, cols: int | None = None, rows: int | None = None) -> float:
        """Storage bits per element, the scales included: element bits plus the scale bits over
        the elements that share one (8 for E8M0 and E4M3 scales, 32 for fp32). ``cols``/``rows``
        (the reduction dimension and the other): for per-row and per-tensor scales; without
        them those scales count as free (a large tensor's)."""
        n = self.block_size * (self.block_size if self.square else 1) if self.block_size else None
        scale_bits = 8 if self.scaling in ("mx", "nvfp4") else 32
        if self.scaling in ("channel", "token"):
            per = scale_bits / cols if cols else 0.0
        elif self.scaling == "tensor":
            per = scale_bits / (cols * rows) if cols and rows else 0.0
        else:
            per = scale_bits / n
            if self.scaling == "nvfp4" and cols and rows:
                per += 32 / (cols * rows)
        return self.bits + per

    def __str__(self) -> str:
        if self.scaling == "mx":
            head = {"e4m3": "mxfp8", "e5m2": "mxfp8e5m2", "e2m3": "mxfp6",
                    "e2m1": "mxfp4"}[self.element]
            parts = [head]
        elif self.scaling == "nvfp4":
            parts = ["nvfp4"] + (["2d"] if self.square else [])
        else:
            gran = f"block{self.block_size}" if self.scaling == "block" else self.scaling
            parts = [f"fp8{self.element}", gran] + (["2d"] if self.square else [])
        if self.rounding != "nearest":
            parts.append(self.rounding)
        return ":".join(parts)

    @classmethod
    def parse(cls, spec: str) -> FloatFormat:
        s = spec.strip().lower()
        head, *rest = s.split(":")
        kw: dict = {}
        if head in _MX_NAMES:
            kw.update(element=_MX_NAMES[head], scaling="mx")
        elif head == "nvfp4":
            kw.update(element="e2m1", scaling="nvfp4")
        elif m := re.fullmatch(r"fp8(e4m3|e5m2)?", head):
            kw["element"] = m.group(1) or "e4m3"
        else:
            raise ValueError(f"{spec!r}: {head!r} is not a floating-point format ({_SHORT})")
        for part in rest:
            if part in ("tensor", "channel", "token") and "scaling" not in kw:
                kw["scaling"] = part
            elif (b := re.fullmatch(r"block(\d+)", part)) and "scaling" not in kw:
                kw.update(scaling="block", block_size=int(b.group(1)))
            elif part in ("nearest", "stochastic") and "rounding" not in kw:
                kw["rounding"] = part
            elif part == "2d" and "square" not in kw:
                kw["square"] = True
            else:
                raise ValueError(
                    f"{spec!r}: unknown or repeated part {part!r}; parts are a scaling (fp8: "
                    f"tensor, channel, token, block<N>), 2d (square blocks of weights), "
                    f"nearest|stochastic ({_SHORT})")
        if "scaling" not in kw:
            raise ValueError(f"{spec!r}: an fp8 format needs a scaling: tensor, channel, token "
                             f"or block<N> ({_SHORT})")
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{spec!r}: {e}") from None


@dataclass
class FloatQTensor:
    """Elements (one per byte, float8 storage) and their scales: ``x_hat = codes * scale``
    (FP8: ``codes / scale``, as its scale multiplies ``x`` before the cast)."""

    codes: Tensor
    """``[R, C]``, the operand's 2-D view (block formats: padded to whole blocks)."""
    scale: Tensor
    """fp32, broadcastable to the blocked codes view."""
    fmt: FloatFormat
    dtype: torch.dtype
    shape: torch.Size
    """Shape of the tensor that was quantized."""
    values: Tensor | None = None
    """The codes as fp32 (the quantizer's rounded values, the same numbers), kept by
    :func:`quantize_float` so that :meth:`dequantize` need not decode the float8 bytes again;
    None (codes restored from a checkpoint or saved for backward): decoded from ``codes``."""

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        if self.values is None:  # a fresh tensor: scaled in place
            v = _blocked(self.codes.to(torch.float32), self.fmt)
            v = v.div_(self.scale) if self.fmt.scaling in _FP8_SCALINGS else v.mul_(self.scale)
        else:
            v = _blocked(self.values, self.fmt)
            v = v / self.scale if self.fmt.scaling in _FP8_SCALINGS else v * self.scale
        return _unblocked(v, self.fmt, self.shape).to(dtype or self.dtype)

    @property
    def zero_point(self):
        return None


def _pad(x: Tensor, fmt: FloatFormat) -> Tensor:
    n = fmt.block_size
    if not n:
        return x
    pc = -x.shape[1] % n
    pr = -x.shape[0] % n if fmt.square else 0
    return torch.nn.functional.pad(x, (0, pc, 0, pr)) if pc or pr else x


def _blocked(x2: Tensor, fmt: FloatFormat) -> Tensor:
    """A padded 2-D tensor viewed so that one scale is shared along the block dims."""
    n = fmt.block_size
    if not n:
        return x2
    R, C = x2.shape
    if fmt.square:
        return x2.reshape(R // n, n, C // n, n)
    return x2.reshape(R, C // n, n)


def _unblocked(v: Tensor, fmt: FloatFormat, shape: torch.Size) -> Tensor:
    R, C = _rows_cols(shape)
    if fmt.block_size:
        v = v.reshape(v.shape[0] * v.shape[1], -1) if fmt.square else v.flatten(-2)
        v = v[:R, :C]
    return v.reshape(shape)


def _rows_cols(shape) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _amax(xb: Tensor, fmt: FloatFormat) -> Tensor:
    """The largest magnitude per scale group, as ``xb.abs().amax(...)`` (NaN propagates) but
    read as ``max(amax, -amin)``: two reductions, no full-size ``abs`` copy."""
    if fmt.scaling == "tensor":
        dims = None
    elif fmt.scaling in ("channel", "token") or not fmt.square:
        dims = (-1,)
    else:
        dims = (1, 3)
    if dims is None:
        hi, lo = xb.amax(), xb.amin()
    else:  # N x N tiles: the contiguous dim first, then across the tile's rows
        hi = xb.amax(dim=dims[-1], keepdim=True)
        lo = xb.amin(dim=dims[-1], keepdim=True)
        if len(dims) == 2:
            hi, lo = hi.amax(dim=dims[0], keepdim=True), lo.amin(dim=dims[0], keepdim=True)
    return torch.maximum(hi, lo.neg_()).abs_()  # abs_: an all -0.0 group reads +0.0


def _round_grid(v: Tensor, fmt: FloatFormat, generator) -> Tensor:
    """``v`` (fp32, within ``[-max, max]``, a fresh tensor this function may overwrite) rounded
    to the element grid: nearest (ties to even) or stochastic. The grid step at ``|v|`` is
    ``2^(max(e, emin) - mbits)``, ``e`` its binary exponent, read from fp32's exponent bits (an
    fp32 subnormal or zero reads as 0, which the clamp lifts to ``2^emin``).

    Nearest adds and subtracts ``M = 1.5 * 2^23 * step``: ``v + M`` lies in the binade whose fp32
    spacing is ``step`` (``|v| <= 2^(mbits+1) step``), so fp32's own ties-to-even addition rounds
    ``v / step`` to the nearest integer (``M / step`` is even), and ``- M`` is exact; the sign is
    copied back so that negative values that round to zero stay ``-0``. Stochastic computes
    ``floor(v / step + r) * step`` with ``r = torch.rand`` (exact: ``step`` is a power of two).
    A value on the grid's largest point stays there, so no clamp is needed."""
    ebits, mbits, _, _ = ELEMENTS[fmt.element]
    emin = 2 - (1 << (ebits - 1))
    step = (v.view(torch.int32) & 0x7F800000).view(torch.float32).clamp_min_(2.0**emin)
    if fmt.rounding == "stochastic":
        step.mul_(2.0**-mbits)
        r = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        return v.div_(step).add_(r).floor_().mul_(step)
    magic = step.mul_(1.5 * 2.0 ** (23 - mbits))
    return (v + magic).sub_(magic).copysign_(v)


@torch.no_grad()
def quantize_float(x: Tensor, fmt: FloatFormat, *, reduce=None, generator=None,
                   check_finite: bool = False, name: str = "tensor") -> FloatQTensor:
    """Quantize ``x`` to ``fmt`` along its last dimension (see the module docstring)."""
    shape = x.shape
    R, C = _rows_cols(shape)
    # contiguous: a column copy (a transposed view) is laid out once, so that the block
    # reductions and passes below read memory in order
    xp = _pad(x.reshape(R, C).to(torch.float32), fmt).contiguous()
    xb = _blocked(xp, fmt)
    m = fmt.max
    if fmt.scaling == "mx":
        amax = _amax(xb, fmt)
        # E8M0: 2^(floor(log2 amax) - emax_elem), the exponent read from fp32's bits
        # (zero and subnormal maxima read as -127), clamped to E8M0's finite range
        emax = int(math.floor(math.log2(m)))
        exp = ((amax.view(torch.int32) >> 23) & 0xFF) - 127
        scale = torch.ldexp(torch.ones_like(amax), (exp - emax).clamp(-127, 127))
        scale = torch.where(torch.isfinite(amax), scale, amax)  # inf/nan blocks stay so
        v = (xb / scale).clamp_(-m, m)
    elif fmt.scaling == "nvfp4":
        amax = _amax(xb, fmt)
        tamax = amax.amax()  # the max of the block maxima: no second pass over x
        if reduce is not None:
            tamax = reduce(tamax)
        # an all-zero tensor gets t = 1 (zeros), and t >= 2^-120 keeps 1 / t / blk finite
        t = torch.where(tamax > 0, tamax / (448.0 * 6.0), 1.0).clamp_min(2.0**-120)
        blk = ((amax / 6.0) / t).clamp(_E4M3_TINY, 448.0).to(torch.float8_e4m3fn)
        blk = blk.to(torch.float32)
        v = (xb * ((1.0 / t) / blk)).clamp_(-6.0, 6.0)
        scale = t * blk
    else:  # fp8: s = m / amax, x_hat = q / s
        amax = _amax(xb, fmt)
        if reduce is not None and fmt.scaling != "block":
            amax = reduce(amax)
        scale = (m / amax.clamp_min(_F32_TINY)).clamp_max(_F32_MAX)
        v = (xb * scale).clamp_(-m, m)
    if check_finite and not bool(torch.isfinite(amax).all()):
        raise FloatingPointError(f"{name}: the input of the {fmt} quantizer holds inf or nan")
    # FP8 nearest, E5M2 or on a GPU: the float8 cast rounds (its decode is cheap there).
    # Otherwise the grid is rounded here, E4M3 on CPUs too (the same numbers as the cast, which
    # is then exact), so that the fp32 values are at hand for dequantize: decoding
    # float8_e4m3fn bytes is a slow scalar loop on CPUs
    store = ELEMENTS[fmt.element][3]
    if fmt.fp8 and fmt.rounding == "nearest" and (store is torch.float8_e5m2
                                                  or v.device.type != "cpu"):
        codes, values = v.to(store).reshape(xp.shape), None
    else:
        values = _round_grid(v, fmt, generator).reshape(xp.shape)
        codes = values.to(store)
    return FloatQTensor(codes, scale, fmt, x.dtype, shape, values)
