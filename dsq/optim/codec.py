"""QAdamW's state codec: the moments' number formats and their storage.

What a state holds and how it is read and written, independent of where pieces lie (the
layout, :mod:`dsq.optim.layout`) and of how the update runs (:mod:`dsq.optim.kernels`):
:class:`Fmt` (the formats of a param group), code sizes (:func:`code_len`,
:func:`code_bytes`), 4-bit packing (:func:`pack4` / :func:`unpack4`), the eager quantizer and
dequantizer of the moments (:func:`quantize_moments`, :func:`dequantize_m`,
:func:`dequantize_v_raw`), a flat tensor's zero state (:func:`new_state`), its dequantized
moments (:func:`dequantize_into`) and the per-element codes of a piece that resharding moves
(:func:`piece_codes` / :func:`pack_piece_codes`, :func:`moment_dtypes`).

Number formats (``Q`` = largest code): m is signed, ``Q = 2**(bits-1) - 1`` (127 or 7),
codes ``round(m / s)`` with ``s = absmax / Q``; 8-bit m codes are ``int8``, 4-bit ones are
stored as ``code + 8`` in a nibble. v is unsigned, ``Q = 2**bits - 1`` (255 or 15), codes
``round(v / s)`` with ``s = max / Q``, raised to 1 wherever ``v > 0`` so that a small second
moment never dequantizes to 0 (which would turn ``m / (sqrt(v) + eps)`` into ``m / eps``).
``v_signed`` (the study's code, kept to show its failure) quantizes v with the signed
symmetric quantizer instead: ``Q = 2**(bits-1) - 1`` (127 or 7), no raise to 1, so every v
below half a step becomes 0; eager kernel only.
With ``v_domain="sqrt"`` the code quantizes ``sqrt(v)`` instead (same linear quantizer, twice
the dynamic range in log terms, no extra work since the update needs ``sqrt(v)`` anyway).
4-bit codes are packed two per byte, element ``2k`` in the low nibble of byte ``k``.

``bits = 32`` (:data:`FP32`) keeps that moment in fp32 (one float per element, no scale) while
the other is quantized (the study's m8, m4 and v8 settings): the kernels read and write it in
place with the same operations, and the block maxima are those of the quantized moment only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Tuple

import torch

if TYPE_CHECKING:  # the layout depends on the codec, not the other way round
    from dsq.optim.layout import Layout, Piece

TINY = 1e-30
"""Lower clamp of a block maximum, so that scales and their inverses stay finite."""

FP32 = 32
"""``m_bits`` / ``v_bits`` of a moment that is not quantized (stored as fp32)."""


def qmax_m(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def qmax_v(bits: int) -> int:
    return (1 << bits) - 1


def code_len(n: int, bits: int) -> int:
    """Storage elements holding ``n`` values of a moment: int8/uint8 codes (4-bit: two per
    byte) or, for ``bits == 32``, fp32 values."""
    return (n + 1) // 2 if bits == 4 else n


def code_bytes(n: int, bits: int) -> int:
    """Bytes holding ``n`` values of a moment of ``bits`` bits (4-bit: two per byte)."""
    return code_len(n, bits) * (4 if bits == FP32 else 1)


class Fmt:
    """Static description of the moments' formats (bits 4, 8, or 32 = fp32), with where each
    moment lives in a state dict: ``m_key`` (``m_codes`` or ``m_fp32``) and its element size
    ``m_esize``; ``m_q``: m is quantized (has ``m_scales``). Likewise for v. ``v_sqrt`` only
    applies to a quantized v; ``v_signed``: v's codes use the signed range (the study's)."""

    __slots__ = ("m_bits", "v_bits", "v_sqrt", "v_signed", "m_q", "v_q", "m_key", "v_key",
                 "m_esize", "v_esize")

    def __init__(self, m_bits: int, v_bits: int, v_sqrt: bool, v_signed: bool = False):
        self.m_bits, self.v_bits = m_bits, v_bits
        self.m_q, self.v_q = m_bits != FP32, v_bits != FP32
        self.v_sqrt = bool(v_sqrt) and self.v_q
        self.v_signed = bool(v_signed) and self.v_q
        self.m_key = "m_codes" if self.m_q else "m_fp32"
        self.v_key = "v_codes" if self.v_q else "v_fp32"
        self.m_esize = 1 if self.m_q else 4
        self.v_esize = 1 if self.v_q else 4

    @classmethod
    def of(cls, group) -> "Fmt":
        """The formats of a QAdamW param group."""
        return cls(group["m_bits"], group["v_bits"], group["v_domain"] == "sqrt",
                   bool(group.get("v_signed", False)))


def unpack4(codes: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., k] -> uint8 [..., n] nibbles (n <= 2k along the last dim)."""
    lo = codes & 15
    hi = codes >> 4
    out = torch.stack((lo, hi), dim=-1).flatten(-2)
    return out[..., :n]


