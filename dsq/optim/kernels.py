"""The element-wise QAdamW update, in interchangeable implementations (kernels).

Three primitives over a *piece* of a flat tensor (a contiguous run of elements whose
quantized moments live in their own code and scale tensors, see :mod:`dsq.optim.layout`):

``rows(piece)``
    ``rows`` complete blocks of ``width`` elements (a ``[rows, width]`` view). One pass per
    block: dequantize m and v, AdamW update of the parameter from the fp32 moments, block
    absmax, requantize. Blocks are independent, so nothing is communicated.
``pass1(piece)``
    One block that is split across data-parallel ranks (or too wide to keep in cache):
    dequantize, update the parameter, return this rank's part of the block maxima.
    The codes are left untouched.
``pass2(piece, amax_m, amax_v)``
    Recompute the same fp32 moments from the unchanged codes and the gradient (bit-identical
    to ``pass1``) and requantize them with the block's global maxima.

Both implementations evaluate exactly the same sequence of IEEE float32 operations per
element (no fused multiply-add, round half to even), so a block gives the same codes
whether it is processed whole by ``rows`` on one rank or split over two ranks through
``pass1``/``pass2``: the quantized state does not depend on the data-parallel layout.

* ``eager``: PyTorch tensor ops, chunked to keep temporaries in cache. Runs on any device.
* ``cpp``: a small C/OpenMP kernel (``dsq/csrc/qadamw.c``, :data:`LIBRARY`) compiled once with the system C compiler
  (about 2 s, ``-O3 -ffp-contract=off`` and the flags of the CPU's variant: ``avx512``,
  ``avx2`` or ``portable``, see :mod:`dsq.native`; :func:`isa` names it), cached under
  ``$DSQ_CACHE_DIR`` (default ``~/.cache/dsq``) and called through ``ctypes``. CPU only. Every
  variant is the same C, vectorized by the compiler, so all give the same bits (tested).
  Each block is read and written once: about 16 bytes moved per parameter at 8/8 bits
  against 28 for fp32 AdamW.
* ``compile``: the eager ``rows`` under ``torch.compile`` (opt-in, for GPUs; on CPU it costs
  tens of seconds of compilation and Inductor splits the block reduction into two sweeps).

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

import ctypes
import os
import struct
from typing import Optional, Tuple

import torch

from dsq.native import Library

TINY = 1e-30
"""Lower clamp of a block maximum, so that scales and their inverses stay finite."""

EAGER_CHUNK = 1 << 17
"""Elements per eager chunk (temporaries of a chunk stay in L2)."""


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


class Hyper:
    """Per-step scalars of the update, rounded once to float32 (both kernels use these)."""

    __slots__ = ("b1", "omb1", "b2", "omb2", "decay", "step_size", "inv_bc2_sqrt", "eps", "_arr")

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 step: int):
        bc1 = 1.0 - beta1 ** step
        bc2 = 1.0 - beta2 ** step
        f = _f32
        self.b1, self.omb1 = f(beta1), f(1.0 - beta1)
        self.b2, self.omb2 = f(beta2), f(1.0 - beta2)
        self.decay = f(1.0 - lr * weight_decay)
        self.step_size = f(lr / bc1)
        self.inv_bc2_sqrt = f(1.0 / bc2 ** 0.5)
        self.eps = f(eps)

        self._arr = None

    def as_array(self):
        if self._arr is None:
            self._arr = (ctypes.c_float * 8)(self.b1, self.omb1, self.b2, self.omb2, self.decay,
                                             self.step_size, self.inv_bc2_sqrt, self.eps)
        return self._arr


def _f32(x: float) -> float:
    """x rounded to float32 (as PyTorch rounds a Python scalar in a float32 op)."""
    return struct.unpack("f", struct.pack("f", x))[0]


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


# ============================================================================ eager
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


def _deq_m(codes: torch.Tensor, n: int, bits: int, scale) -> torch.Tensor:
    if bits == FP32:
        return codes
    if bits == 8:
        q = codes.float()
    else:
        q = unpack4(codes, n).float() - 8.0
    return q * scale


def _deq_v_raw(codes: torch.Tensor, n: int, bits: int, scale) -> torch.Tensor:
    if bits == FP32:
        return codes
    q = codes.float() if bits == 8 else unpack4(codes, n).float()
    return q * scale


def _moments(g, mc, ms, vc, vs, n, fmt: Fmt, h: Hyper):
    """fp32 m, v and the stored v quantity (v or sqrt(v)) and sqrt(v); same op order as C."""
    m = _deq_m(mc, n, fmt.m_bits, ms)
    m = m * h.b1 + g * h.omb1
    vr = _deq_v_raw(vc, n, fmt.v_bits, vs)
    v = vr * vr if fmt.v_sqrt else vr
    v = v * h.b2 + (g * g) * h.omb2
    r = _sqrt(v)
    return m, v, r


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    # torch.sqrt on CPU is not always correctly rounded (MKL); through float64 it is, and then
    # matches the C kernel's sqrtf bit for bit
    return torch.sqrt(v.double()).float() if v.device.type == "cpu" else torch.sqrt(v)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """a / b as a true division (PyTorch turns division by a CPU scalar into a * (1/b))."""
    if not torch.is_tensor(b):
        b = torch.full((1,), b, dtype=a.dtype, device=a.device)
    if not torch.is_tensor(a):
        a = torch.full((1,), a, dtype=b.dtype, device=b.device)
    return a / b


def _update_param(p, m, r, h: Hyper):
    d = r * h.inv_bc2_sqrt + h.eps
    p.copy_(p * h.decay - (m * h.step_size) / d)


def _quant(m, vq, am, av, fmt: Fmt):
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


class Kernel:
    """Piece-level entry points used by QAdamW (``st``: a flat tensor's state, ``pc``: a piece
    of :mod:`dsq.optim.layout`); they slice the state and call the tensor-level methods."""

    def rows_piece(self, pf, gf, st, pc, fmt: Fmt, h: Hyper) -> None:
        a, r, w = pc.start, pc.rows, pc.width
        lm, lv = code_len(w, fmt.m_bits), code_len(w, fmt.v_bits)
        self.rows(pf[a:a + r * w].view(r, w), gf[a:a + r * w].view(r, w),
                  st[fmt.m_key][pc.cm:pc.cm + r * lm].view(r, lm),
                  st["m_scales"][pc.s:pc.s + r] if fmt.m_q else None,
                  st[fmt.v_key][pc.cv:pc.cv + r * lv].view(r, lv),
                  st["v_scales"][pc.s:pc.s + r] if fmt.v_q else None, r, w, fmt, h)

    def _split_state(self, st, pc, fmt):
        n = pc.length
        return (st[fmt.m_key][pc.cm:pc.cm + code_len(n, fmt.m_bits)],
                st["m_scales"][pc.s:pc.s + 1] if fmt.m_q else None,
                st[fmt.v_key][pc.cv:pc.cv + code_len(n, fmt.v_bits)],
                st["v_scales"][pc.s:pc.s + 1] if fmt.v_q else None)

    def pass1_piece(self, pf, gf, st, pc, fmt: Fmt, h: Hyper) -> Tuple[float, float]:
        a, n = pc.start, pc.length
        return self.pass1(pf[a:a + n], gf[a:a + n], *self._split_state(st, pc, fmt), n, fmt, h)

    def pass2_piece(self, gf, st, pc, fmt: Fmt, h: Hyper, am: float, av: float) -> None:
        a, n = pc.start, pc.length
        self.pass2(gf[a:a + n], *self._split_state(st, pc, fmt), n, fmt, h, am, av)


class EagerKernel(Kernel):
    """PyTorch ops. Tensor-level arguments: ``mc``/``vc`` the moments' storage (codes, or fp32
    values for a 32-bit moment), ``ms``/``vs`` their scales (None for a 32-bit moment)."""

    name = "eager"

    def rows(self, p, g, mc, ms, vc, vs, rows: int, width: int, fmt: Fmt, h: Hyper) -> None:
        step = max(1, EAGER_CHUNK // width)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            pp, gg = p[r0:r1], g[r0:r1]
            mcc, vcc = mc[r0:r1], vc[r0:r1]
            s_m = ms[r0:r1].unsqueeze(1) if fmt.m_q else None
            s_v = vs[r0:r1].unsqueeze(1) if fmt.v_q else None
            m, v, r = _moments(gg, mcc, s_m, vcc, s_v, width, fmt, h)
            _update_param(pp, m, r, h)
            vq = r if fmt.v_sqrt else v
            am = m.abs().amax(dim=1, keepdim=True) if fmt.m_q else None
            av = vq.amax(dim=1, keepdim=True) if fmt.v_q else None
            cm, cv, sm, sv = _quant(m, vq, am, av, fmt)
            mcc.copy_(cm)
            vcc.copy_(cv)
            if fmt.m_q:
                ms[r0:r1].copy_(sm.squeeze(1))
            if fmt.v_q:
                vs[r0:r1].copy_(sv.squeeze(1))

    def _chunks(self, n: int):
        # chunk boundaries even, so that 4-bit codes of a chunk start on a byte
        step = EAGER_CHUNK
        for a in range(0, n, step):
            yield a, min(n, a + step)

    def pass1(self, p, g, mc, ms, vc, vs, n: int, fmt: Fmt, h: Hyper) -> Tuple[float, float]:
        am = av = 0.0
        for a, b in self._chunks(n):
            m, v, r = _moments(g[a:b], _cslice(mc, a, b, fmt.m_bits), ms,
                               _cslice(vc, a, b, fmt.v_bits), vs, b - a, fmt, h)
            _update_param(p[a:b], m, r, h)
            vq = r if fmt.v_sqrt else v
            if fmt.m_q:
                am = max(am, float(m.abs().max()))
            if fmt.v_q:
                av = max(av, float(vq.max()))
        return am, av

    def pass2(self, g, mc, ms, vc, vs, n: int, fmt: Fmt, h: Hyper, am: float, av: float) -> None:
        am_t = torch.full((1,), am, dtype=torch.float32, device=g.device)
        av_t = torch.full((1,), av, dtype=torch.float32, device=g.device)
        new = None
        for a, b in self._chunks(n):
            mcc, vcc = _cslice(mc, a, b, fmt.m_bits), _cslice(vc, a, b, fmt.v_bits)
            m, v, r = _moments(g[a:b], mcc, ms, vcc, vs, b - a, fmt, h)
            vq = r if fmt.v_sqrt else v
            cm, cv, sm, sv = _quant(m, vq, am_t, av_t, fmt)
            mcc.copy_(cm)
            vcc.copy_(cv)
            new = (sm, sv)
        if fmt.m_q:
            ms.copy_(new[0])
        if fmt.v_q:
            vs.copy_(new[1])


def _cslice(codes: torch.Tensor, a: int, b: int, bits: int) -> torch.Tensor:
    if bits != 4:
        return codes[a:b]
    return codes[a // 2:(b + 1) // 2]


# ============================================================================ compiled
class CompiledKernel(EagerKernel):
    """``torch.compile`` of the eager ``rows`` (opt-in; split blocks stay eager)."""

    name = "compile"

    def __init__(self):
        self._fn = {}

    def rows(self, p, g, mc, ms, vc, vs, rows, width, fmt, h):
        key = (fmt.m_bits, fmt.v_bits, fmt.v_sqrt, str(p.device))  # one graph per format
        if key not in self._fn:
            self._fn[key] = torch.compile(_rows_functional, dynamic=True)
        t = lambda x: torch.tensor(x, dtype=torch.float32, device=p.device)  # noqa: E731
        self._fn[key](p, g, mc, ms, vc, vs, width, fmt.m_bits, fmt.v_bits, fmt.v_sqrt,
                      t(h.b1), t(h.omb1), t(h.b2), t(h.omb2), t(h.decay), t(h.step_size),
                      t(h.inv_bc2_sqrt), t(h.eps))


def _rows_functional(p, g, mc, ms, vc, vs, width, m_bits, v_bits, v_sqrt, b1, omb1, b2, omb2,
                     decay, step_size, inv_bc2_sqrt, eps):
    fmt = Fmt(m_bits, v_bits, v_sqrt)
    m = _deq_m(mc, width, m_bits, ms.unsqueeze(1) if fmt.m_q else None)
    m = m * b1 + g * omb1
    vr = _deq_v_raw(vc, width, v_bits, vs.unsqueeze(1) if fmt.v_q else None)
    v = vr * vr if fmt.v_sqrt else vr
    v = v * b2 + (g * g) * omb2
    r = torch.sqrt(v)
    d = r * inv_bc2_sqrt + eps
    p.copy_(p * decay - (m * step_size) / d)
    vq = r if fmt.v_sqrt else v
    am = m.abs().amax(1, keepdim=True) if fmt.m_q else None
    av = vq.amax(1, keepdim=True) if fmt.v_q else None
    cm, cv, sm, sv = _quant(m, vq, am, av, fmt)
    mc.copy_(cm)
    vc.copy_(cv)
    if fmt.m_q:
        ms.copy_(sm.squeeze(1))
    if fmt.v_q:
        vs.copy_(sv.squeeze(1))


# ============================================================================ C / OpenMP
def _setup(lib: ctypes.CDLL, isa: str) -> None:
    P, L, N, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.dsq_rows.argtypes = [P, P, P, P, P, P, L, L, N, N, N, P, N]
    lib.dsq_pass1.argtypes = [P, P, P, P, P, P, L, N, N, N, P, N, P]
    lib.dsq_pass2.argtypes = [P, P, P, P, P, L, N, N, N, P, F, F, N]
    for f in (lib.dsq_rows, lib.dsq_pass1, lib.dsq_pass2):
        f.restype = None


LIBRARY = Library("qadamw", ("qadamw.c", "dsq_common.h"), what="dsq QAdamW kernel",
                  fallback="the eager PyTorch kernel", setup=_setup)
"""The C kernel's native library (:mod:`dsq.native`)."""


