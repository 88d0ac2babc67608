"""The recipe of a quantized linear layer as plain data: the formats of its three operands,
how the backward GEMMs use them (:class:`LinearQuant`), the tensor-parallel reducers of their
statistics (:class:`Reducers`), and how each GEMM runs (:func:`gemm_plan`).

Nothing here computes; :mod:`dsq.quant.linear` runs what these describe.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from dsq.quant.format import QuantFormat
from dsq.quant.functional import Reduce

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
    allow (:func:`int8_plan`, :mod:`dsq.quant.linear`), simulated GEMMs elsewhere."""
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

    def plan(self) -> GemmPlan:
        """How each GEMM runs (:func:`gemm_plan`)."""
        return gemm_plan(self)



@dataclass(frozen=True)
class Reducers:
    """Max-reductions of quantization statistics across the tensor-parallel ranks that share a
    scale (None: the statistic is local). ``x``, ``w``, ``g``: the recipe's own statistics of
    ``X``, ``W``, ``G``; ``xt``, ``wt``, ``gt``: those of the per-column requantizations that
    integer backward GEMMs use (statistics over each operand's rows)."""

    x: Reduce | None = None
    w: Reduce | None = None
    g: Reduce | None = None
    xt: Reduce | None = None
    wt: Reduce | None = None
    gt: Reduce | None = None


NO_REDUCERS = Reducers()


GEMMS = {"forward": "forward Y = X W^T", "input_grad": "input grad dX = G W",
         "weight_grad": "weight grad dW = G^T X"}


def int8_reason(fmt: QuantFormat | None, operand: str) -> str | None:
    """Why ``fmt`` cannot feed an integer GEMM (None: it can)."""
    if fmt is None:
        return f"{operand} is not quantized"
    if not fmt.symmetric:
        return f"{operand} {fmt} is asymmetric (zero point)"
    if fmt.granularity == "group":
        return f"{operand} {fmt} has group scales"
    if fmt.bits > 8:
        return f"{operand} {fmt} is wider than 8 bits"
    if fmt.min_range is not None:
        return f"{operand} {fmt} has a range floor (min_range), which the integer kernels do not apply"
    return None


@dataclass(frozen=True)
class GemmPlan:
    """For each GEMM of a quantized linear, None when it runs as an integer GEMM (int8 x int8 ->
    int32 with its scale layout, see :mod:`dsq.quant.linear`), else why it is a floating-point
    GEMM on dequantized operands (simulated quantization)."""

    forward: str | None
    input_grad: str | None
    weight_grad: str | None

    @property
    def any_int8(self) -> bool:
        return None in (self.forward, self.input_grad, self.weight_grad)

    def fallbacks(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _first(*reasons: str | None) -> str | None:
    return "; ".join(r for r in reasons if r) or None


_SIMULATE = GemmPlan(*(("quant.compute=simulate",) * 3))


def gemm_plan(qc: LinearQuant) -> GemmPlan:
    """How each GEMM of ``qc``'s recipe runs: with ``compute: simulate`` all in floating point,
    with ``compute: int8`` as :func:`int8_plan` says."""
    return _SIMULATE if qc.compute == "simulate" else int8_plan(qc)


@functools.lru_cache(maxsize=64)
def int8_plan(qc: LinearQuant) -> GemmPlan:
    """Which GEMMs of ``qc``'s recipe run as integer GEMMs under ``compute: int8``: those whose
    two operands allow it (symmetric, per tensor/channel/token, no range floor) and which the
    recipe quantizes for that GEMM."""
    a, w = int8_reason(qc.activation, "activation"), int8_reason(qc.weight, "weight")
    g = int8_reason(qc.grad, "grad")
    if qc.full_backward:  # the study's backward: W and X in full precision, float GEMMs
        a_bw = w_bw = "backward_operands=full keeps X and W in full precision for backward"
        return GemmPlan(forward=_first(a, w),
                        input_grad=w_bw, weight_grad=a_bw)
    gd = {"input": "input", "both": "input"}.get(qc.grad_gemms)
    gw = {"weight": "weight", "both": "weight"}.get(qc.grad_gemms)
    return GemmPlan(
        forward=_first(a, w),
        input_grad=_first(g if gd else f"grad is not quantized for this GEMM "
                          f"(grad_gemms={qc.grad_gemms})", w),
        weight_grad=_first(g if gw else f"grad is not quantized for this GEMM "
                           f"(grad_gemms={qc.grad_gemms})", a))


def describe_plan(qc: LinearQuant, kinds: list[str] | None = None) -> tuple[str, bool]:
    """A one-line account of what ``compute: int8`` does with ``qc`` on layers ``kinds``,
    and whether any GEMM falls back to simulation."""
    plan = int8_plan(qc)
    where = f" ({', '.join(kinds)})" if kinds else ""
    int8 = [GEMMS[k] for k, v in dataclasses.asdict(plan).items() if v is None]
    fb = plan.fallbacks()
    msg = f"quant.compute=int8 for {qc}{where}: integer GEMMs: {', '.join(int8) or 'none'}"
    if fb:
        msg += "; simulated (float GEMM on dequantized operands): " + "; ".join(
            f"{GEMMS[k]} because {v}" for k, v in fb.items())
    return msg, bool(fb)
