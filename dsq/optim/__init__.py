"""Optimizers and their parameter groups.

Parameters are grouped by what they are (never by shard size), and the groups are carried
into DeepSpeed as separate param groups so that ZeRO's flattening keeps them apart:

- ``linear``: weights of column/row-parallel linear layers (weight decay on),
- ``embedding``: word and position embeddings (weight decay on),
- ``no_decay``: biases and norm parameters (weight decay off).

``optim.name=qadamw`` builds :class:`QAdamW` (quantized moments: step in
:mod:`dsq.optim.qadamw`; formats :mod:`dsq.optim.formats` <- layout :mod:`dsq.optim.layout`
<- a flat tensor's state :mod:`dsq.optim.state`; update kernels :mod:`dsq.optim.kernels`,
DeepSpeed attachment :mod:`dsq.optim.attach`);
``optim.quantize`` picks the kinds whose moments are quantized (``linear`` |
``linear+embedding`` | ``all``), the others keep fp32 moments.

Training-loop API::

    opt = build_optimizer(model, cfg.optim)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, config=...)
    attach_to_engine(engine)              # ZeRO-1/2: blocks follow parameters; no-op otherwise
    ...
    optimizer_state_bytes(engine.optimizer)   # this rank's optimizer state
"""

from __future__ import annotations

from typing import Dict, List

import torch

from dsq.optim.attach import attach_to_engine
from dsq.optim.qadamw import QAdamW

QUANTIZE_KINDS = {"linear": ("linear",), "linear+embedding": ("linear", "embedding"),
                  "all": ("linear", "embedding", "no_decay")}


def param_kind(name: str, param: torch.nn.Parameter) -> str:
    """Classify a parameter by its module path and shape: linear | embedding | no_decay."""
    if param.ndim < 2 or name.endswith(".bias") or "norm" in name:
        return "no_decay"
    if "embedding" in name:
        return "embedding"
    return "linear"


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Param groups keyed by kind; each group carries ``kind`` so optimizers can tell them apart."""
    buckets: Dict[str, List[torch.nn.Parameter]] = {"linear": [], "embedding": [], "no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[param_kind(name, p)].append(p)
    groups = []
    for kind, params in buckets.items():
        if params:
            groups.append({"params": params, "kind": kind,
                           "weight_decay": 0.0 if kind == "no_decay" else weight_decay})
    return groups


def build_optimizer(model: torch.nn.Module, cfg, kernel=None) -> torch.optim.Optimizer:
    """The client optimizer handed to ``deepspeed.initialize`` (``cfg`` is the ``optim`` section).

    ``adamw``: ``torch.optim.AdamW`` (foreach). ``qadamw``: :class:`QAdamW` with ``m_bits``,
    ``v_bits``, ``block_size`` and, per group, ``quantize`` from the group's kind and
    ``cfg.quantize``, ``m_format`` / ``v_format`` (when the section has them), ``v_domain``
    (linear | sqrt) and ``kernel`` (auto | native | reference |
    compile); ``kernel`` (a resolved :class:`dsq.native.kernel_choice.Kernel`) wins over ``cfg.kernel``.
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, foreach=True)
    if cfg.name == "qadamw":
        if cfg.quantize not in QUANTIZE_KINDS:
            raise ValueError(f"optim.quantize={cfg.quantize!r}: use one of "
                             f"{sorted(QUANTIZE_KINDS)}")
        for g in groups:
            g["quantize"] = g["kind"] in QUANTIZE_KINDS[cfg.quantize]
        return QAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      weight_decay=cfg.weight_decay, m_bits=cfg.m_bits, v_bits=cfg.v_bits,
                      block_size=cfg.block_size, v_domain=cfg.v_domain,
                      v_signed=bool(getattr(cfg, "v_signed", False)),
                      m_format=getattr(cfg, "m_format", None),
                      v_format=getattr(cfg, "v_format", None),
                      kernel=cfg.kernel if kernel is None else kernel)
    raise ValueError(f"optim.name={cfg.name!r} is not available")


def optimizer_line(cfg) -> str:
    """The start-up line of the ``optim`` section: the optimizer and its state format."""
    if cfg.name != "qadamw":
        return f"{cfg.name}, fp32 moments"
    def fmt(bits, name):
        form = getattr(cfg, f"{name}_format", None)
        if form is not None and form.startswith("fp8"):
            return f"{name} {form}"
        return f"{name} fp32" if bits == 32 else f"{name} {bits}-bit"

    block = (f"blocks of {cfg.block_size}" if isinstance(cfg.block_size, int)
             else f"one scale per {cfg.block_size}")
    return (f"qadamw, {fmt(cfg.m_bits, 'm')}, {fmt(cfg.v_bits, 'v')} ({cfg.v_domain}"
            f"{', signed' if cfg.v_signed else ''}), {block}, quantized states for "
            f"{cfg.quantize} parameters")


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of tensors held in the optimizer state of this rank (its ZeRO partition only).

    Accepts the client optimizer or DeepSpeed's wrapper (``engine.optimizer``); counts the
    moments (codes, scales, fp32 moments), not the master weights.
    """
    total = 0
    seen = set()
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


__all__ = ["QAdamW", "attach_to_engine", "build_optimizer", "optimizer_line",
           "optimizer_state_bytes",
           "param_groups", "param_kind"]