def build_variant(isa: str) -> ctypes.CDLL:
    """The kernel compiled as variant ``isa`` (see :mod:`dsq.native`), cached; raises
    :class:`dsq.native.BuildError`. Only call on a CPU that supports ``isa``."""
    return LIBRARY.variant(isa)


def cpp_library() -> Optional[ctypes.CDLL]:
    """The kernel of this CPU's variant (:func:`dsq.native.select_isa`), built on first use;
    None where that is ``reference`` or the build fails (then one line says so, with the path
    of the compiler's output, and the eager kernel runs)."""
    return LIBRARY.load()


def isa() -> str:
    """The variant the ``cpp`` kernel runs as here (``reference``: the eager kernel runs)."""
    return LIBRARY.choice().isa


class CppKernel(Kernel):
    """The C kernel; pieces are addressed by raw pointers (no tensor views: ~5 us a call)."""

    name = "cpp"

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def _rows(self, p, g, mc, ms, vc, vs, rows, width, fmt, h):
        self.lib.dsq_rows(p, g, mc, ms, vc, vs, rows, width, fmt.m_bits, fmt.v_bits,
                          int(fmt.v_sqrt), ctypes.addressof(h.as_array()), torch.get_num_threads())

    def _pass1(self, p, g, mc, ms, vc, vs, n, fmt, h):
        out = (ctypes.c_float * 2)()
        self.lib.dsq_pass1(p, g, mc, ms, vc, vs, n, fmt.m_bits, fmt.v_bits, int(fmt.v_sqrt),
                           ctypes.addressof(h.as_array()), torch.get_num_threads(),
                           ctypes.addressof(out))
        return out[0], out[1]

    def _pass2(self, g, mc, ms, vc, vs, n, fmt, h, am, av):
        self.lib.dsq_pass2(g, mc, ms, vc, vs, n, fmt.m_bits, fmt.v_bits, int(fmt.v_sqrt),
                           ctypes.addressof(h.as_array()), am, av, torch.get_num_threads())

    # tensors (a 32-bit moment: its fp32 values, scale None)
    def rows(self, p, g, mc, ms, vc, vs, rows, width, fmt, h):
        self._rows(p.data_ptr(), g.data_ptr(), mc.data_ptr(), _ptr(ms), vc.data_ptr(),
                   _ptr(vs), rows, width, fmt, h)

    def pass1(self, p, g, mc, ms, vc, vs, n, fmt, h):
        return self._pass1(p.data_ptr(), g.data_ptr(), mc.data_ptr(), _ptr(ms),
                           vc.data_ptr(), _ptr(vs), n, fmt, h)

    def pass2(self, g, mc, ms, vc, vs, n, fmt, h, am, av):
        self._pass2(g.data_ptr(), mc.data_ptr(), _ptr(ms), vc.data_ptr(), _ptr(vs), n,
                    fmt, h, am, av)

    # pieces of a flat tensor's state
    @staticmethod
    def _ptrs(pf, gf, st, pc, fmt):
        return (pf.data_ptr() + 4 * pc.start, gf.data_ptr() + 4 * pc.start,
                st[fmt.m_key].data_ptr() + fmt.m_esize * pc.cm,
                st["m_scales"].data_ptr() + 4 * pc.s if fmt.m_q else None,
                st[fmt.v_key].data_ptr() + fmt.v_esize * pc.cv,
                st["v_scales"].data_ptr() + 4 * pc.s if fmt.v_q else None)

    def rows_piece(self, pf, gf, st, pc, fmt, h):
        self._rows(*self._ptrs(pf, gf, st, pc, fmt), pc.rows, pc.width, fmt, h)

    def pass1_piece(self, pf, gf, st, pc, fmt, h):
        return self._pass1(*self._ptrs(pf, gf, st, pc, fmt), pc.length, fmt, h)

    def pass2_piece(self, gf, st, pc, fmt, h, am, av):
        _, g, mc, ms, vc, vs = self._ptrs(gf, gf, st, pc, fmt)
        self._pass2(g, mc, ms, vc, vs, pc.length, fmt, h, am, av)


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


KERNELS = ("auto", "eager", "cpp", "compile")


def get_kernel(name: str, device: torch.device):
    """Resolve a kernel name for tensors on ``device``.

    ``auto`` (default, overridable with ``$DSQ_OPTIM_KERNEL``): ``cpp`` on CPU when a C
    compiler is available, else ``eager``; ``eager`` on GPUs (use ``compile`` there).
    """
    if name == "auto":
        name = os.environ.get("DSQ_OPTIM_KERNEL", "auto")
    if name not in KERNELS:
        raise ValueError(f"kernel={name!r} is unknown: use one of {KERNELS}")
    if name in ("auto", "cpp") and device.type == "cpu":
        lib = cpp_library()
        if lib is not None:
            return CppKernel(lib)
        return EagerKernel()
    if name == "compile":
        return CompiledKernel()
    return EagerKernel()