def pack4(nib: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] nibbles -> uint8 [..., ceil(n/2)]."""
    if nib.shape[-1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def dequantize_m(codes: torch.Tensor, n: int, bits: int, scale) -> torch.Tensor:
    if bits == FP32:
        return codes
    if bits == 8:
        q = codes.float()
    else:
        q = unpack4(codes, n).float() - 8.0
    return q * scale


def dequantize_v_raw(codes: torch.Tensor, n: int, bits: int, scale) -> torch.Tensor:
    if bits == FP32:
        return codes
    q = codes.float() if bits == 8 else unpack4(codes, n).float()
    return q * scale


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """a / b as a true division (PyTorch turns division by a CPU scalar into a * (1/b))."""
    if not torch.is_tensor(b):
        b = torch.full((1,), b, dtype=a.dtype, device=a.device)
    if not torch.is_tensor(a):
        a = torch.full((1,), a, dtype=b.dtype, device=b.device)
    return a / b


def quantize_moments(m, vq, am, av, fmt: Fmt):
    """Storage of m and of the stored v quantity ``vq`` from block maxima: codes and scales
    (an fp32 moment is stored as it is, with scale None and its maximum unused)."""
    cm, sm = _quant_m(m, am, fmt.m_bits) if fmt.m_q else (m, None)
    cv, sv = _quant_v(vq, av, fmt.v_bits, fmt.v_signed) if fmt.v_q else (vq, None)
    return cm, cv, sm, sv


def _quant_m(m, am, bits: int):
    Qm = float(qmax_m(bits))
    am = torch.clamp_min(am, TINY)
    qm = torch.clamp(torch.round(m * _div(Qm, am)), -Qm, Qm)
    if bits == 8:
        cm = qm.to(torch.int8)
    else:
        cm = pack4((qm + 8.0).to(torch.uint8))
    return cm, _div(am, Qm)


def _quant_v(vq, av, bits: int, signed: bool = False):
    Qv = float(qmax_m(bits) if signed else qmax_v(bits))
    av = torch.clamp_min(av, TINY)
    qv = torch.clamp(torch.round(vq * _div(Qv, av)), 0.0, Qv)
    if not signed:
        qv = torch.maximum(qv, (vq > 0).float())
    cv = qv.to(torch.uint8)
    if bits == 4:
        cv = pack4(cv)
    return cv, _div(av, Qv)


def new_state(lay: "Layout", fmt: Fmt, p: torch.Tensor) -> Dict:
    """Zero state of the flat tensor ``p`` (step 0). Unquantized tensors get ``torch.optim.AdamW``'s
    state (``exp_avg``/``exp_avg_sq`` shaped like ``p``); quantized ones codes and scales (or
    ``m_fp32`` / ``v_fp32`` for a 32-bit moment) and the fp32 moments of their fp32 pieces."""
    st: Dict = {"step": 0}
    dev = p.device
    if not lay.quantized:
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st
    m_dtype = {8: torch.int8, 4: torch.uint8, FP32: torch.float32}[fmt.m_bits]
    st[fmt.m_key] = torch.zeros(lay.m_code_len, device=dev, dtype=m_dtype)
    st[fmt.v_key] = torch.zeros(lay.v_code_len, device=dev,
                                dtype=torch.uint8 if fmt.v_q else torch.float32)
    if fmt.m_q:
        st["m_scales"] = torch.zeros(lay.n_scales, dtype=torch.float32, device=dev)
    if fmt.v_q:
        st["v_scales"] = torch.zeros(lay.n_scales, dtype=torch.float32, device=dev)
    st["exp_avg"] = torch.zeros(lay.n_fp32, dtype=torch.float32, device=dev)
    st["exp_avg_sq"] = torch.zeros(lay.n_fp32, dtype=torch.float32, device=dev)
    return st


def fp32_index(lay: "Layout", pc: "Piece") -> int:
    """Offset of an fp32 piece's moments in ``exp_avg`` (positional when unquantized)."""
    return pc.f_off if lay.quantized else pc.start


