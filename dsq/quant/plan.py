"""The plan of a quantized linear layer: one cast per operand use, as plain data.

With ``X[tokens, in]``, ``W[out, in]`` and ``G = dL/dY [tokens, out]`` the layer runs three GEMMs,
each on two operands, so six operand uses, each with its own :class:`Cast`::

    forward       Y  = X  @ W^T     x_for_y   w_for_y    reduce over in
    input grad    dX = G  @ W       g_for_dx  w_for_dx   reduce over out
    weight grad   dW = G^T @ X      g_for_dw  x_for_dw   reduce over tokens

A cast says the operand's format (None: full precision), the axis its scales lie along
(:class:`Axis`), what backward holds of it (:class:`Saved`), whether its codes are written in
the AMX driver's packed layout, how its GEMM runs (:class:`GemmKind`) and why. A recipe
(:class:`~dsq.quant.recipe.LinearQuant`) gives its plan with :meth:`LinearQuant.plan
<dsq.quant.recipe.LinearQuant.plan>`; :mod:`dsq.quant.linear` runs it. A new number format
(floating point, block scales) is a new format in a cast and, where the hardware has its GEMM,
a new :class:`GemmKind`, not a new flag.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsq.quant.format import QuantFormat

if TYPE_CHECKING:  # the recipe builds plans; a plan only reads it
    from dsq.quant.recipe import LinearQuant


class _Option(str, enum.Enum):
    """An option's value is its config spelling (so ``option == "int8"`` holds)."""

    def __str__(self) -> str:
        return self.value


class GradGemms(_Option):
    """Backward GEMMs that use the quantized output gradient."""

    WEIGHT = "weight"
    INPUT = "input"
    BOTH = "both"


class Compute(_Option):
    """simulate: float GEMMs on dequantized operands; int8: integer GEMMs where both operands
    allow them, simulated GEMMs elsewhere; fp8: ``torch._scaled_mm`` FP8 GEMMs on CUDA GPUs of
    compute capability 8.9+ where both operands are FP8 with tensor or row scales, simulated
    GEMMs elsewhere (:mod:`dsq.quant.fp8_gemm`)."""

    SIMULATE = "simulate"
    INT8 = "int8"
    FP8 = "fp8"


class BackwardOperands(_Option):
    """quantized: the backward GEMMs use ``Qw(W)`` and ``Qa(X)``; full: ``W`` and ``X`` in full
    precision (the study's code)."""

    QUANTIZED = "quantized"
    FULL = "full"


class Operand(enum.Enum):
    X = "activation"
    W = "weight"
    G = "grad"


class Gemm(enum.Enum):
    FORWARD = "forward"
    INPUT_GRAD = "input_grad"
    WEIGHT_GRAD = "weight_grad"

    @property
    def formula(self) -> str:
        return {"forward": "forward Y = X W^T", "input_grad": "input grad dX = G W",
                "weight_grad": "weight grad dW = G^T X"}[self.value]


class GemmKind(enum.Enum):
    FLOAT = "float GEMM on dequantized operands (simulated quantization)"
    INT8 = "integer GEMM: int8 x int8 -> int32, one rescale"
    FP8 = "FP8 GEMM: torch._scaled_mm on CUDA (compute capability 8.9+), else simulated"


class Axis(enum.Enum):
    """Where an operand's scales lie in its 2-D view."""

    ROW = "the recipe's scales: per row (token, output channel), group or tensor"
    COLUMN = "one scale per column (feature): the reduced dimension is the rows"


class Saved(enum.Enum):
    """What the forward holds for a backward use (forward casts: whether backward reuses it)."""

    NO = "nothing: cast in backward, or not used by backward"
    CODES = "codes and scales made in the forward"
    FULL = "the full-precision operand (cast in backward, if at all)"


@dataclass(frozen=True)
class Cast:
    """How one operand is cast for one GEMM."""

    operand: Operand
    gemm: Gemm
    format: QuantFormat | None
    axis: Axis
    saved: Saved
    packed: bool
    """Codes written as the AMX driver's packed ``B`` operand (where its kernel runs)."""
    kind: GemmKind
    reason: str


