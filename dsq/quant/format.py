"""Number formats of the linear (uniform) quantizer.

A :class:`QuantFormat` says how one operand of a linear layer is mapped to ``bits``-bit
integer codes ``q`` in ``[Qn, Qp] = [-2^(b-1), 2^(b-1) - 1]`` and back, ``x_hat = (q - z) s``:

* ``symmetric`` (default): ``s = max|x| / Qp``, ``z = 0``;
  ``asym``: ``s = (max - min) / (Qp - Qn)`` and an integer zero point ``z`` that maps ``min``
  to ``Qn`` (so 0.0 is exactly representable).
* granularity, i.e. which elements share one scale (the statistic's reduced dimensions):

  ========== =============================================================================
  tensor     one scale for the whole operand
  channel    weights ``W[out, in]``: one scale per output row (reduce over ``in``)
  token      activations ``X[tokens, in]`` / output gradients ``G[tokens, out]``: one scale
             per row (reduce over the feature dimension)
  group<N>   groups of ``N`` consecutive elements along the last dimension
  ========== =============================================================================

  ``channel`` and ``token`` are the same computation (reduce over the last dimension); the
  two names keep configs readable and let :class:`dsq.quant.LinearQuant` reject a per-token
  weight or a per-channel activation, which would not be what the user meant.
* rounding ``nearest`` (default, the study's) or ``stochastic`` (``floor(x/s + U[0,1))``,
  unbiased).
* ``min_range``: a floor under the range a scale is computed from (``max|x|``, or ``max - min``
  for ``asym``), as the study's code clamps it (1e-5 for weights and activations, 1e-9 for
  gradients). None (default): only a zero range is kept off zero (see
  :mod:`dsq.quant.functional`), so tiny tensors keep their full resolution.

Short strings, e.g. ``int8:channel``, ``int4:token:asym``, ``int8:group128``,
``int8:tensor:stochastic``, ``int8:channel:min=1e-5``, are parsed by :meth:`QuantFormat.parse` and produced by ``str``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dsq.quant.floatfmt import FloatFormat, is_float_spec

GRANULARITIES = ("tensor", "channel", "token", "group")
ROUNDINGS = ("nearest", "stochastic")
_SHORT = ("e.g. 'int8:channel', 'int4:token:asym', 'int8:group128', 'int8:tensor:stochastic', "
          "'int8:token:min=1e-5'")


@dataclass(frozen=True)
class QuantFormat:
    bits: int = 8
    """Code width, 2..8 (codes are stored as int8)."""
    granularity: str = "tensor"
    """tensor | channel | token | group (see the module docstring)."""
    group_size: int | None = None
    """Elements per group along the last dimension; required for, and only for, group."""
    symmetric: bool = True
    """Symmetric (zero point 0) or asymmetric (integer zero point from the minimum)."""
    rounding: str = "nearest"
    """nearest | stochastic."""
    min_range: float | None = None
    """Floor of the range a scale is computed from (the study's ``minimum_range``); None: none."""

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is invalid: use an integer from 2 to 8")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} is unknown: "
                             f"use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise ValueError(f"group granularity needs a positive integer group_size, "
                                 f"got {gs!r} (e.g. 'int8:group128')")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} is only valid with group "
                             f"granularity, not {self.granularity!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric={self.symmetric!r} must be true or false")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding {self.rounding!r} is unknown: "
                             f"use one of {', '.join(ROUNDINGS)}")
        mr = self.min_range
        if mr is not None:
            if isinstance(mr, bool) or not isinstance(mr, (int, float)) or not 0 < mr < float("inf"):
                raise ValueError(f"min_range={mr!r} is invalid: use a positive number "
                                 f"(e.g. 1e-5) or null for none")
            object.__setattr__(self, "min_range", float(mr))

    is_float = False

    def bits_per_element(self, cols: int | None = None, rows: int | None = None) -> float:
        """Storage bits per element, scales (fp32) and zero points (fp32) included, for an
        operand of ``rows`` x ``cols`` (``cols`` along the scales' rows); per-row and per-tensor
        scales count as free without them."""
        per = 32.0 * (1 if self.symmetric else 2)
        if self.granularity == "group":
            return self.bits + per / self.group_size
        n = cols if self.granularity != "tensor" else (cols * rows if cols and rows else None)
        return self.bits + (per / n if n else 0.0)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def __str__(self) -> str:
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        parts = [f"int{self.bits}", gran]
        if not self.symmetric:
            parts.append("asym")
        if self.rounding != "nearest":
            parts.append(self.rounding)
        if self.min_range is not None:
            parts.append(f"min={self.min_range:g}")
        return ":".join(parts)

    @classmethod
    def parse(cls, spec: Any) -> QuantFormat | FloatFormat | None:
        """A format from None/"none"/"" (-> None), a short string, a mapping, or a QuantFormat;
        floating-point format strings (``fp8e4m3:token``, ``mxfp8``, ``nvfp4``, ...) give a
        :class:`~dsq.quant.floatfmt.FloatFormat`.

        Raises ``ValueError`` naming the bad part and the valid choices.
        """
        if spec is None or isinstance(spec, (cls, FloatFormat)):
            return spec
        if isinstance(spec, str):
            return cls._parse_str(spec)
        if isinstance(spec, Mapping) or hasattr(spec, "keys"):
            return cls._parse_mapping(spec)
        raise ValueError(f"quantization format {spec!r} ({type(spec).__name__}) is not a "
                         f"string, a mapping or null: {_SHORT}")

    @classmethod
    def _parse_str(cls, spec: str) -> QuantFormat | None:
        s = spec.strip().lower()
        if s in ("", "none", "null", "off"):
            return None
        if is_float_spec(s):
            return FloatFormat.parse(spec)
        head, *rest = s.split(":")
        m = re.fullmatch(r"u?int(\d+)", head)
        if not m:
            raise ValueError(f"{spec!r}: {head!r} is not a width like 'int8' or 'int4' ({_SHORT})")
        if head.startswith("u"):
            raise ValueError(f"{spec!r}: unsigned formats are not supported; use "
                             f"'int{m.group(1)}:...:asym' for a one-signed operand")
        kw: dict = {"bits": int(m.group(1))}
        for part in rest:
            if part in ("tensor", "channel", "token"):
                key, val = "granularity", part
            elif g := re.fullmatch(r"group(\d+)", part):
                key, val = "granularity", "group"
                kw["group_size"] = int(g.group(1))
            elif part in ("sym", "asym"):
                key, val = "symmetric", part == "sym"
            elif part in ROUNDINGS:
                key, val = "rounding", part
            elif part.startswith("min="):
                key = "min_range"
                try:
                    val = float(part[4:])
                except ValueError:
                    raise ValueError(f"{spec!r}: {part!r} is not a range floor like 'min=1e-5'") from None
            else:
                raise ValueError(
                    f"{spec!r}: unknown part {part!r}; parts are a granularity "
                    f"(tensor, channel, token, group<N>), sym|asym, nearest|stochastic, min=<floor>")
            if key in kw:
                raise ValueError(f"{spec!r}: {key} is given twice")
            kw[key] = val
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{spec!r}: {e}") from None

    @classmethod
    def _parse_mapping(cls, spec) -> QuantFormat | None:
        kw = {str(k): spec[k] for k in spec}
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kw) - set(names))
        if unknown:
            raise ValueError(f"{dict(kw)}: unknown key(s) {', '.join(unknown)}; "
                             f"valid keys are {', '.join(names)}")
        if not kw:
            return None
        gran = kw.get("granularity")
        if isinstance(gran, str) and (g := re.fullmatch(r"group(\d+)", gran)):
            kw["granularity"], kw["group_size"] = "group", int(g.group(1))
        elif gran != "group":
            kw.pop("group_size", None)  # a default group_size next to another granularity
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{dict(kw)}: {e}") from None
