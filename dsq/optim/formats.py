"""QAdamW's moment formats: numbers only, no layout and no state (nothing in dsq.optim below it).

:class:`Moment` is one moment's format: its bits, code range, storage dtype and size, and the
one quantizer (:meth:`Moment.quantize`), encoder (:meth:`Moment.encode`) and decoder
(:meth:`Moment.codes`) of its storage; :class:`Fmt` is the pair of a param group.

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

FP8 formats (``fp8e4m3``, ``fp8e5m2``; :data:`FP8`) store one float8 byte per element with
the same blocks and one fp32 scale per block: ``s = amax / F`` (``F`` the format's largest
finite value, 448 or 57344; ``amax`` the block's absmax for m, max for v), code
``(x / s).to(float8)`` (round to nearest even, torch's cast; ``|x / s| <= F`` by construction,
clamped to ``F`` against a last-ulp overshoot), stored as ``uint8`` (the float8 bits),
dequantized ``code.float() * s``. A v (or ``sqrt(v)``) that is positive but underflows to 0
in fp8 is raised to the smallest positive subnormal (byte ``0x01``: ``2**-9`` of E4M3,
``2**-16`` of E5M2, times ``s``), the rule of the integer codes: a stored v is 0 only where
it is exactly 0. ``v_signed`` does not apply to fp8.

``bits = 32`` (:data:`FP32`) keeps that moment in fp32 (one float per element, no scale) while
the other is quantized (the study's m8, m4 and v8 settings): the kernels read and write it in
place with the same operations, and the block maxima are those of the quantized moment only.
"""

from __future__ import annotations

import torch

TINY = 1e-30
"""Lower clamp of a block maximum, so that scales and their inverses stay finite."""

FP32 = 32
"""``m_bits`` / ``v_bits`` of a moment that is not quantized (stored as fp32)."""

BITS = (4, 8, FP32)

FP8 = {"fp8e4m3": (torch.float8_e4m3fn, 448.0), "fp8e5m2": (torch.float8_e5m2, 57344.0)}
"""The float8 moment formats: torch dtype and largest finite value."""

FORMATS = ("int8", "int4", "fp32", "fp8e4m3", "fp8e5m2")
"""``m_format`` / ``v_format`` names (``optim.m_format``); None: from the bits."""

_BY_BITS = {8: "int8", 4: "int4", FP32: "fp32"}


def format_bits(name: str) -> int:
    """Bits per element of a moment format name."""
    return FP32 if name == "fp32" else 4 if name == "int4" else 8


def resolve_format(bits: int, name, key: str = "m") -> str:
    """The format of a moment given its ``<key>_bits`` and ``<key>_format`` (None: from the
    bits). A format whose bits differ from ``bits`` contradicts it unless ``bits`` is 8 (the
    default, which a format overrides). ValueError naming the keys and accepted values."""
    if name is None:
        return _BY_BITS[bits]
    if name not in FORMATS:
        raise ValueError(f"{key}_format={name!r} is unknown: use one of {', '.join(FORMATS)} "
                         f"(or null to follow {key}_bits)")
    if bits != 8 and bits != format_bits(name):
        raise ValueError(f"{key}_format={name} contradicts {key}_bits={bits}: drop {key}_bits "
                         f"(the format sets it) or set {key}_format to one of "
                         f"{', '.join(f for f in FORMATS if format_bits(f) == bits)}")
    return name