@dataclass(frozen=True)
class LinearPlan:
    """The six casts of a recipe (``recipe``) for one weight shape; see the module docstring."""

    recipe: LinearQuant
    dw_left: Operand | None
    """dW's row-major left operand (X when ``in <= out``: ``dW^T = X^T G``, else G), whose
    per-column codes are written transposed; None: a plan without a weight shape."""
    x_for_y: Cast
    w_for_y: Cast
    g_for_dx: Cast
    w_for_dx: Cast
    g_for_dw: Cast
    x_for_dw: Cast
    gemm_reasons: tuple[str, str, str]
    """Why each GEMM (in :class:`Gemm` order) runs as it does."""

    def kind(self, gemm: Gemm) -> GemmKind:
        return {Gemm.FORWARD: self.x_for_y, Gemm.INPUT_GRAD: self.w_for_dx,
                Gemm.WEIGHT_GRAD: self.x_for_dw}[gemm].kind

    def reason(self, gemm: Gemm) -> str:
        return self.gemm_reasons[list(Gemm).index(gemm)]

    @property
    def any_int8(self) -> bool:
        return any(self.kind(g) is GemmKind.INT8 for g in Gemm)

    def fallbacks(self) -> dict[Gemm, str]:
        """The GEMMs that run in floating point, and why."""
        return {g: self.reason(g) for g in Gemm if self.kind(g) is GemmKind.FLOAT}

    def casts(self) -> tuple[Cast, ...]:
        return (self.x_for_y, self.w_for_y, self.g_for_dx, self.w_for_dx, self.g_for_dw,
                self.x_for_dw)


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


def _first(*reasons: str | None) -> str | None:
    return "; ".join(r for r in reasons if r) or None


def _gemm_fallbacks(qc: LinearQuant) -> tuple[str | None, str | None, str | None]:
    """Why each GEMM is simulated (None: it runs as an integer GEMM): every GEMM under
    ``compute: simulate``; under ``int8``, those whose two operands the recipe does not quantize
    for it as integer codes (symmetric, per tensor/channel/token, no range floor)."""
    if qc.compute is Compute.SIMULATE:
        return ("quant.compute=simulate",) * 3
    a, w = int8_reason(qc.activation, "activation"), int8_reason(qc.weight, "weight")
    if qc.backward_operands is BackwardOperands.FULL:  # the study's backward: float GEMMs
        full = "backward_operands=full keeps X and W in full precision for backward"
        return _first(a, w), full, full
    g = int8_reason(qc.grad, "grad")
    unused = f"grad is not quantized for this GEMM (grad_gemms={qc.grad_gemms})"
    g_dx = g if qc.grad_gemms is not GradGemms.WEIGHT else unused
    g_dw = g if qc.grad_gemms is not GradGemms.INPUT else unused
    return _first(a, w), _first(g_dx, w), _first(g_dw, a)


def _per_column(fmt: QuantFormat) -> QuantFormat:
    """The per-column version of a per-row format (per tensor stays)."""
    return fmt if fmt.granularity == "tensor" else dataclasses.replace(fmt, granularity="channel")


@functools.lru_cache(maxsize=128)
def plan_for(qc: LinearQuant, dw_x_left: bool | None) -> LinearPlan:
    """The plan of ``qc`` when ``dW``'s GEMM takes ``X`` (True: ``in <= out``, ``dW^T = X^T G``)
    or ``G`` (False) as its row-major left operand, or, with None, a plan whose codes are never
    packed (a description)."""
    if qc.is_float:
        return _float_plan(qc, dw_x_left)
    reasons = _gemm_fallbacks(qc)
    k_fwd, k_dx, k_dw = (GemmKind.FLOAT if r else GemmKind.INT8 for r in reasons)
    X, W, G = Operand.X, Operand.W, Operand.G
    DX, DW = Gemm.INPUT_GRAD, Gemm.WEIGHT_GRAD
    a, w, g = qc.activation, qc.weight, qc.grad
    grad_gemms = f"grad_gemms={qc.grad_gemms}"

    def held(fmt):  # a backward use of the forward's cast: its codes, or the operand itself
        return Saved.CODES if fmt is not None else Saved.FULL

    # backward's W and X: the forward's codes, the full operand requantized per column (an
    # integer GEMM's scales must not vary along its reduced dimension), or the full operand
    if qc.backward_operands is BackwardOperands.FULL:
        why = "backward_operands=full"
        w_dx = Cast(W, DX, None, Axis.ROW, Saved.FULL, False, k_dx, why)
        x_dw = Cast(X, DW, None, Axis.ROW, Saved.FULL, False, k_dw, why)
    else:
        if k_dx is GemmKind.INT8 and w.granularity != "tensor":
            w_dx = Cast(W, DX, _per_column(w), Axis.COLUMN, Saved.FULL, True, k_dx,
                        "requantized per input column in backward: dX reduces over out")
        else:
            w_dx = Cast(W, DX, w, Axis.ROW, held(w), False, k_dx, "the forward's Qw(W)")
        if k_dw is GemmKind.INT8 and a.granularity != "tensor":
            x_dw = Cast(X, DW, _per_column(a), Axis.COLUMN, Saved.CODES, dw_x_left is False,
                        k_dw, "quantized per column in the forward: dW reduces over tokens")
        else:
            x_dw = Cast(X, DW, a, Axis.ROW, held(a), False, k_dw, "the forward's Qa(X)")
    if k_dw is GemmKind.INT8 and g.granularity != "tensor":
        g_dw = Cast(G, DW, _per_column(g), Axis.COLUMN, Saved.NO, dw_x_left is True, k_dw,
                    "quantized per column: dW reduces over tokens")
    else:
        g_dw = Cast(G, DW, g if qc.grad_gemms is not GradGemms.INPUT else None, Axis.ROW,
                    Saved.NO, False, k_dw, grad_gemms)
    g_dx = Cast(G, DX, g if qc.grad_gemms is not GradGemms.WEIGHT else None, Axis.ROW,
                Saved.NO, False, k_dx, grad_gemms)
    return _assemble(qc, dw_x_left, a, w, k_fwd, "", g_dx, w_dx, g_dw, x_dw, reasons,
                     "both operands are integer codes with scales off its reduced dimension")


