"""The element-wise QAdamW update, in interchangeable implementations (kernels): the eager
PyTorch reference (one implementation of the row update, :func:`rows_update`, also what
``compile`` compiles) and the binding of the native C kernel (``dsq/csrc/qadamw.c``).

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
* ``cpp``: a small C/OpenMP kernel (``dsq/csrc/qadamw.c``, :data:`LIBRARY`) compiled once
  per process through :mod:`dsq.native` with the system C compiler (``-O3 -ffp-contract=off``
  and the flags of the CPU's variant: ``avx512``, ``avx2`` or ``portable``; :func:`isa` names
  it), cached under ``$DSQ_CACHE_DIR`` (default ``~/.cache/dsq``) and called through
  ``ctypes`` after checks of device, dtype, contiguity and sizes. CPU only. Every variant is
  the same C, vectorized by the compiler, so all give the same bits (tested). Each block is
  read and written once: about 16 bytes moved per parameter at 8/8 bits against 28 for fp32
  AdamW. Integer and fp32 moments only: fp8 ones (:data:`dsq.optim.formats.FP8`) run on
  ``eager`` (QAdamW picks it under ``auto``; an explicit ``cpp`` is refused).
* ``compile``: :func:`rows_update` under ``torch.compile`` (opt-in, for GPUs; split blocks
  stay eager).

The number formats and their storage are :mod:`dsq.optim.formats`'s; the views of a piece's
state come from :class:`dsq.optim.state.MomentState`.
"""


from __future__ import annotations

import ctypes
import os
import struct
from typing import NamedTuple, Optional, Tuple

import torch

from dsq.native import kernel_choice
from dsq.native import Library
from dsq.optim.formats import Fmt, code_len, quantize_moments

EAGER_CHUNK = 1 << 17
"""Elements per eager chunk (temporaries of a chunk stay in L2)."""


class HyperValues(NamedTuple):
    """The per-step scalars as tensors (what :func:`rows_update` reads under torch.compile,
    so that a new step does not recompile)."""

    b1: torch.Tensor
    omb1: torch.Tensor
    b2: torch.Tensor
    omb2: torch.Tensor
    decay: torch.Tensor
    step_size: torch.Tensor
    inv_bc2_sqrt: torch.Tensor
    eps: torch.Tensor


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

    def tensors(self, device) -> HyperValues:
        """The scalars as fp32 tensors on ``device``."""
        return HyperValues(*(torch.tensor(getattr(self, k), dtype=torch.float32, device=device)
                             for k in HyperValues._fields))

    def as_array(self):
        if self._arr is None:
            self._arr = (ctypes.c_float * 8)(self.b1, self.omb1, self.b2, self.omb2, self.decay,
                                             self.step_size, self.inv_bc2_sqrt, self.eps)
        return self._arr


def _f32(x: float) -> float:
    """x rounded to float32 (as PyTorch rounds a Python scalar in a float32 op)."""
    return struct.unpack("f", struct.pack("f", x))[0]


# ============================================================================ eager
def _moments(g, mc, ms, vc, vs, n, fmt: Fmt, h: Hyper):
    """fp32 m, v and the stored v quantity (v or sqrt(v)) and sqrt(v); same op order as C."""
    m = fmt.m.dequantize(mc, n, ms)
    m = m * h.b1 + g * h.omb1
    vr = fmt.v.dequantize(vc, n, vs)
    v = vr * vr if fmt.v_sqrt else vr
    v = v * h.b2 + (g * g) * h.omb2
    r = _sqrt(v)
    return m, v, r


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    # torch.sqrt on CPU is not always correctly rounded (MKL); through float64 it is, and then
    # matches the C kernel's sqrtf bit for bit
    return torch.sqrt(v.double()).float() if v.device.type == "cpu" else torch.sqrt(v)


def _update_param(p, m, r, h: Hyper):
    d = r * h.inv_bc2_sqrt + h.eps
    p.copy_(p * h.decay - (m * h.step_size) / d)


