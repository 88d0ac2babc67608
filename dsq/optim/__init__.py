"""Optimizers and their parameter groups.

Parameters are grouped by what they are (never by shard size), and the groups are carried
into DeepSpeed as separate param groups so that ZeRO's flattening keeps them apart:

- ``linear``: weights of column/row-parallel linear layers (weight decay on),
- ``embedding``: word and position embeddings (weight decay on),
- ``no_decay``: biases and norm parameters (weight decay off).
"""

from __future__ import annotations

from typing import Dict, List

import torch


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


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The client optimizer handed to ``deepspeed.initialize`` (``cfg`` is the ``optim`` section)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"optim.name={cfg.name!r} is not available")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors held in the optimizer state of this rank (its ZeRO partition only)."""
    total = 0
    seen = set()
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total