def _assemble(qc, dw_x_left, a, w, k_fwd, fwd_where: str, g_dx: Cast, w_dx: Cast, g_dw: Cast,
              x_dw: Cast, reasons, kernel_reason: str) -> LinearPlan:
    """The plan from the backward's casts: the forward's casts are saved where backward uses
    them as they are; a GEMM without a reason of its own runs the kernel for ``kernel_reason``."""
    x_saved = Saved.CODES if x_dw.saved is Saved.CODES and x_dw.axis is Axis.ROW else Saved.NO
    w_saved = Saved.CODES if w_dx.saved is Saved.CODES else Saved.NO
    x, w_, fwd = Operand.X, Operand.W, Gemm.FORWARD
    return LinearPlan(
        recipe=qc, dw_left=None if dw_x_left is None else x if dw_x_left else Operand.G,
        x_for_y=Cast(x, fwd, a, Axis.ROW, x_saved, False, k_fwd, "the recipe's Qa" + fwd_where),
        w_for_y=Cast(w_, fwd, w, Axis.ROW, w_saved, False, k_fwd, "the recipe's Qw" + fwd_where),
        g_for_dx=g_dx, w_for_dx=w_dx, g_for_dw=g_dw, x_for_dw=x_dw,
        gemm_reasons=tuple(r or kernel_reason for r in reasons))


def describe_plan(qc: LinearQuant, kinds: list[str] | None = None) -> tuple[str, bool]:
    """A one-line account of what ``qc``'s plan does on layers ``kinds``, and whether a
    quantized operand's format keeps a GEMM from the integer path (worth a warning). A GEMM
    that is a float GEMM by the recipe's design (an operand it does not quantize for that GEMM,
    ``backward_operands=full``) is named, not warned about."""
    plan = qc.plan()
    where = f" ({', '.join(kinds)})" if kinds else ""
    if qc.is_float:
        fp8 = [g.formula for g in Gemm if plan.kind(g) is GemmKind.FP8]
        msg = (f"quant.compute={qc.compute} for {qc}{where}: floating-point formats, each "
               f"operand quantized along its GEMM's reduced dimension (W along in for Y, along "
               f"out for dX; X and G along tokens for dW)")
        if fp8:
            msg += f"; FP8 GEMMs where the GPU has them: {', '.join(fp8)}"
        fb = plan.fallbacks()
        if fb:
            msg += "; simulated (quantize-dequantize, float GEMMs): " + "; ".join(
                f"{g.formula}" + (f" because {v}" if qc.compute is Compute.FP8 else "")
                for g, v in fb.items())
        return msg, qc.compute is Compute.FP8 and bool(fb)
    int8 = [g.formula for g in Gemm if plan.kind(g) is GemmKind.INT8]
    fb = plan.fallbacks()
    msg = f"quant.compute={qc.compute} for {qc}{where}: integer GEMMs: {', '.join(int8) or 'none'}"
    if fb:
        msg += "; float GEMMs on dequantized operands: " + "; ".join(
            f"{g.formula} because {v}" for g, v in fb.items())
    limited = qc.compute is Compute.INT8 and any(
        f is not None and int8_reason(f, name) is not None
        for f, name in ((qc.weight, "weight"), (qc.activation, "activation"), (qc.grad, "grad")))
    return msg, limited


