"""The quantized linear layer as one autograd Function: three GEMMs, each with its quantizers.

With ``X[tokens, in]`` (any leading shape, flattened), ``W[out, in]`` and the output gradient
``G = dL/dY [tokens, out]``::

    forward       Y  = Qa(X)  @ Qw(W)^T          [tokens, out]
    input grad    dX = Qg'(G) @ Qw(W)            [tokens, in]
    weight grad   dW = Qg''(G)^T @ Qa(X)         [out, in]

``Qa``, ``Qw``, ``Qg`` are fake quantizers (quantize then dequantize, :mod:`dsq.quant.functional`)
with the formats of :class:`LinearQuant`; a format of None is the identity. ``grad_gemms``
chooses which backward GEMM sees the quantized gradient: ``weight`` (the study's default,
``Qg''= Qg``, ``Qg' = id``), ``input`` (the reverse) or ``both`` (one ``Qg(G)`` shared by the two).
The quantizers are straight-through: ``dX`` and ``dW`` are the exact gradients of the quantized
forward with ``dQ(x)/dx = 1``, so ``dW`` sees the same ``Qa(X)`` the forward used. Bias stays
outside (added by the caller in full precision).

``backward_operands: full`` is the study's backward instead (its code saves the full-precision
``X`` and ``W``): ``dX = Qg'(G) @ W`` and ``dW = Qg''(G)^T @ X``. The forward is the same; the
gradients are those of the full-precision layer evaluated at the quantized forward's ``G``, and
``X`` is held for backward in its own dtype (2-4 bytes per element, not 1).

Scales are computed in fp32 from the current tensors (fp32 or bf16 inputs); with
``compute: simulate`` (the default) the GEMMs run in the input dtype on the dequantized operands:
simulated quantization, as in the study. ``compute: int8`` runs each GEMM whose operands allow
it as an integer GEMM (int8 x int8 -> int32, then one rescale): :mod:`dsq.quant.int8` says which,
and where its backward GEMMs need other scale granularities than the recipe's.

Saved for backward (``backward_operands: quantized``, the default): the int8 codes and scales of ``Qa(X)`` and ``Qw(W)`` rather than the
full-precision operands, and only those the requested gradients need (``X`` only for ``dW``,
``W`` only for ``dX``). The activation held per linear drops from 2-4 bytes to about 1 byte per
element; ``W``'s codes cost 1 byte per parameter but spare a second quantization (and, under
tensor parallelism, a second statistics all-reduce) in backward, and keep ``dX`` consistent
with the forward even with stochastic rounding. An unquantized operand is saved as is.

Tensor parallelism: ``reduce_x``, ``reduce_w`` and ``reduce_g`` max-reduce the statistics of
``X``, ``W`` and ``G`` across the ranks sharing a scale (see :func:`dsq.quant.functional.quantize`);
the caller (``dsq.models.quant_layers``) decides which operands need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dsq.quant.format import QuantFormat
from dsq.quant.functional import QTensor, Reduce, quantize, signal_noise

GRAD_GEMMS = ("weight", "input", "both")
COMPUTES = ("simulate", "int8")
BACKWARD_OPERANDS = ("quantized", "full")
_ALLOWED = {"weight": ("tensor", "channel", "group"),
            "activation": ("tensor", "token", "group"),
            "grad": ("tensor", "token", "group")}


@dataclass(frozen=True)
class LinearQuant:
    """Formats of the three operands of a quantized linear layer (None: not quantized).

    Each format may be given as anything :meth:`QuantFormat.parse` accepts (``"int8:token"``,
    a mapping, None); weights take tensor | channel | group, activations and gradients
    tensor | token | group.
    """

    weight: QuantFormat | None = None
    activation: QuantFormat | None = None
    grad: QuantFormat | None = None
    grad_gemms: str = "weight"
    """Backward GEMMs that use the quantized output gradient: weight | input | both."""
    check_finite: bool = False
    """Raise FloatingPointError at a quantizer fed inf/nan (costs a host sync per operand)."""
    compute: str = "simulate"
    """simulate: float GEMMs on dequantized operands; int8: integer GEMMs where the formats
    allow (:mod:`dsq.quant.int8`), simulated GEMMs elsewhere."""
    backward_operands: str = "quantized"
    """quantized: the backward GEMMs use ``Qw(W)`` and ``Qa(X)`` (the gradient of the quantized
    forward); full: ``W`` and ``X`` in full precision, as the study's code does."""

    def __post_init__(self):
        for name, allowed in _ALLOWED.items():
            fmt = QuantFormat.parse(getattr(self, name))
            if fmt is not None and fmt.granularity not in allowed:
                raise ValueError(f"{name} format {fmt}: granularity {fmt.granularity!r} does "
                                 f"not apply to the {name}; use one of {', '.join(allowed)}")
            object.__setattr__(self, name, fmt)
        if self.grad_gemms not in GRAD_GEMMS:
            raise ValueError(f"grad_gemms={self.grad_gemms!r} is unknown: "
                             f"use one of {', '.join(GRAD_GEMMS)}")
        if self.compute not in COMPUTES:
            raise ValueError(f"compute={self.compute!r} is unknown: "
                             f"use one of {', '.join(COMPUTES)}")
        if self.backward_operands not in BACKWARD_OPERANDS:
            raise ValueError(f"backward_operands={self.backward_operands!r} is unknown: "
                             f"use one of {', '.join(BACKWARD_OPERANDS)}")

    @property
    def enabled(self) -> bool:
        return any(f is not None for f in (self.weight, self.activation, self.grad))

    @classmethod
    def from_config(cls, section: Any) -> LinearQuant:
        """From any object with ``weight, activation, grad, grad_gemms`` (strings, mappings, None)
        and optionally ``check_finite``, ``compute`` and ``backward_operands``."""
        return cls(weight=section.weight, activation=section.activation, grad=section.grad,
                   grad_gemms=getattr(section, "grad_gemms", "weight"),
                   check_finite=bool(getattr(section, "check_finite", False)),
                   compute=getattr(section, "compute", "simulate"),
                   backward_operands=getattr(section, "backward_operands", "quantized"))

    @property
    def full_backward(self) -> bool:
        return self.backward_operands == "full"

    def __str__(self) -> str:
        full = ", full-precision backward operands" if self.full_backward else ""
        return (f"w={self.weight} a={self.activation} g={self.grad} "
                f"(grad GEMMs: {self.grad_gemms}{full})")

    def int8_plan(self):
        """Which GEMMs run as integer GEMMs under ``compute: int8``
        (:func:`dsq.quant.int8.int8_plan`)."""
        from dsq.quant.int8 import int8_plan

        return int8_plan(self)


