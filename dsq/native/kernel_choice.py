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
the same names as the keys. :func:`dsq.runtime.resolve_kernels` applies the rule;
:func:`dsq.runtime.describe_kernels` says what runs, for the start-up line and MLflow params.
This module holds the names only, so the kernel modules can depend on it.
"""

from __future__ import annotations

import enum


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
