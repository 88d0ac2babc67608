"""Which implementation runs dsq's kernels: one set of names, one precedence rule.

Two kernel families can be chosen: the quantization and rescale kernels of ``quant.compute:
int8`` (``quant.kernel``) and the QAdamW update (``optim.kernel``). Both take the same names:

============  ==============================================================================
``auto``      native on CPU where a C compiler exists, else reference; on CUDA Triton kernels
              through ``torch.compile`` for quantization (where Triton is installed), reference
              for the optimizer
``native``    C/OpenMP (CPU); falls back to reference for tensors it does not handle
``reference`` plain PyTorch, any device: the arithmetic the others are tested against
``compile``   the reference code under ``torch.compile`` (inductor on CPU, Triton on CUDA)
============  ==============================================================================

``cpp`` and ``eager`` are accepted as old names of ``native`` and ``reference``.

**Precedence** (the one rule): an environment variable that is set (``DSQ_QUANT_KERNEL``,
``DSQ_OPTIM_KERNEL``) wins over the config key, which wins over ``auto``. The variables take
the same names as the keys. :func:`resolve` applies the rule; :func:`describe` says what runs,
for the start-up line and the run's MLflow params.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional


class Kernel(str, enum.Enum):
    AUTO = "auto"
    NATIVE = "native"
    REFERENCE = "reference"
    COMPILE = "compile"


ALIASES = {"cpp": Kernel.NATIVE, "eager": Kernel.REFERENCE}
"""Old names, accepted everywhere a kernel name is."""

NAMES = tuple(k.value for k in Kernel)

ENV = {"quant": "DSQ_QUANT_KERNEL", "optim": "DSQ_OPTIM_KERNEL"}
"""The variable that overrides each family's config key."""

OVERRIDES = ("DSQ_QUANT_KERNEL", "DSQ_OPTIM_KERNEL", "DSQ_AMX_GEMM", "DSQ_ISA")
"""Environment variables that change which kernels run (recorded with the run)."""

_IMPL = {Kernel.AUTO: "auto", Kernel.NATIVE: "cpp", Kernel.REFERENCE: "eager",
         Kernel.COMPILE: "compile"}


def parse(value, where: str = "kernel") -> Kernel:
    """A kernel name (or old alias, any case) as a :class:`Kernel`; ValueError naming ``where``."""
    if isinstance(value, Kernel):
        return value
    name = str(value).strip().lower()
    if name in ALIASES:
        return ALIASES[name]
    try:
        return Kernel(name)
    except ValueError:
        raise ValueError(f"{where}={value!r}: use auto, native, reference or compile") from None


def impl(value) -> str:
    """The implementation name the kernel modules dispatch on (auto | cpp | eager | compile)."""
    return _IMPL[parse(value)]


@dataclass(frozen=True)
class KernelChoice:
    quant: Kernel = Kernel.AUTO
    optim: Kernel = Kernel.AUTO
    env: Dict[str, str] = field(default_factory=dict)
    """The overriding environment variables that were set (name -> value)."""


def resolve(cfg, environ: Optional[Mapping[str, str]] = None) -> KernelChoice:
    """The kernels of a run: ``$DSQ_*_KERNEL`` when set, else ``quant.kernel`` / ``optim.kernel``.
    ValueError names the variable or key of an unknown name."""
    environ = os.environ if environ is None else environ
    chosen = {}
    for family, var in ENV.items():
        value = environ.get(var, "").strip()
        chosen[family] = (parse(value, var) if value
                          else parse(getattr(cfg, family).kernel, f"{family}.kernel"))
    env = {k: environ[k] for k in OVERRIDES if environ.get(k, "").strip()}
    return KernelChoice(chosen["quant"], chosen["optim"], env)


def apply(choice: KernelChoice) -> None:
    """Make ``choice.quant`` the quantization kernel of this process (the optimizer's goes to
    :func:`dsq.optim.build_optimizer`)."""
    from dsq.quant import fused

    fused.set_kernel(impl(choice.quant))


def describe(choice: KernelChoice, qadamw: bool) -> Dict[str, str]:
    """What runs, as MLflow params: ``kernels.quant`` (and ``kernels.optim`` for QAdamW), the
    implementation with its instruction set where native, and ``env.NAME`` for each override."""
    out = {f"env.{k}": v for k, v in choice.env.items()}
    out["kernels.quant"] = _quant_running()
    if qadamw:
        out["kernels.optim"] = _optim_running(choice.optim)
    return out


def summary_line(params: Dict[str, str]) -> str:
    """The start-up line of :func:`describe`'s params."""
    parts = [f"quantization {params['kernels.quant']}"]
    if "kernels.optim" in params:
        parts.append(f"optimizer {params['kernels.optim']}")
    env = [f"{k[4:]}={v}" for k, v in params.items() if k.startswith("env.")]
    return "kernels: " + ", ".join(parts) + (f" (set by {', '.join(env)})" if env else "")


def _running_name(name: str, isa: str) -> str:
    return {"cpp": f"native/{isa}", "eager": "reference"}.get(name, name)


def _quant_running() -> str:
    import torch

    from dsq.quant import cpu_kernels, fused

    if torch.cuda.is_available():
        name = ("compile" if fused.kernel() in ("auto", "compile") and fused.has_triton()
                else "eager")
    else:
        name = fused._impl(torch.empty(0, 0))
    return _running_name(name, cpu_kernels.isa() if name == "cpp" else "")


def _optim_running(kernel: Kernel) -> str:
    import torch

    from dsq.optim import kernels as K

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k = K.get_kernel(impl(kernel), dev)
    return _running_name(k.name, K.isa() if k.name == "cpp" else "")