def _quant(x: Tensor, fmt: QuantFormat | None, reduce: Reduce | None, qc: LinearQuant,
           name: str) -> QTensor | None:
    if fmt is None:
        return None
    return quantize(x, fmt, reduce=reduce, check_finite=qc.check_finite, name=name)


def _record(capture: dict[str, Tensor] | None, name: str, x: Tensor, x_hat: Tensor) -> None:
    if capture is not None:
        terms = signal_noise(x, x_hat)
        capture[name] = capture[name] + terms if name in capture else terms


def _pack(q: QTensor | None, full: Tensor) -> tuple:
    return (full, None, None) if q is None else (q.codes, q.scale, q.zero_point)


def _unpack(saved, fmt: QuantFormat | None, dtype: torch.dtype) -> Tensor:
    codes, scale, zero_point = saved
    if fmt is None:
        return codes.to(dtype)
    return QTensor(codes, scale, zero_point, fmt, dtype).dequantize()


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, qc: LinearQuant, reduce_x, reduce_w, reduce_g, capture):
        x2 = x.reshape(-1, x.shape[-1])
        qx = _quant(x2, qc.activation, reduce_x, qc, "activation")
        qw = _quant(w, qc.weight, reduce_w, qc, "weight")
        x_hat = x2 if qx is None else qx.dequantize(x.dtype)
        w_hat = w if qw is None else qw.dequantize(x.dtype)
        if capture is not None:
            if qx is not None:
                _record(capture, "activation", x2, x_hat)
            if qw is not None:
                _record(capture, "weight", w, w_hat)
        # matmul on the original leading shape returns a fresh tensor, not a view of a 2-D one
        # (callers such as megatron's vocab-parallel cross entropy modify outputs in place)
        y = torch.matmul(x_hat.view(x.shape), w_hat.t())

        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        if qc.full_backward:
            qx = qw = None  # the study's backward: X and W as they are
        saved_x = _pack(qx, x2) if needs_dw else (None,) * 3
        saved_w = _pack(qw, w) if needs_dx else (None,) * 3
        ctx.save_for_backward(*saved_x, *saved_w)
        ctx.meta = (qc, reduce_g, capture, x.shape, w.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        qc, reduce_g, capture, x_shape, w_dtype = ctx.meta
        saved = ctx.saved_tensors
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        g2 = g.reshape(-1, g.shape[-1])
        q_dx = qc.grad is not None and qc.grad_gemms in ("input", "both") and needs_dx
        q_dw = qc.grad is not None and qc.grad_gemms in ("weight", "both") and needs_dw
        g_hat = g2
        if q_dx or q_dw:
            g_hat = _quant(g2, qc.grad, reduce_g, qc, "grad").dequantize()
            _record(capture, "grad", g2, g_hat)
        dx = dw = None
        full = qc.full_backward
        if needs_dx:
            w_hat = _unpack(saved[3:], None if full else qc.weight, g.dtype)
            dx = ((g_hat if q_dx else g2) @ w_hat).reshape(x_shape)
        if needs_dw:
            x_hat = _unpack(saved[:3], None if full else qc.activation, g.dtype)
            dw = ((g_hat if q_dw else g2).t() @ x_hat).to(w_dtype)
        return dx, dw, None, None, None, None, None


def quantized_linear(
    x: Tensor,
    weight: Tensor,
    qconfig: LinearQuant,
    *,
    bias: Tensor | None = None,
    reduce_x: Reduce | None = None,
    reduce_w: Reduce | None = None,
    reduce_g: Reduce | None = None,
    reduce_xt: Reduce | None = None,
    reduce_wt: Reduce | None = None,
    reduce_gt: Reduce | None = None,
    capture: dict[str, Tensor] | None = None,
) -> Tensor:
    """``Qa(x) @ Qw(weight)^T (+ bias)`` with the quantized backward described in the module
    docstring; with ``qconfig.compute == "int8"``, integer GEMMs (:mod:`dsq.quant.int8`).

    ``bias`` is added in full precision (``compute: int8`` adds it in the GEMM's epilogue).
    ``reduce_x/w/g`` max-reduce the statistics of each operand across tensor-parallel ranks;
    ``reduce_xt/wt/gt`` those of the per-column requantizations of ``compute: int8`` (statistics
    over each operand's rows). ``capture``, when a dict, accumulates ``[signal, noise]`` power
    sums of every quantized operand under the keys ``weight``, ``activation`` and ``grad`` (see
    :func:`dsq.quant.functional.signal_noise`); None (default) costs nothing.
    """
    if qconfig.compute == "int8" and qconfig.int8_plan().any_int8:
        from dsq.quant.int8 import int8_linear

        return int8_linear(x, weight, bias, qconfig,
                           (reduce_x, reduce_w, reduce_g, reduce_xt, reduce_wt, reduce_gt), capture)
    y = _QuantizedLinear.apply(x, weight, qconfig, reduce_x, reduce_w, reduce_g, capture)
    return y if bias is None else y + bias
