"""QAdamW's state of one flat tensor as an object: :class:`MomentState`.

It owns the tensors (each moment's storage: codes, or fp32 values for a 32-bit moment; the
quantized moments' scales; the fp32 moments ``exp_avg`` / ``exp_avg_sq`` of the unquantized
pieces), knows their formats (:mod:`dsq.optim.formats`) and where each piece lies
(:mod:`dsq.optim.layout`): views per piece for the kernels, per-element codes for resharding,
:meth:`~MomentState.dequantize`, :attr:`~MomentState.nbytes` and the state dict.

The state dict is the optimizer's ``state[p]`` and what checkpoints hold, with the keys of
every dsq version so far: ``step``; ``m_codes`` (int8, or uint8 with two 4-bit codes per
byte, or uint8 bytes of float8 codes) or ``m_fp32``, ``v_codes`` (uint8) or ``v_fp32``,
``m_scales`` / ``v_scales`` (fp32, one
per block piece-row, quantized moments only), ``exp_avg`` / ``exp_avg_sq`` (fp32 pieces). A
flat tensor of a group that quantizes nothing holds ``torch.optim.AdamW``'s state instead
(``exp_avg`` / ``exp_avg_sq`` shaped like the tensor). A :class:`MomentState` wraps the
tensors of such a dict without copying them (:meth:`~MomentState.of`), so the optimizer,
DeepSpeed and the checkpoint files keep seeing a plain dict.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from dsq.optim.formats import Fmt, Moment
from dsq.optim.layout import Layout, Piece


class MomentState:
    """The moments of one flat tensor under layout ``lay`` and formats ``fmt``: ``m``, ``v``
    (storage), ``m_scales``, ``v_scales`` (None for an fp32 moment), ``exp_avg``,
    ``exp_avg_sq`` (fp32 pieces) and ``step``."""

    __slots__ = ("lay", "fmt", "step", "m", "v", "m_scales", "v_scales", "exp_avg", "exp_avg_sq")

    def __init__(self, lay: Layout, fmt: Fmt, step: int, m, v, m_scales, v_scales, exp_avg,
                 exp_avg_sq):
        self.lay, self.fmt, self.step = lay, fmt, step
        self.m, self.v, self.m_scales, self.v_scales = m, v, m_scales, v_scales
        self.exp_avg, self.exp_avg_sq = exp_avg, exp_avg_sq

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(cls, lay: Layout, fmt: Fmt, p: torch.Tensor) -> "MomentState":
        """The state of the flat tensor ``p`` at step 0."""
        dev = p.device
        if not lay.quantized:
            z = [torch.zeros_like(p, memory_format=torch.preserve_format) for _ in range(2)]
            return cls(lay, fmt, 0, None, None, None, None, *z)

        def storage(mo: Moment, n: int):
            return torch.zeros(n, device=dev, dtype=mo.dtype)

        def scales(mo: Moment):
            return torch.zeros(lay.n_scales, dtype=torch.float32, device=dev) \
                if mo.quantized else None

        return cls(lay, fmt, 0, storage(fmt.m, lay.m_code_len), storage(fmt.v, lay.v_code_len),
                   scales(fmt.m), scales(fmt.v),
                   torch.zeros(lay.n_fp32, dtype=torch.float32, device=dev),
                   torch.zeros(lay.n_fp32, dtype=torch.float32, device=dev))

    @classmethod
    def of(cls, sd: Dict, lay: Layout, fmt: Fmt) -> "MomentState":
        """The state held by the state dict ``sd`` (its tensors, not copies)."""
        m, v = fmt.m, fmt.v
        return cls(lay, fmt, sd["step"], sd.get(m.key), sd.get(v.key), sd.get(m.scales_key),
                   sd.get(v.scales_key), sd["exp_avg"], sd["exp_avg_sq"])

    def loaded(self, device) -> "MomentState":
        """This state (read from a checkpoint) on ``device``, checked against its layout and
        formats: the dtype and size of every tensor; ValueError otherwise."""
        want = MomentState.zeros(self.lay, self.fmt, torch.empty(self.lay.numel, device="meta"))
        step = int(self.step.item()) if torch.is_tensor(self.step) else self.step
        got = [None if t is None else t.to(device) for t in (
            self.m, self.v, self.m_scales, self.v_scales, self.exp_avg, self.exp_avg_sq)]
        for name, t, w in zip(("m", "v", "m_scales", "v_scales", "exp_avg", "exp_avg_sq"), got,
                              (want.m, want.v, want.m_scales, want.v_scales, want.exp_avg,
                               want.exp_avg_sq)):
            if (t is None) != (w is None) or (t is not None and (
                    t.dtype != w.dtype or t.numel() != w.numel())):
                raise ValueError(f"optimizer state {name}: the checkpoint holds "
                                 f"{_describe(t)}, this layout needs {_describe(w)}")
        return MomentState(self.lay, self.fmt, step, *got)

    def state_dict(self) -> Dict:
        """``state[p]`` as the optimizer holds it and checkpoints store it (same tensors)."""
        sd: Dict = {"step": self.step}
        if self.lay.quantized:  # in the order of every version so far
            m, v = self.fmt.m, self.fmt.v
            sd[m.key], sd[v.key] = self.m, self.v
            for mo, s in ((m, self.m_scales), (v, self.v_scales)):
                if mo.quantized:
                    sd[mo.scales_key] = s
        sd["exp_avg"], sd["exp_avg_sq"] = self.exp_avg, self.exp_avg_sq
        return sd

    # ------------------------------------------------------------------ bytes
    def tensors(self):
        return [t for t in (self.m, self.v, self.m_scales, self.v_scales, self.exp_avg,
                            self.exp_avg_sq) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (what :meth:`Layout.state_bytes` predicts)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ------------------------------------------------------------------ views per piece
    def _len(self, mo: Moment, pc: Piece) -> int:
        if pc.kind == "rows":
            return pc.rows * mo.storage_len(pc.width)
        return mo.storage_len(pc.length)

    def storage(self, pc: Piece) -> Tuple[torch.Tensor, torch.Tensor]:
        """m's and v's storage of a quantized piece (flat views)."""
        return (self.m[pc.cm:pc.cm + self._len(self.fmt.m, pc)],
                self.v[pc.cv:pc.cv + self._len(self.fmt.v, pc)])

    def scales(self, pc: Piece) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """m's and v's scales of a quantized piece (``[rows]``; None for an fp32 moment)."""
        r = pc.rows
        return (self.m_scales[pc.s:pc.s + r] if self.fmt.m_q else None,
                self.v_scales[pc.s:pc.s + r] if self.fmt.v_q else None)

    def views(self, pc: Piece):
        """``(mc, ms, vc, vs)`` of a quantized piece as the kernels take them: a ``rows``
        piece's storage ``[rows, storage of width]``, a ``split`` one's flat."""
        mc, vc = self.storage(pc)
        if pc.kind == "rows":
            mc, vc = mc.view(pc.rows, -1), vc.view(pc.rows, -1)
        ms, vs = self.scales(pc)
        return mc, ms, vc, vs

    def fp32(self, pc: Piece) -> Tuple[torch.Tensor, torch.Tensor]:
        """m and v of an fp32 piece (slices of ``exp_avg`` / ``exp_avg_sq``)."""
        f = pc.f_off if self.lay.quantized else pc.start
        return (self.exp_avg.view(-1)[f:f + pc.length],
                self.exp_avg_sq.view(-1)[f:f + pc.length])

    # ------------------------------------------------------------------ values
    def piece_codes(self, pc: Piece) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-element codes (int16: integer codes, or the bytes of fp8 ones; an fp32 moment's
        values) of a quantized piece."""
        mc, vc = self.storage(pc)
        n = pc.length
        return self.fmt.m.codes(mc, n, torch.int16), self.fmt.v.codes(vc, n, torch.int16)

    def set_piece_codes(self, pc: Piece, qm: torch.Tensor, qv: torch.Tensor) -> None:
        """Inverse of :meth:`piece_codes`."""
        mc, vc = self.storage(pc)
        mc.copy_(self.fmt.m.encode(qm))
        vc.copy_(self.fmt.v.encode(qv))

    def dequantize(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(m, v)`` of the whole flat tensor, one value per element."""
        n = self.lay.numel
        dev = self.exp_avg.device
        m, v = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
        fm, fv = self.fmt.m, self.fmt.v
        for pc in self.lay.pieces:
            a, k = pc.start, pc.length
            if pc.kind == "fp32":
                m[a:a + k], v[a:a + k] = self.fp32(pc)
                continue
            mc, vc = self.storage(pc)
            qm, qv = fm.codes(mc, k), fv.codes(vc, k)  # fp32 code values
            sm, sv = self.scales(pc)
            m[a:a + k] = qm * _per_element(sm, pc) if fm.quantized else qm
            if fv.quantized:
                r = qv * _per_element(sv, pc)
                v[a:a + k] = r * r if self.fmt.v_sqrt else r
            else:
                v[a:a + k] = qv
        return m, v


def _per_element(scales: torch.Tensor, pc: Piece):
    if pc.kind == "rows":
        return scales.repeat_interleave(pc.width)[:pc.length]
    return scales[0]


def _describe(t: Optional[torch.Tensor]) -> str:
    return "nothing" if t is None else f"{t.numel()} {t.dtype}"
