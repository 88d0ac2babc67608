"""Reading prepared token streams: fixed-length blocks and a resumable data-parallel schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from dsq.data.prepare import DataError, load_manifest


class TokenBlocks:
    """Block ``i`` of a flat token stream: ``tokens[i*L : i*L + L + 1]`` (memory-mapped)."""

    def __init__(self, prepared: Path, split: str, seq_len: int):
        manifest = load_manifest(prepared)
        path = Path(prepared) / f"{split}.bin"
        expected = manifest["tokens"][split] * np.dtype(manifest["dtype"]).itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:  # every rank checks its view of the file (node-local caches too)
            raise DataError(f"prepared data {path} has {max(size, 0):,} bytes, its manifest "
                            f"promises {expected:,}: the file was truncated or replaced; delete "
                            f"{Path(prepared)} to prepare it again")
        self.tokens = np.memmap(path, dtype=manifest["dtype"], mode="r")
        self.seq_len = seq_len
        self.n_blocks = max(0, (len(self.tokens) - 1) // seq_len)
        if self.n_blocks == 0:
            raise DataError(f"the {split} split has {len(self.tokens)} tokens, fewer than one "
                            f"sequence of model.seq_len={seq_len} + 1: give more {split} text "
                            f"or a shorter model.seq_len")

    def __len__(self) -> int:
        return self.n_blocks

    def batch(self, indices) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64 tokens."""
        L = self.seq_len
        rows = [np.asarray(self.tokens[i * L: i * L + L + 1], dtype=np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))


class GlobalSchedule:
    """Which blocks each optimizer step consumes: a pure function of (seed, step).

    Global sample ``g`` (counted over the whole run) is block ``perm_e[g mod n]`` where
    ``perm_e`` is a permutation drawn from ``seed`` and epoch ``e = g div n``. A step takes
    ``global_batch`` consecutive samples; data-parallel rank ``r`` takes the ``r``-th
    contiguous slice, and splits it into micro-batches. The position in the data is the step
    number alone, so a restart at step ``s`` reads exactly what an uninterrupted run would,
    and every layout of ranks sees the same global batch.
    """

    def __init__(self, n_blocks: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n_blocks, global_batch, seed
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if len(self._perms) >= 2:  # a step spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def step_indices(self, step: int) -> List[int]:
        out = []
        for g in range(step * self.global_batch, (step + 1) * self.global_batch):
            out.append(int(self._perm(g // self.n)[g % self.n]))
        return out

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch: int
                      ) -> List[List[int]]:
        idx = self.step_indices(step)
        per_rank = self.global_batch // dp_size
        mine = idx[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return [mine[i:i + micro_batch] for i in range(0, per_rank, micro_batch)]


def eval_indices(n_blocks: int, samples: int) -> List[int]:
    """A fixed, evenly spread subset of validation blocks (all of them when samples >= n)."""
    if samples >= n_blocks:
        return list(range(n_blocks))
    return [int(i) for i in np.linspace(0, n_blocks - 1, samples).round()]
