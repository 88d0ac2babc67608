"""The evaluation loop shared by the trainer and ``dsq eval``."""

from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch


def token_loss(model, batches: Iterable[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               device, group=None) -> Dict:
    """Mean token loss of ``model`` over ``batches`` of ``(ids, position_ids, labels)``, summed
    in fp64 on ``device`` and over the ranks of ``group`` (one host sync at the end): the
    evaluation of both the trainer (each data-parallel rank its share of the validation
    sequences) and ``dsq eval``. Returns ``{"loss", "ppl", "tokens"}``."""
    from dsq.parallel import all_reduce_host

    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for ids, pos, labels in batches:
            losses = model(ids, pos, None, labels=labels).float()
            total += losses.double().sum()
            count += losses.numel()
    loss_sum, count = all_reduce_host([total.item(), count], "sum", group=group)
    if count == 0:
        raise ValueError("no validation tokens to evaluate")
    loss = loss_sum / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(count)}
