"""Checkpoint loading for every reader (``dsq eval``, ``export``, ``generate``, resharding):
which checkpoint a path means, its tensor-parallel shards merged into one model, the run's
tokenizer.

Tensor-parallel shards (``mp_rank_XX_model_states.pt``) are merged as megatron-core split them
(:func:`tp_layouts`, :func:`merge_shards`): it initialises a full weight, cuts it along the
partition dimension into ``tp * stride`` chunks and gives rank ``r`` the chunks ``r, r + tp,
...``. With stride 1 (every linear but one) that is a contiguous chunk per rank, and merging is
concatenation. The gated fc1 of a SwiGLU MLP is built with ``partition_stride=2``: rank ``r``
holds ``[gate_r; up_r]`` and the full weight is ``[gate_0; gate_1; ...; up_0; up_1; ...]``, not
the concatenation of the shards. Grouped-query attention's fused QKV keeps, per key/value
group, that group's query heads, its key and its value (``[q_g..., k_g, v_g]``), and every rank
holds whole groups (``parallel.tp`` divides ``model.num_query_groups``): concatenation again.
A sharded tensor whose layout the model does not describe is refused, never guessed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from dsq.run import checkpoint, pin


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names it and what to do."""


def resolve_checkpoint(path: str) -> Path:
    """The complete checkpoint folder ``path`` means (see :func:`pinned` to read it)."""
    p = Path(path)
    m = checkpoint.TAG_RE.match(p.name)
    if not p.exists() and m and p.parent.is_dir():
        newer = [t for s, t in checkpoint._tags(p.parent) if s > int(m.group(1))]
        why = (f"no longer exists (the run writing {p.parent} pruned it: train.keep_ckpts "
               f"keeps the newest)" if newer else "does not exist")
        raise CheckpointError(f"checkpoint {p} {why}: give the run directory {p.parent.parent} "
                              f"to read its newest complete checkpoint")
    if not p.exists():
        raise CheckpointError(f"{path!r} does not exist: give a run directory (train.out_dir), its "
                        f"checkpoints/ folder or one checkpoint folder")
    if (p / checkpoint.MARKER).is_file():
        problem = checkpoint.check(p)
        if problem:
            raise CheckpointError(f"checkpoint {p} is incomplete: {problem}")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    notes = []
    summary = p / "summary.json"
    if summary.is_file():  # a finished run: the checkpoint its results describe
        try:
            step = int(json.loads(summary.read_text())["final_step"])
        except (ValueError, KeyError, TypeError):
            step = None
        if step is not None:
            named = root / checkpoint.tag_for(step)
            problem = checkpoint.check(named) if named.is_dir() else f"{named} does not exist"
            if problem is None:
                return named
            notes.append(f"summary.json names step {step}, but {problem}")
    tag = checkpoint.find_resume(root, warn=notes.append)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint under {root}" +
                        (f" ({'; '.join(notes)})" if notes else ""))
    if notes:
        print(f"dsq: note: evaluating {tag}, the newest complete checkpoint: "
              f"{'; '.join(notes)}", file=sys.stderr)
    return root / tag


@contextlib.contextmanager
def pinned(path: str, tries: int = 5) -> Iterator[Path]:
    """The checkpoint ``path`` means (:func:`resolve_checkpoint`), pinned for the block so that
    the run writing beside it cannot prune it (:mod:`dsq.run.pin`). One pruned between being
    chosen and being pinned is chosen again (a run directory: the next newest complete one)."""
    problem = None
    for _ in range(tries):
        tag_dir = resolve_checkpoint(path)
        with pin.hold(tag_dir):
            problem = (checkpoint.check(tag_dir) if tag_dir.is_dir()
                       else f"{tag_dir} was removed")
            if problem is None:
                yield tag_dir
                return
        if tag_dir == Path(path):  # that one folder was asked for
            resolve_checkpoint(path)  # says what became of it
            break
    raise CheckpointError(f"the checkpoints of {path} changed {tries} times while being "
                          f"chosen ({problem}): the run writing there prunes faster than it "
                          f"can be read; raise its train.keep_ckpts, or copy one checkpoint "
                          f"folder away and read that")


def _read_shard(f: Path) -> Dict:
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, overwritten, not a torch file: one message
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"checkpoint file {f} is corrupt: {type(e).__name__}: {first}") from None
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(f"checkpoint file {f} holds no model state ('module')")
    return state["module"]


def tp_layouts(model) -> Dict[str, Tuple[int, int]]:
    """``{state-dict key: (partition dim, stride)}`` of ``model``'s tensor-parallel parameters,
    as megatron-core marks them (``tensor_model_parallel``, ``partition_dim``,
    ``partition_stride``)."""
    return {name: (int(p.partition_dim), int(getattr(p, "partition_stride", 1)))
            for name, p in model.named_parameters()
            if getattr(p, "tensor_model_parallel", False)}