def dequantize_into(st: Dict, lay: "Layout", fmt: Fmt, m: torch.Tensor, v: torch.Tensor) -> None:
    """Write the dequantized fp32 moments of a flat tensor's state into ``m`` and ``v``."""
    for pc in lay.pieces:
        a, n = pc.start, pc.length
        if pc.kind == "fp32":
            f = fp32_index(lay, pc)
            m[a:a + n] = st["exp_avg"].view(-1)[f:f + n]
            v[a:a + n] = st["exp_avg_sq"].view(-1)[f:f + n]
            continue
        qm, qv = piece_codes(st, pc, fmt)
        m[a:a + n] = qm.float() * _piece_scales(st["m_scales"], pc, n) if fmt.m_q else qm
        if fmt.v_q:
            r = qv.float() * _piece_scales(st["v_scales"], pc, n)
            v[a:a + n] = r * r if fmt.v_sqrt else r
        else:
            v[a:a + n] = qv


def _piece_scales(scales: torch.Tensor, pc, n: int):
    if pc.kind == "rows":
        return scales[pc.s:pc.s + pc.rows].repeat_interleave(pc.width)[:n]
    return scales[pc.s]


def piece_codes(st: Dict, pc, fmt: Fmt) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (m signed, v unsigned; int16) of one quantized piece, one per element; a
    32-bit moment's fp32 values instead of codes."""
    n = pc.length
    if pc.kind == "rows":
        lm = pc.rows * code_len(pc.width, fmt.m_bits)
        lv = pc.rows * code_len(pc.width, fmt.v_bits)
    else:
        lm, lv = code_len(n, fmt.m_bits), code_len(n, fmt.v_bits)
    cm = st[fmt.m_key][pc.cm:pc.cm + lm]
    cv = st[fmt.v_key][pc.cv:pc.cv + lv]
    return _decode(cm, n, fmt.m_bits, 8), _decode(cv, n, fmt.v_bits, 0)


def pack_piece_codes(qm: torch.Tensor, qv: torch.Tensor, fmt: Fmt):
    """Inverse of :func:`piece_codes`: storage of one piece (codes, or fp32 values)."""
    return _encode(qm, fmt.m_bits, 8, torch.int8), _encode(qv, fmt.v_bits, 0, torch.uint8)


def _decode(stored: torch.Tensor, n: int, bits: int, offset: int) -> torch.Tensor:
    """One moment's storage as int16 codes (4-bit codes are kept as ``code + offset``), or a
    copy of its fp32 values."""
    if bits == FP32:
        return stored.clone()
    if bits == 8:
        return stored.to(torch.int16)
    return unpack4(stored, n).to(torch.int16) - offset


def _encode(q: torch.Tensor, bits: int, offset: int, dtype8: torch.dtype) -> torch.Tensor:
    if bits == FP32:
        return q.float()
    if bits == 8:
        return q.to(dtype8)
    return pack4((q + offset).to(torch.uint8))


def moment_dtypes(fmt: Fmt) -> Tuple[torch.dtype, torch.dtype]:
    """dtypes of what :func:`piece_codes` returns for m and v."""
    return (torch.int16 if fmt.m_q else torch.float32, torch.int16 if fmt.v_q else torch.float32)
