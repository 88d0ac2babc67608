"""Checkpoint writes that return to training quickly (``train.async_ckpt``).

:meth:`BackgroundWriter.submit` does on the training thread only what must see the state as it
is at the step: DeepSpeed's ``save_checkpoint`` with its states copied to the CPU instead of
written, this rank's RNG state and the extra files (:func:`dsq.run.checkpoint.begin` with
``defer``). A thread then writes and fsyncs the files, the ranks agree (over a gloo group of
their own, so these collectives never interleave with training's), and rank 0 writes the
marker, ``latest`` and prunes: :meth:`dsq.run.checkpoint.Pending.complete`, the same rules as
a synchronous save, so a crash during a background write leaves the previous checkpoint as
``latest``. One write at a time: the next :meth:`submit` and :meth:`wait` (the end of the
run, a stop, which the trainer's checkpointer calls) wait for the pending one, and raise its
failure (:class:`dsq.run.diskfull.CheckpointWriteError`) on every rank, so none is lost.
:attr:`BackgroundWriter.stalls` holds the seconds each save blocked the training loop.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist

from dsq.run import checkpoint


class BackgroundWriter:
    """One rank's background checkpoint writer (every rank makes one, in the same order)."""

    def __init__(self):
        self.group = (dist.new_group(backend="gloo") if dist.is_available()
                      and dist.is_initialized() else None)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.stalls: List[float] = []

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def submit(self, engine, root: Path, step: int, client_state: Dict, keep: int,
               extra_files: Dict = None, loss: Optional[float] = None,
               finite: bool = True) -> str:
        """Start checkpoint ``step`` (all ranks); returns its tag, complete once :meth:`wait`
        returns. Waits for the write before it first."""
        t0 = time.perf_counter()
        self.wait()
        job = checkpoint.begin(engine, root, step, client_state, keep, extra_files, loss,
                               finite, defer=True)
        self._thread = threading.Thread(target=self._run, args=(job,),
                                        name=f"dsq-ckpt-{job.tag}")
        self._thread.start()
        self.stalls.append(time.perf_counter() - t0)
        return job.tag

    def _run(self, job) -> None:
        try:
            job.complete(self.group)
        except BaseException as e:  # raised on the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Wait for the pending write; raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