def rows_update(p, g, mc, ms, vc, vs, width: int, fmt: Fmt, h) -> None:
    """The update of complete blocks, in place: ``p``, ``g`` ``[r, width]``; ``mc``/``vc`` the
    moments' storage (``[r, code_len(width)]`` codes, or fp32 values for a 32-bit moment),
    ``ms``/``vs`` their ``[r]`` scales (None for a 32-bit moment); ``h`` a :class:`Hyper` or
    its :class:`HyperValues`. The one eager implementation (the ``eager`` kernel calls it per
    chunk, ``compile`` compiles it); the same operations as the C kernel."""
    m, v, r = _moments(g, mc, ms.unsqueeze(1) if fmt.m_q else None, vc,
                       vs.unsqueeze(1) if fmt.v_q else None, width, fmt, h)
    _update_param(p, m, r, h)
    vq = r if fmt.v_sqrt else v
    am = m.abs().amax(dim=1, keepdim=True) if fmt.m_q else None
    av = vq.amax(dim=1, keepdim=True) if fmt.v_q else None
    cm, cv, sm, sv = quantize_moments(m, vq, am, av, fmt)
    mc.copy_(cm)
    vc.copy_(cv)
    if fmt.m_q:
        ms.copy_(sm.squeeze(1))
    if fmt.v_q:
        vs.copy_(sv.squeeze(1))


class Kernel:
    """Piece-level entry points used by QAdamW (``state``: a flat tensor's
    :class:`~dsq.optim.state.MomentState`, ``pc``: a piece of :mod:`dsq.optim.layout`); they
    take the piece's views and call the tensor-level methods."""

    def rows_piece(self, pf, gf, state, pc, h: Hyper) -> None:
        a, r, w = pc.start, pc.rows, pc.width
        self.rows(pf[a:a + r * w].view(r, w), gf[a:a + r * w].view(r, w), *state.views(pc), r, w,
                  state.fmt, h)

    def pass1_piece(self, pf, gf, state, pc, h: Hyper) -> Tuple[float, float]:
        a, n = pc.start, pc.length
        return self.pass1(pf[a:a + n], gf[a:a + n], *state.views(pc), n, state.fmt, h)

    def pass2_piece(self, gf, state, pc, h: Hyper, am: float, av: float) -> None:
        a, n = pc.start, pc.length
        self.pass2(gf[a:a + n], *state.views(pc), n, state.fmt, h, am, av)


class EagerKernel(Kernel):
    """PyTorch ops. Tensor-level arguments: ``mc``/``vc`` the moments' storage (codes, or fp32
    values for a 32-bit moment), ``ms``/``vs`` their scales (None for a 32-bit moment)."""

    name = "eager"

    def rows(self, p, g, mc, ms, vc, vs, rows: int, width: int, fmt: Fmt, h: Hyper) -> None:
        step = max(1, EAGER_CHUNK // width)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            rows_update(p[r0:r1], g[r0:r1], mc[r0:r1], ms[r0:r1] if fmt.m_q else None,
                        vc[r0:r1], vs[r0:r1] if fmt.v_q else None, width, fmt, h)

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
            cm, cv, sm, sv = quantize_moments(m, vq, am_t, av_t, fmt)
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
    """:func:`rows_update` under ``torch.compile`` (opt-in; split blocks stay eager)."""

    name = "compile"

    def __init__(self):
        self._fn = {}

    def rows(self, p, g, mc, ms, vc, vs, rows, width, fmt, h):
        key = (fmt.m.format, fmt.v.format, fmt.v_sqrt, fmt.v_signed, str(p.device))  # per format
        if key not in self._fn:
            self._fn[key] = torch.compile(_rows_compiled, dynamic=True)
        self._fn[key](p, g, mc, ms, vc, vs, width, fmt.m.format, fmt.v.format, fmt.v_sqrt,
                      fmt.v_signed, h.tensors(p.device))