def merge_shards(parts, dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor of the TP shards ``parts`` (rank order) cut along ``dim`` with
    ``stride``: the inverse of megatron-core's split (see the module docstring)."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def split_full(full: torch.Tensor, tp: int, rank: int, dim: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` at TP size ``tp``, as megatron-core cuts it."""
    chunks = full.chunk(tp * stride, dim=dim)
    return torch.cat(chunks[rank::tp], dim=dim)


def merged_state_dict(tag_dir: Path, reference: Dict[str, torch.Tensor],
                      layouts: Optional[Dict[str, Tuple[int, int]]] = None
                      ) -> Dict[str, torch.Tensor]:
    """The full (TP=1) state dict of ``reference``'s keys from the shards in ``tag_dir``, strictly.

    ``layouts`` (:func:`tp_layouts` of the reference model) says how each sharded tensor was cut;
    without it, every tensor is taken as cut contiguously along the one dimension where its
    shape differs from the reference (right for GPT-2, wrong for a gated fc1). Every key of
    ``reference`` must be in the checkpoint and every checkpoint key in ``reference``, else
    :class:`CheckpointError` names the key. ``*._extra_state`` entries are
    megatron's per-module extra state (Transformer Engine keeps fp8 metadata there; dsq's
    torch linears keep None): one the checkpoint lacks takes the model's own value, and a
    checkpoint entry the model does not have is an error only when it holds state (not None).
    """
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir} holds no mp_rank_*_model_states.pt files")
    shards = [_read_shard(f) for f in files]
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != set(shards[0]):
            diff = sorted(set(s) ^ set(shards[0]))
            raise CheckpointError(f"tensor-parallel shards of {tag_dir} hold different tensors "
                            f"({f.name} vs {files[0].name}: {diff[:3]})")
    unexpected = [k for k in shards[0] if k not in reference
                  and not (k.endswith("_extra_state") and shards[0][k] is None)]
    if unexpected:
        raise CheckpointError(f"checkpoint {tag_dir} has tensors the model does not: "
                        f"{', '.join(map(repr, unexpected[:5]))}: it was written by a different "
                        f"model configuration (its config.yaml does not match its weights)")
    out = {}
    for key, ref in reference.items():
        if key not in shards[0]:
            if key.endswith("_extra_state"):
                out[key] = ref
                continue
            raise CheckpointError(f"checkpoint {tag_dir} has no tensor {key!r}: it was written by a "
                            f"different model configuration")
        parts = [s[key] for s in shards]
        if not torch.is_tensor(parts[0]) or parts[0].shape == ref.shape:
            out[key] = parts[0]
            continue
        dims = [d for d in range(ref.ndim) if parts[0].shape[d] != ref.shape[d]]
        dim, stride = (layouts or {}).get(key, (dims[0] if len(dims) == 1 else None, 1))
        if layouts is not None and key not in layouts:
            dim = None  # the model does not say this tensor is sharded
        merged = None
        if dim is not None and dims == [dim] and parts[0].shape[dim] % stride == 0:
            merged = merge_shards(parts, dim, stride)
        if merged is None or merged.shape != ref.shape:
            raise CheckpointError(f"cannot merge the {len(parts)} shards of {key!r} "
                            f"({tuple(parts[0].shape)} each) into the model's {tuple(ref.shape)}"
                            f"{'' if dim is None else f' along dim {dim}, stride {stride}'}: "
                            f"a tensor-parallel layout dsq does not know")
        out[key] = merged
    return out


def load_model(path: str, quantize: bool = True, device: str = "cpu"):
    """``(model, cfg, tag_dir)``: the complete checkpoint at ``path`` as a TP=1 dsq GPT in eval
    mode on ``device``, weights loaded strictly (:func:`merged_state_dict`), the run's
    quantization applied when ``quantize`` (the model that was trained and evaluated).

    Initialises a one-process megatron/torch.distributed group; call
    :func:`dsq.parallel.shutdown` when done."""
    from dsq.config import ConfigError, load_config
    from dsq.models.gpt import build_gpt
    from dsq.parallel import DistEnv, init_distributed

    tag_dir = resolve_checkpoint(path)
    if not (tag_dir / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no config.yaml")
    try:
        cfg = load_config([str(tag_dir / "config.yaml")], ["parallel.tp=1"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {tag_dir}: config.yaml: {e}") from None
    init_distributed(DistEnv(0, 1, 0), tp=1)
    model = build_gpt(cfg.model, "fp32", seed=0)
    sd = merged_state_dict(tag_dir, model.state_dict(), tp_layouts(model))
    model.load_state_dict(sd, strict=True)
    if quantize:
        from dsq import runtime
        from dsq.models.quant_layers import apply_quantization

        runtime.apply_kernels(runtime.resolve_kernels(cfg))
        apply_quantization(model, cfg.quant)
    model.eval()
    return model.to(device), cfg, tag_dir


def load_tokenizer(tag_dir: Path):
    """The run's sentencepiece model saved with the checkpoint."""
    import sentencepiece as spm

    f = tag_dir / "tokenizer.model"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no tokenizer.model")
    try:
        return spm.SentencePieceProcessor(model_file=str(f))
    except Exception as e:
        raise CheckpointError(f"{f} is not a sentencepiece model: {str(e).splitlines()[0]}") from None