def fp8_reason(fmt, operand: str) -> str | None:
    """Why ``fmt`` cannot feed a ``torch._scaled_mm`` FP8 GEMM (None: it can)."""
    if fmt is None:
        return f"{operand} is not quantized"
    if not (fmt.is_float and fmt.fp8 and fmt.scaling in ("tensor", "channel", "token")):
        return f"{operand} {fmt} is not FP8 with tensor or row scales"
    return None


def _local(fmt) -> bool:
    """A format whose column copy is its row cast (one scale per tensor, or N x N tiles)."""
    return fmt is None or fmt.scaling == "tensor" or fmt.square


def _float_plan(qc: LinearQuant, dw_x_left: bool | None) -> LinearPlan:
    """Floating-point formats: each operand of each GEMM is quantized along that GEMM's reduced
    dimension, as Transformer Engine's row-wise and column-wise copies: ``W`` along ``in`` for
    ``Y`` and along ``out`` for ``dX``, ``X`` and ``G`` along tokens for ``dW``. A column copy
    of a per-tensor format or of N x N tiles is the row cast itself (saved, not recast)."""
    X, W, G = Operand.X, Operand.W, Operand.G
    FWD, DX, DW = Gemm.FORWARD, Gemm.INPUT_GRAD, Gemm.WEIGHT_GRAD
    a, w, g = qc.activation, qc.weight, qc.grad
    g_dx_fmt = g if qc.grad_gemms is not GradGemms.WEIGHT else None
    g_dw_fmt = g if qc.grad_gemms is not GradGemms.INPUT else None
    fp8 = qc.compute is Compute.FP8
    reasons = []
    for gemm, (f1, n1), (f2, n2) in ((FWD, (a, "activation"), (w, "weight")),
                                     (DX, (g_dx_fmt, "grad"), (w, "weight")),
                                     (DW, (g_dw_fmt, "grad"), (a, "activation"))):
        if gemm is not FWD and qc.backward_operands is BackwardOperands.FULL:
            f2, n2 = None, f"{n2} (backward_operands=full)"
        reasons.append(_first(fp8_reason(f1, n1), fp8_reason(f2, n2)) if fp8
                       else f"quant.compute={qc.compute}")
    k_fwd, k_dx, k_dw = (GemmKind.FLOAT if r else GemmKind.FP8 for r in reasons)
    held = Saved.CODES
    if qc.backward_operands is BackwardOperands.FULL:
        why = "backward_operands=full"
        w_dx = Cast(W, DX, None, Axis.ROW, Saved.FULL, False, k_dx, why)
        x_dw = Cast(X, DW, None, Axis.ROW, Saved.FULL, False, k_dw, why)
    else:
        w_dx = (Cast(W, DX, w, Axis.ROW, held if w else Saved.FULL, False, k_dx,
                     "the forward's Qw(W) (one scale per tensor, or N x N tiles)")
                if _local(w) else
                Cast(W, DX, w, Axis.COLUMN, Saved.FULL, False, k_dx,
                     "W's column copy, quantized along out in backward (dX reduces over out)"))
        x_dw = (Cast(X, DW, a, Axis.ROW, held if a else Saved.FULL, False, k_dw,
                     "the forward's Qa(X) (one scale per tensor)")
                if _local(a) else
                Cast(X, DW, a, Axis.COLUMN, Saved.CODES, False, k_dw,
                     "X's column copy along tokens, made in the forward (dW reduces over tokens)"))
    g_dw = Cast(G, DW, g_dw_fmt, Axis.ROW if _local(g_dw_fmt) else Axis.COLUMN, Saved.NO,
                False, k_dw, f"grad_gemms={qc.grad_gemms}; G's column copy along tokens")
    g_dx = Cast(G, DX, g_dx_fmt, Axis.ROW, Saved.NO, False, k_dx,
                f"grad_gemms={qc.grad_gemms}; G along out")
    return _assemble(qc, dw_x_left, a, w, k_fwd, ", along in", g_dx, w_dx, g_dw, x_dw, reasons,
                     "both operands are FP8 with tensor or row scales")
