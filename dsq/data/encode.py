"""Tokenizing in ``data.workers`` processes, results in submission order.

A job is a function and its arguments, run in a worker: :func:`encode_texts` tokenizes a batch
of documents the main process read, :func:`dsq.data.jsonl.encode_range` reads, parses and
tokenizes a byte range of a JSON lines file. Both return an :class:`Encoded`: every document's
ids then EOS, and each document's length, so the caller splits documents between outputs (the
validation hold-out) in source order. Each worker loads the sentencepiece model once (pool
initializer) and encodes a whole batch in one call (``SentencePieceProcessor.encode(list,
num_threads=1)``, one thread per process). The main process submits jobs in source order with a
bounded number in flight and consumes the results in that order, so the bytes written do not
depend on the number of workers, and memory holds a few batches, not the corpus. One worker
runs the jobs in this process (no pool). A worker that dies (out of memory, killed) stops the
preparation with a :class:`DataError` instead of hanging it; a job that raises one (bad input)
stops it with that error.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Tuple

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


class Encoded(NamedTuple):
    """A job's result."""

    ids: np.ndarray  # every document's ids followed by EOS, in order
    lengths: np.ndarray  # tokens of each document, EOS included
    nbytes: int = 0  # source bytes the job covered (progress)


def encode_texts(texts: Sequence[str], dtype: str, sp=None) -> Encoded:
    """The ids of each document then EOS (:func:`dsq.data.tokenizer.encode`'s ids)."""
    sp = sp or _SP
    ids = sp.encode(list(texts), num_threads=1)
    meta = [i for i, t in enumerate(texts) if "\u2581" in t]  # see tokenizer.encode
    for i in meta:
        ids[i] = tokenizer.encode(sp, texts[i])
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_text = np.ones(flat.size, dtype=bool)
    is_text[ends - 1] = False
    flat[is_text] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                                count=flat.size - len(ids))
    flat[ends - 1] = sp.eos_id()
    return Encoded(flat, lengths, sum(map(len, texts)))


Job = Tuple[object, Callable[..., Encoded], tuple]  # (tag, function, arguments)


class Encoder:
    """``with Encoder(model_bytes, workers) as enc: for tag, encoded in enc.map(jobs): ...``
    -- results in the order of ``jobs``; a job's function gets ``sp=`` when run here."""

    def __init__(self, model_bytes: bytes, workers: int):
        self.workers = max(1, workers)
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

    def map(self, jobs: Iterable[Job]) -> Iterator[Tuple[object, Encoded]]:
        if self.pool is None:
            for tag, fn, args in jobs:
                yield tag, fn(*args, sp=self.sp)
            return
        pending: collections.deque = collections.deque()
        try:
            for tag, fn, args in jobs:
                pending.append((tag, self.pool.submit(fn, *args)))
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
