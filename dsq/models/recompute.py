"""Activation recompute (``train.recompute``): keep fewer activations for backward and compute
them again there, with the same numbers.

Modes:

* ``none``: every activation backward needs is kept.
* ``selective``: each layer's core attention (:class:`dsq.models.attention.SDPAttention`) keeps
  only its inputs ``q, k, v``; its output (and softmax statistics, or the ``[s, s]`` scores
  where the attention kernel keeps them) is recomputed.
* ``full``: each transformer layer keeps only its input and recomputes everything else, one
  layer at a time (megatron's ``recompute_method="uniform"``, ``recompute_num_layers=1``).
  Embeddings, the final norm, the LM head and the loss are never recomputed.

Engines (:class:`Recompute`), with the same regions:

* ``megatron``: megatron-core's ``TransformerConfig`` switches (:meth:`Recompute.switches`), so
  its ``TransformerBlock._checkpointed_forward`` and ``Attention._checkpointed_attention_forward``
  run ``tensor_parallel.checkpoint`` (a reentrant autograd Function that also forks megatron's
  CUDA RNG tracker). That function reads the CUDA generator's state at every call, so it fails
  on a torch without CUDA (megatron-core 0.16): this engine runs where CUDA is available.
* ``torch``: ``torch.utils.checkpoint`` (non-reentrant, ``preserve_rng_state=True``) around
  the same regions: :class:`RecomputedTransformerLayer` (``full``) and ``SDPAttention`` with
  ``recompute=True`` (``selective``), chosen through the layer spec. Everywhere else.

The same numbers. A recomputed region gives bit-identical losses and gradients to ``none``
(``tests/unit/models/test_recompute.py``) because its second forward computes the same values:

* quantization scales come from the current tensors (:mod:`dsq.quant.functional`: no running
  state), the same inputs and weights in the recompute; under tensor parallelism their
  statistics are all-reduced again, in the same order on every rank;
* stochastic rounding draws ``torch.rand`` from the default generator of the tensor's device
  (``generator=None`` in :func:`dsq.quant.functional.quantize`), as dropout does. Both engines
  save that generator's state (``torch.get_rng_state()`` on CPU; the CUDA generator's too) when
  the region runs forward, set it back for the recompute and restore the backward's state after:
  the recompute draws the forward's bits, and the backward's own draws (the gradient's
  stochastic rounding) are those it makes without recompute.

Kernels that are not deterministic run to run (some GPU attention backward kernels) differ
with or without recompute alike. SQNR capture (:func:`dsq.models.quant_layers.set_sqnr_capture`)
sees a recomputed forward twice: activation and weight signal and noise sums both double, so
their dB are unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.transformer.transformer_layer import TransformerLayer

MODES = ("none", "selective", "full")
ENGINES = ("megatron", "torch")


def megatron_engine_runs() -> bool:
    """Whether megatron-core's ``tensor_parallel.checkpoint`` can run here (it saves and
    restores the CUDA generator's state, so it needs CUDA)."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Recompute:
    """A recompute mode and the engine that runs it."""

    mode: str = "none"
    """none | selective | full."""
    engine: Optional[str] = None
    """megatron | torch; None: megatron where :func:`megatron_engine_runs`, else torch."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"recompute mode {self.mode!r} is unknown: use none, selective or "
                             f"full")
        if self.engine is None:
            object.__setattr__(self, "engine",
                               "megatron" if megatron_engine_runs() else "torch")
        if self.engine not in ENGINES:
            raise ValueError(f"recompute engine {self.engine!r} is unknown: use megatron or "
                             f"torch")

    @classmethod
    def of(cls, value) -> "Recompute":
        """A :class:`Recompute` from itself, a mode name or None (``none``)."""
        return value if isinstance(value, cls) else cls(value or "none")

    def switches(self) -> dict:
        """megatron-core ``TransformerConfig`` keywords (empty unless the megatron engine
        recomputes)."""
        if self.mode == "none" or self.engine != "megatron":
            return {}
        if self.mode == "selective":
            return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)

    @property
    def torch_full(self) -> bool:
        """dsq wraps each layer in ``torch.utils.checkpoint``."""
        return self.mode == "full" and self.engine == "torch"

    @property
    def torch_selective(self) -> bool:
        """dsq wraps each core attention in ``torch.utils.checkpoint``."""
        return self.mode == "selective" and self.engine == "torch"


def recomputed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its activations recomputed in backward (non-reentrant
    ``torch.utils.checkpoint``, replaying the default generators' random numbers)."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


class RecomputedTransformerLayer(TransformerLayer):
    """megatron's ``TransformerLayer`` that, training with autograd on, keeps only its inputs
    and recomputes its forward in backward (``train.recompute: full`` on the torch engine).
    No state of its own: parameters, state-dict keys and checkpoints are the parent's."""

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return recomputed(super().forward, *args, **kwargs)
        return super().forward(*args, **kwargs)
