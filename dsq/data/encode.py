"""Tokenizing batches of documents in ``data.workers`` processes, results in submission order.

Each worker loads the sentencepiece model once (pool initializer) and encodes a whole batch in
one call (``SentencePieceProcessor.encode(list, num_threads=1)``, one thread per process). The
main process submits batches in source order with a bounded number in flight and consumes the
results in that order, so the bytes written do not depend on the number of workers, and memory
holds a few batches, not the corpus. One worker encodes in this process (no pool). A worker
that dies (out of memory, killed) stops the preparation with a :class:`DataError` instead of
hanging it.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dsq.data import tokenizer
from dsq.data.sources import DataError

_SP = None  # the worker's SentencePieceProcessor


class WorkerDied(DataError):
    """A tokenizer worker process died; the partial preparation is kept for resuming."""


def node_cores() -> int:
    """The cores this process may run on (the node's share under SLURM / taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init(model_bytes: bytes, parent: int) -> None:
    global _SP
    _SP = tokenizer.load(model_bytes)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker whose preparation was killed (``kill -9``, a node's OOM killer) exits within a
    second instead of waiting on its queue forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def encode_batch(texts: Sequence[str], groups: Optional[Sequence[int]], n_groups: int,
                 dtype: str, sp=None) -> List[np.ndarray]:
    """The token stream of each group of documents: every document's ids followed by EOS, in
    order (``groups[i]`` is document i's group; None: all in group 0)."""
    sp = sp or _SP
    ids = sp.encode(list(texts), num_threads=1)
    meta = [i for i, t in enumerate(texts) if "\u2581" in t]  # see tokenizer.encode
    for i in meta:
        ids[i] = tokenizer.encode(sp, texts[i])
    eos = sp.eos_id()
    out: List[List[int]] = [[] for _ in range(n_groups)]
    for i, doc in enumerate(ids):
        dst = out[groups[i] if groups is not None else 0]
        dst.extend(doc)
        dst.append(eos)
    return [np.array(o, dtype=dtype) for o in out]


Job = Tuple[object, Sequence[str], Optional[Sequence[int]]]  # (tag, texts, groups)


class Encoder:
    """``with Encoder(model_bytes, workers, dtype, n_groups) as enc: for tag, arrays in
    enc.map(jobs): ...`` -- results in the order of ``jobs``."""

    def __init__(self, model_bytes: bytes, workers: int, dtype: str, n_groups: int = 1):
        self.workers, self.dtype, self.n_groups = max(1, workers), dtype, n_groups
        self.model_bytes = model_bytes
        self.pool: Optional[ProcessPoolExecutor] = None
        self.sp = tokenizer.load(model_bytes) if self.workers == 1 else None

    def __enter__(self) -> "Encoder":
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init, initargs=(self.model_bytes, os.getpid()))
            for _ in range(self.workers):  # start them now: they load while the reader opens
                self.pool.submit(int)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def map(self, jobs: Iterable[Job]) -> Iterator[Tuple[object, List[np.ndarray]]]:
        if self.pool is None:
            for tag, texts, groups in jobs:
                yield tag, encode_batch(texts, groups, self.n_groups, self.dtype, self.sp)
            return
        pending: collections.deque = collections.deque()
        try:
            for tag, texts, groups in jobs:
                pending.append((tag, self.pool.submit(encode_batch, texts, groups,
                                                      self.n_groups, self.dtype)))
                if len(pending) >= 2 * self.workers:
                    tag0, fut = pending.popleft()
                    yield tag0, fut.result()
            while pending:
                tag0, fut = pending.popleft()
                yield tag0, fut.result()
        except BrokenProcessPool as e:
            raise WorkerDied(f"a tokenizer worker process died ({e or 'killed'}): out of memory? "
                            f"lower data.workers (now {self.workers}) or give the job more "
                            f"memory, then run the same command again (it resumes)") from None
