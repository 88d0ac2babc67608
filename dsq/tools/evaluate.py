"""``dsq eval``: the loss and perplexity of a checkpoint on text, in one process, whatever
tensor-parallel size trained it (loading: :mod:`dsq.run.load`)."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from dsq.run.load import load_model, load_tokenizer, pinned
from dsq.train.evaluation import token_loss


class EvalError(ValueError):
    """Text that cannot be evaluated with the checkpoint; the message says why."""


def evaluate_checkpoint(path: str, data: List[str], max_seqs: Optional[int] = None) -> Dict:
    from dsq.data.prepare import load_documents
    from dsq.parallel import shutdown

    with pinned(path) as tag_dir:  # pruning cannot remove it while it is read
        sp = load_tokenizer(tag_dir)
        docs = load_documents(list(data))
        enc = _encoder(sp)
        ids = []
        for text in docs["text"]:
            ids.extend(enc(text))
            ids.append(sp.eos_id())
        try:
            model, cfg, tag_dir = load_model(str(tag_dir))
            L = cfg.model.seq_len
            n = (len(ids) - 1) // L
            if n < 1:
                raise EvalError(f"{data} has {len(ids)} tokens, fewer than one window of {L + 1}")
            if max_seqs:
                n = min(n, max_seqs)
            tokens = torch.from_numpy(np.asarray(ids[: n * L + 1], dtype=np.int64))
            bs = max(1, cfg.train.micro_batch)
            pos = torch.arange(L).unsqueeze(0)

            def batches():
                for i in range(0, n, bs):
                    rows = torch.stack([tokens[j * L: j * L + L + 1]
                                        for j in range(i, min(n, i + bs))])
                    yield rows[:, :-1], pos.expand(rows.shape[0], -1), rows[:, 1:]

            res = token_loss(model, batches(), "cpu")
        finally:
            shutdown()
        return dict(res, checkpoint=str(tag_dir))


def _encoder(sp):
    """dsq's text encoder for ``sp`` (the same one ``dsq prepare`` uses)."""
    from dsq.tools.hf_tokenizer import dsq_encoder

    return dsq_encoder(sp)