def qmax_m(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def qmax_v(bits: int) -> int:
    return (1 << bits) - 1


def storage_dtype(bits: int, negative: bool) -> torch.dtype:
    """The dtype of a moment's storage: fp32 values, int8 codes (8-bit signed) or uint8
    (unsigned codes, and 4-bit codes two per byte)."""
    if bits == FP32:
        return torch.float32
    return torch.int8 if negative and bits == 8 else torch.uint8


def code_len(n: int, bits: int) -> int:
    """Storage elements holding ``n`` values of a moment: int8/uint8 codes (4-bit: two per
    byte) or, for ``bits == 32``, fp32 values."""
    return (n + 1) // 2 if bits == 4 else n


def code_bytes(n: int, bits: int) -> int:
    """Bytes holding ``n`` values of a moment of ``bits`` bits (4-bit: two per byte)."""
    return code_len(n, bits) * storage_dtype(bits, True).itemsize


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


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """a / b as a true division (PyTorch turns division by a CPU scalar into a * (1/b))."""
    if not torch.is_tensor(b):
        b = torch.full((1,), b, dtype=a.dtype, device=a.device)
    if not torch.is_tensor(a):
        a = torch.full((1,), a, dtype=b.dtype, device=b.device)
    return a / b


class Moment:
    """The format of one moment: ``format`` (a :data:`FORMATS` name; the one source of truth,
    ``bits`` follows from it), ``bits`` (4, 8, or 32 = fp32), codes in ``[-qmax, qmax]``
    (``negative``) or ``[0, qmax]``, stored as ``code + offset`` when 4-bit, raised to 1 where
    the value is positive (``floor_one``); ``fp8``: the float8 dtype of an fp8 format (then
    ``qmax`` is its largest finite value and the storage its bytes), else None; ``key`` /
    ``scales_key``: its entries in a state dict (:mod:`dsq.optim.state`)."""

    __slots__ = ("name", "bits", "quantized", "negative", "qmax", "offset", "floor_one",
                 "dtype", "key", "scales_key", "format", "fp8")

    def __init__(self, name: str, bits: int, negative: bool, qmax: int, floor_one: bool,
                 format: str = None):
        self.format = format or _BY_BITS[bits]
        self.fp8 = FP8[self.format][0] if self.format in FP8 else None
        if self.fp8 is not None:
            bits, qmax = 8, FP8[self.format][1]
        self.name, self.bits, self.quantized = name, bits, bits != FP32
        self.negative, self.qmax, self.floor_one = negative, qmax, floor_one
        self.offset = 8 if negative and bits == 4 else 0
        self.dtype = torch.uint8 if self.fp8 is not None else storage_dtype(bits, negative)
        self.key = f"{name}_codes" if self.quantized else f"{name}_fp32"
        self.scales_key = f"{name}_scales" if self.quantized else None

    def storage_len(self, n: int) -> int:
        return code_len(n, self.bits)

    def quantize(self, x: torch.Tensor, amax) -> tuple:
        """Storage and scale of ``x`` from its block maxima ``amax`` (an fp32 moment is stored
        as it is, scale None)."""
        if not self.quantized:
            return x, None
        if self.fp8 is not None:
            return self._quantize_fp8(x, amax)
        Q = float(self.qmax)
        amax = torch.clamp_min(amax, TINY)
        q = torch.clamp(torch.round(x * _div(Q, amax)), -Q if self.negative else 0.0, Q)
        if self.floor_one:
            q = torch.maximum(q, (x > 0).float())
        return self.encode(q), _div(amax, Q)

    def _quantize_fp8(self, x: torch.Tensor, amax) -> tuple:
        F = self.qmax
        s = _div(torch.clamp_min(amax, TINY), F)
        code = torch.clamp(_div(x, s), -F, F).to(self.fp8).view(torch.uint8)
        if self.floor_one:  # a positive v never dequantizes to 0: smallest subnormal
            code = torch.where((code == 0) & (x > 0), torch.ones_like(code), code)
        return code, s

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Storage of per-element codes ``q`` (or of fp32 values; fp8: the bytes)."""
        if not self.quantized:
            return q.float()
        if self.bits == 8:
            return q.to(self.dtype)
        return pack4((q + self.offset).to(torch.uint8) if self.offset else q.to(torch.uint8))

    def codes(self, stored: torch.Tensor, n: int, dtype: torch.dtype = torch.float32):
        """The one decoder: ``n`` per-element codes of ``stored`` as ``dtype`` (an fp32
        moment: its values, as stored). fp8: a floating ``dtype`` gives each code's value, an
        integer one its byte (what :meth:`encode` takes back, for resharding)."""
        if not self.quantized:
            return stored
        if self.fp8 is not None:
            return (stored.view(self.fp8) if dtype.is_floating_point else stored).to(dtype)
        q = stored.to(dtype) if self.bits == 8 else unpack4(stored, n).to(dtype)
        return q - self.offset if self.offset else q

    def dequantize(self, stored: torch.Tensor, n: int, scale) -> torch.Tensor:
        """fp32 values of the stored quantity (for v in the sqrt domain: ``sqrt(v)``)."""
        return self.codes(stored, n) * scale if self.quantized else stored


class Fmt:
    """The moments' formats of a param group: ``m`` and ``v`` (:class:`Moment`), and, by name,
    ``m_bits``, ``v_bits``, ``v_sqrt`` (only for a quantized v), ``v_signed`` (v's codes use the
    signed range, the study's), ``m_q`` / ``v_q`` (quantized) and ``m_key`` / ``v_key``."""

    __slots__ = ("m", "v", "m_bits", "v_bits", "v_sqrt", "v_signed", "m_q", "v_q", "m_key",
                 "v_key", "fp8")

    def __init__(self, m_bits: int, v_bits: int, v_sqrt: bool, v_signed: bool = False,
                 m_format: str = None, v_format: str = None):
        m_format, v_format = resolve_format(m_bits, m_format), resolve_format(v_bits, v_format)
        m_bits, v_bits = format_bits(m_format), format_bits(v_format)
        self.m_bits, self.v_bits = m_bits, v_bits
        self.m_q, self.v_q = m_bits != FP32, v_bits != FP32
        self.v_sqrt = bool(v_sqrt) and self.v_q
        self.v_signed = bool(v_signed) and self.v_q
        self.m = Moment("m", m_bits, True, qmax_m(m_bits), False, m_format)
        self.v = Moment("v", v_bits, False, qmax_m(v_bits) if self.v_signed else qmax_v(v_bits),
                        not self.v_signed, v_format)
        self.m_key, self.v_key = self.m.key, self.v.key
        self.fp8 = self.m.fp8 is not None or self.v.fp8 is not None

    @classmethod
    def of(cls, group) -> "Fmt":
        """The formats of a QAdamW param group (or of a layout's ``meta``: bits only; a group
        of a checkpoint written before ``m_format`` / ``v_format``: from the bits)."""
        return cls(group["m_bits"], group["v_bits"], group.get("v_domain") == "sqrt",
                   bool(group.get("v_signed", False)), group.get("m_format"),
                   group.get("v_format"))


def quantize_moments(m, vq, am, av, fmt: Fmt):
    """Storage of m and of the stored v quantity ``vq`` from block maxima: codes and scales
    (an fp32 moment is stored as it is, with scale None and its maximum unused)."""
    cm, sm = fmt.m.quantize(m, am)
    cv, sv = fmt.v.quantize(vq, av)
    return cm, cv, sm, sv
