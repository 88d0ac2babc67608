"""State for checkpoints: the files DeepSpeed's checkpoint engine writes (or, deferred, their
states copied to the CPU, which training can no longer change: what a background write
holds), an fsynced ``torch.save``, this rank's RNG state, and a failure report that can
travel between ranks."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from dsq.run.diskfull import nbytes


@contextlib.contextmanager
def recording(engine, defer: Optional[List] = None):
    """The paths this rank's DeepSpeed writes inside the block (its checkpoint engine's
    ``save`` calls), so that each rank syncs its own files and no other's, and the bytes of
    the states it saves (``.bytes``, the disk-full estimate); None when the engine has no
    checkpoint engine to watch (then every file of the tag is synced). With ``defer`` (a
    list), nothing is written: each state is copied to the CPU (:func:`snapshot`) and
    ``(state, path)`` appended, for :func:`write_state` to write later."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not callable(getattr(ce, "save", None)):
        if defer is not None:
            raise RuntimeError("a background checkpoint write needs DeepSpeed's checkpoint "
                               "engine; set train.async_ckpt=false")
        yield None
        return
    written, save, patched = Written(), ce.save, "save" in vars(ce)

    def recorded(state_dict, path, *args, **kwargs):
        written.bytes += nbytes(state_dict)
        if defer is not None:
            defer.append((snapshot(state_dict), Path(path)))
            out = None
        else:
            out = save(state_dict, path, *args, **kwargs)
        written.append(Path(path))
        return out

    ce.save = recorded
    try:
        yield written
    finally:
        if patched:
            ce.save = save
        else:
            del ce.save  # the class's method again


class Written(list):
    """The paths written, and ``bytes``: the tensor bytes of the states saved."""

    bytes = 0


def snapshot(obj, memo: Optional[Dict] = None):
    """A copy of a (nested) state dict that training cannot change: every tensor copied to the
    CPU (a tensor met twice stays one), containers rebuilt, other values deep-copied."""
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v, memo)) for k, v in obj.items()) \
            if type(obj) is not dict else {k: snapshot(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(snapshot(v, memo) for v in obj)
    try:
        return copy.deepcopy(obj)
    except Exception:  # an object that cannot be copied is kept as it is
        return obj


def write_state(state, path: Path) -> None:
    """``torch.save`` of a deferred state, fsynced (what DeepSpeed's engine would have written)."""
    with open(path, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def rng_state() -> Dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def portable(report):
    """A failure report that pickles: the exception as its type and first line."""
    full, needed, basis, e = report
    try:
        pickle.dumps(e)
    except Exception:
        e = RuntimeError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return full, needed, basis, e
