"""The recipe of a quantized linear layer as plain data: the formats of its three operands and
how the backward GEMMs use them (:class:`LinearQuant`), the tensor-parallel reducers of their
statistics (:class:`Reducers`), and the plan of casts it makes (:meth:`LinearQuant.plan`,
:class:`LinearPlan`, in :mod:`dsq.quant.plan`).

Nothing here computes; :mod:`dsq.quant.linear` runs what these describe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from dsq.quant.format import QuantFormat
from dsq.quant.functional import Reduce
from dsq.quant.plan import BackwardOperands, Compute, GradGemms, LinearPlan, plan_for

_ALLOWED = {"weight": ("tensor", "channel", "group"),
            "activation": ("tensor", "token", "group"),
            "grad": ("tensor", "token", "group")}


@dataclass(frozen=True)
class LinearQuant:
    """Formats of the three operands of a quantized linear layer (None: not quantized).

    Each format may be given as anything :meth:`QuantFormat.parse` accepts (``"int8:token"``,
    a mapping, None); weights take tensor | channel | group, activations and gradients
    tensor | token | group. Integer and floating-point formats do not mix in one recipe; an
    ``fp8...:block<N>`` weight is quantized in N x N tiles (``:2d``).
    """

    weight: QuantFormat | None = None
    activation: QuantFormat | None = None
    grad: QuantFormat | None = None
    grad_gemms: GradGemms = GradGemms.WEIGHT
    """Backward GEMMs that use the quantized output gradient: weight | input | both."""
    check_finite: bool = False
    """Raise FloatingPointError at a quantizer fed inf/nan (costs a host sync per operand)."""
    compute: Compute = Compute.SIMULATE
    """simulate: float GEMMs on dequantized operands; int8: integer GEMMs where the formats
    allow (:meth:`plan`, :mod:`dsq.quant.linear`), simulated GEMMs elsewhere."""
    backward_operands: BackwardOperands = BackwardOperands.QUANTIZED
    """quantized: the backward GEMMs use ``Qw(W)`` and ``Qa(X)`` (the gradient of the quantized
    forward); full: ``W`` and ``X`` in full precision, as the study's code does."""

    def __post_init__(self):
        for name, allowed in _ALLOWED.items():
            fmt = QuantFormat.parse(getattr(self, name))
            if fmt is not None and fmt.granularity not in allowed:
                raise ValueError(f"{name} format {fmt}: granularity {fmt.granularity!r} does "
                                 f"not apply to the {name}; use one of {', '.join(allowed)}")
            if (name == "weight" and fmt is not None and fmt.is_float
                    and fmt.scaling == "block" and not fmt.square):
                fmt = dataclasses.replace(fmt, square=True)  # N x N tiles, as DeepSeek-V3's
            object.__setattr__(self, name, fmt)
        fmts = [f for f in (self.weight, self.activation, self.grad) if f is not None]
        if len({f.is_float for f in fmts}) > 1:
            raise ValueError(f"w={self.weight} a={self.activation} g={self.grad} mix integer "
                             f"and floating-point formats: use one family in a recipe")
        for name, option in (("grad_gemms", GradGemms), ("compute", Compute),
                             ("backward_operands", BackwardOperands)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, option(value))
            except ValueError:
                raise ValueError(f"{name}={value!r} is unknown: use one of "
                                 f"{', '.join(o.value for o in option)}") from None
        if self.is_float and self.compute is Compute.INT8:
            raise ValueError(f"compute=int8 runs integer formats; the floating-point formats "
                             f"w={self.weight} a={self.activation} g={self.grad} run with "
                             f"compute=simulate, or compute=fp8 (FP8 GEMMs on a GPU)")
        if not self.is_float and self.compute is Compute.FP8:
            raise ValueError(f"compute=fp8 runs floating-point formats (fp8e4m3:token, ...), "
                             f"not w={self.weight} a={self.activation} g={self.grad}: use "
                             f"compute=int8 or simulate")

    @property
    def is_float(self) -> bool:
        """Whether the formats are floating-point ones (:mod:`dsq.quant.floatfmt`)."""
        return any(f is not None and f.is_float for f in (self.weight, self.activation,
                                                           self.grad))

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
        return self.backward_operands is BackwardOperands.FULL

    def __str__(self) -> str:
        full = ", full-precision backward operands" if self.full_backward else ""
        return (f"w={self.weight} a={self.activation} g={self.grad} "
                f"(grad GEMMs: {self.grad_gemms}{full})")

    def plan(self, weight_shape: Sequence[int] | None = None) -> LinearPlan:
        """The casts of this recipe's six operand uses and how each GEMM runs
        (:class:`~dsq.quant.plan.LinearPlan`) for a weight of ``weight_shape`` ``[out, in]``
        (which decides ``dW``'s operand order and so which of ``X``, ``G`` may be packed); none:
        the plan as described at start-up, nothing packed."""
        dw_x_left = None if weight_shape is None else weight_shape[1] <= weight_shape[0]
        return plan_for(self, dw_x_left)


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
