"""Evaluate a checkpoint on text in one process, whatever tensor-parallel size trained it.

Tensor-parallel shards (``mp_rank_XX_model_states.pt``) are merged by concatenating each
sharded tensor along the dimension where its shape differs from the unsharded model's:
megatron-core initialises full weights and splits them into contiguous chunks, so
concatenation is the exact inverse.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from dsq import checkpoint


class EvalError(ValueError):
    pass


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise EvalError(f"{path!r} does not exist: give a run directory (train.out_dir), its "
                        f"checkpoints/ folder or one checkpoint folder")
    if (p / checkpoint.MARKER).is_file():
        problem = checkpoint.check(p)
        if problem:
            raise EvalError(f"checkpoint {p} is incomplete: {problem}")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    tag = checkpoint.find_resume(root)
    if tag is None:
        raise EvalError(f"no complete checkpoint under {root}")
    return root / tag


def merged_state_dict(tag_dir: Path, reference: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise EvalError(f"{tag_dir} holds no mp_rank_*_model_states.pt files")
    shards = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    out = {}
    for key, ref in reference.items():
        if key not in shards[0]:
            if key.endswith("_extra_state"):
                continue
            raise EvalError(f"checkpoint {tag_dir} has no tensor {key!r}: it was written by a "
                            f"different model configuration")
        parts = [s[key] for s in shards]
        if not torch.is_tensor(parts[0]) or parts[0].shape == ref.shape:
            out[key] = parts[0]
            continue
        dims = [d for d in range(ref.ndim) if parts[0].shape[d] != ref.shape[d]]
        if len(dims) != 1:
            raise EvalError(f"cannot merge shards of {key!r}: {tuple(parts[0].shape)} vs "
                            f"{tuple(ref.shape)}")
        out[key] = torch.cat(parts, dim=dims[0])
    return out


def evaluate_checkpoint(path: str, data: List[str], max_seqs: Optional[int] = None) -> Dict:
    from dsq.config import load_config
    from dsq.data import tokenizer
    from dsq.data.prepare import load_documents
    from dsq.distributed import DistEnv, init_distributed, shutdown
    from dsq.models.gpt import build_gpt

    tag_dir = resolve_checkpoint(path)
    cfg = load_config([str(tag_dir / "config.yaml")], ["parallel.tp=1"])
    sp = tokenizer.load((tag_dir / "tokenizer.model").read_bytes(), str(tag_dir / "tokenizer.model"))
    docs = load_documents(list(data))
    ids = []
    for text in docs["text"]:
        ids.extend(tokenizer.encode(sp, text))
        ids.append(sp.eos_id())
    L = cfg.model.seq_len
    n = (len(ids) - 1) // L
    if n < 1:
        raise EvalError(f"{data} has {len(ids)} tokens, fewer than one window of {L + 1}")
    if max_seqs:
        n = min(n, max_seqs)
    tokens = torch.from_numpy(np.asarray(ids[: n * L + 1], dtype=np.int64))
    init_distributed(DistEnv(0, 1, 0), tp=1)
    try:
        model = build_gpt(cfg.model, "fp32", seed=0)
        sd = merged_state_dict(tag_dir, model.state_dict())
        model.load_state_dict(sd, strict=False)
        from dsq.models.quant_layers import apply_quantization

        apply_quantization(model, cfg.quant)  # evaluate the model that was trained
        model.eval()
        total, count = 0.0, 0
        bs = max(1, cfg.train.micro_batch)
        pos = torch.arange(L).unsqueeze(0)
        with torch.no_grad():
            for i in range(0, n, bs):
                rows = torch.stack([tokens[j * L: j * L + L + 1] for j in range(i, min(n, i + bs))])
                losses = model(rows[:, :-1], pos.expand(rows.shape[0], -1), None,
                               labels=rows[:, 1:]).float()
                total += losses.sum().item()
                count += losses.numel()
    finally:
        shutdown()
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count,
            "checkpoint": str(tag_dir)}