def _rows_compiled(p, g, mc, ms, vc, vs, width, m_format, v_format, v_sqrt, v_signed, h):
    fmt = Fmt(8, 8, v_sqrt, v_signed, m_format, v_format)
    rows_update(p, g, mc, ms, vc, vs, width, fmt, h)


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
    """The C kernel; pieces are addressed by raw pointers (no tensor views per call). Every
    call first checks its tensors (:func:`_check`: CPU, dtype, contiguous, large enough for
    what the C code reads and writes; ValueError otherwise)."""

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
        _check(fmt, p, g, mc, ms, vc, vs, rows * width, rows * code_len(width, fmt.m_bits),
               rows * code_len(width, fmt.v_bits), rows)
        self._rows(p.data_ptr(), g.data_ptr(), mc.data_ptr(), _ptr(ms), vc.data_ptr(),
                   _ptr(vs), rows, width, fmt, h)

    def pass1(self, p, g, mc, ms, vc, vs, n, fmt, h):
        _check(fmt, p, g, mc, ms, vc, vs, n, code_len(n, fmt.m_bits), code_len(n, fmt.v_bits), 1)
        return self._pass1(p.data_ptr(), g.data_ptr(), mc.data_ptr(), _ptr(ms),
                           vc.data_ptr(), _ptr(vs), n, fmt, h)

    def pass2(self, g, mc, ms, vc, vs, n, fmt, h, am, av):
        _check(fmt, None, g, mc, ms, vc, vs, n, code_len(n, fmt.m_bits), code_len(n, fmt.v_bits),
               1)
        self._pass2(g.data_ptr(), mc.data_ptr(), _ptr(ms), vc.data_ptr(), _ptr(vs), n,
                    fmt, h, am, av)

    # pieces of a flat tensor's state: pointers into its tensors, checked
    @staticmethod
    def _ptrs(pf, gf, state, pc):
        r = pc.rows if pc.kind == "rows" else 1
        w = pc.width if pc.kind == "rows" else pc.length
        fmt = state.fmt
        _check(fmt, pf, gf, state.m, state.m_scales, state.v, state.v_scales,
               pc.start + r * w, pc.cm + r * code_len(w, fmt.m_bits),
               pc.cv + r * code_len(w, fmt.v_bits), pc.s + r)

        def at(t, off):
            return None if t is None else t.data_ptr() + t.element_size() * off

        return (at(pf, pc.start), at(gf, pc.start), at(state.m, pc.cm),
                at(state.m_scales if fmt.m_q else None, pc.s), at(state.v, pc.cv),
                at(state.v_scales if fmt.v_q else None, pc.s))

    def rows_piece(self, pf, gf, state, pc, h):
        self._rows(*self._ptrs(pf, gf, state, pc), pc.rows, pc.width, state.fmt, h)

    def pass1_piece(self, pf, gf, state, pc, h):
        return self._pass1(*self._ptrs(pf, gf, state, pc), pc.length, state.fmt, h)

    def pass2_piece(self, gf, state, pc, h, am, av):
        _, g, mc, ms, vc, vs = self._ptrs(gf, gf, state, pc)
        self._pass2(g, mc, ms, vc, vs, pc.length, state.fmt, h, am, av)


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _check(fmt: Fmt, p, g, mc, ms, vc, vs, n: int, lm: int, lv: int, ns: int) -> None:
    """Before a call into C: ``p`` (None: not touched) and ``g`` fp32 of at least ``n``
    elements, m's and v's storage of their format's dtype with ``lm`` / ``lv`` elements, the
    quantized moments' scales fp32 with ``ns``; all contiguous CPU tensors."""
    for t, dtype, k, what in ((p, torch.float32, n, "the parameter"),
                              (g, torch.float32, n, "the gradient"),
                              (mc, fmt.m.dtype, lm, "m's storage"),
                              (vc, fmt.v.dtype, lv, "v's storage"),
                              (ms if fmt.m_q else None, torch.float32, ns, "m's scales"),
                              (vs if fmt.v_q else None, torch.float32, ns, "v's scales")):
        if t is not None and (t.device.type != "cpu" or t.dtype != dtype
                              or not t.is_contiguous() or t.numel() < k):
            raise ValueError(f"QAdamW C kernel: {what} must be a contiguous {dtype} CPU tensor "
                             f"of at least {k} elements, got {tuple(t.shape)} {t.dtype} on "
                             f"{t.device}")
    if fmt.fp8:
        raise ValueError("QAdamW C kernel: fp8 moments run on the reference kernel "
                         "(optim.kernel=auto or reference)")
    if (fmt.m_q and ms is None) or (fmt.v_q and vs is None):
        raise ValueError("QAdamW C kernel: a quantized moment without its scales")


def get_kernel(name: str, device: torch.device):
    """Resolve a kernel name for tensors on ``device``.

    ``auto`` (default, overridable with ``$DSQ_OPTIM_KERNEL``): ``cpp`` on CPU when a C
    compiler is available, else ``eager``; ``eager`` on GPUs (use ``compile`` there).
    """
    name = kernel_choice.impl(name)
    if name == "auto":
        name = kernel_choice.impl(os.environ.get("DSQ_OPTIM_KERNEL", "").strip() or "auto")
    if name in ("auto", "cpp") and device.type == "cpu":
        lib = cpp_library()
        if lib is not None:
            return CppKernel(lib)
        return EagerKernel()
    if name == "compile":
        return CompiledKernel()
    return EagerKernel()
