"""Complete-or-absent checkpoints on top of DeepSpeed's own checkpointing.

DeepSpeed writes model, optimizer and scheduler state (the client state holds the step, which
is the data position, and the config) into ``<root>/<tag>/``; every rank adds its RNG state,
and rank 0 the extra files (``config.yaml``, ``tokenizer.model``), each checked to hold all
its bytes. Every rank fsyncs the files it wrote and the tag's directory, and the ranks agree
that all of them succeeded (one all-reduce: a rank that failed does not leave the others
waiting). Only then does rank 0 write the marker ``dsq_complete.json``, which lists every
file of the tag with its size (and a SHA-256 of the extra files), fsynced, and then,
atomically, ``latest``; pruning of older tags comes last. A crash or a full disk at any point
therefore never leaves ``latest`` pointing at a partial checkpoint, and :func:`check`
re-verifies a tag against its marker (:func:`find_resume` falls back to the newest complete
tag, and the run directory's owner moves every tag that fails aside).

The marker also records the step's training loss and whether the state was a good one
(``finite``: see :mod:`dsq.train.health`); pruning keeps the newest ``keep`` complete tags and,
beyond them, the newest finite one, so a run that went bad never prunes its last good state.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from dsq.parallel import all_reduce_max, barrier

MARKER = "dsq_complete.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` (files created, renamed) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_write(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, durably (the file and its directory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_all(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it; raise unless the file holds all of it."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        size = os.fstat(fh.fileno()).st_size
    if size != len(data):
        raise OSError(f"{path}: {size} of {len(data)} bytes written")


def _fsync_files(paths) -> None:
    """fsync ``paths`` (DeepSpeed's ``torch.save`` closes its files, it does not sync them)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _recording(engine):
    """The paths this rank's DeepSpeed writes inside the block (its checkpoint engine's
    ``save`` calls), so that each rank syncs its own files and no other's; None when the
    engine has no checkpoint engine to watch (then every file of the tag is synced)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not callable(getattr(ce, "save", None)):
        yield None
        return
    written, save, patched = [], ce.save, "save" in vars(ce)

    def recorded(state_dict, path, *args, **kwargs):
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def save(engine, root: Path, step: int, client_state: Dict, keep: int, extra_files: Dict = None,
         loss: Optional[float] = None, finite: bool = True) -> str:
    """Write checkpoint ``step`` on all ranks; returns its tag once it is complete (see the
    module docstring). ``extra_files`` (name -> text or bytes) are written by rank 0;
    ``loss`` and ``finite`` go into the marker. A write that fails on any rank raises on every
    rank before the marker (the rank's own error there, a RuntimeError naming the tag
    elsewhere); the partial tag is moved aside by the next run."""
    tag = tag_for(step)
    rank = dist.get_rank()
    tag_dir = root / tag
    hashes, error = {}, None
    try:
        if rank == 0:  # a tag of this step left by an earlier attempt is not complete from now
            (tag_dir / MARKER).unlink(missing_ok=True)
        with _recording(engine) as written:
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state,
                                   save_latest=False)
        buf = io.BytesIO()
        torch.save(rng_state(), buf)
        _write_all(tag_dir / f"rng_rank{rank:05d}.pt", buf.getvalue())
        if rank == 0:
            for name, data in (extra_files or {}).items():
                data = data if isinstance(data, bytes) else data.encode()
                _write_all(tag_dir / name, data)
                hashes[name] = _sha256(data)
        # this rank's DeepSpeed files (its own were synced as written); rank 0 also every file
        # that is not a state (.pt) of some rank: what DeepSpeed copies beside the states
        mine = list(written or [])
        if written is None or rank == 0:
            mine += [p for p in tag_dir.rglob("*") if p.is_file() and (
                written is None or p.suffix != ".pt")]
        _fsync_files(sorted(set(mine)))
        _fsync_dir(tag_dir)
    except Exception as e:  # every rank learns of it below, before anything is marked
        error = e
    if all_reduce_max(1.0 if error is not None else 0.0) > 0:
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint {tag_dir} was not completed: another rank failed to "
                           f"write its part (its error is in its log)")
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size
                 for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MARKER}
        marker = {"step": step, "files": files, "sha256": hashes,
                  "loss": loss if loss is not None and math.isfinite(loss) else None,
                  "finite": bool(finite)}
        _fsync_write(tag_dir / MARKER, json.dumps(marker, indent=1, allow_nan=False))
        _fsync_write(root / LATEST, tag)
        _prune(root, keep)
    barrier()
    return tag


def _tags(root: Path) -> List[Tuple[int, str]]:
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p.name) for p in root.iterdir()
           if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(out, reverse=True)


def _marker(tag_dir: Path) -> Dict:
    return json.loads((tag_dir / MARKER).read_text())


def _prune(root: Path, keep: int) -> None:
    """Delete complete tags beyond the newest ``keep``, except the newest finite one."""
    complete = [t for _, t in _tags(root) if check(root / t) is None]
    finite = [t for t in complete if _marker(root / t).get("finite", True)]
    for tag in complete[keep:]:
        if finite and tag == finite[0]:
            continue
        shutil.rmtree(root / tag, ignore_errors=True)


def check(tag_dir: Path) -> Optional[str]:
    """None if the checkpoint is complete (every file its marker lists, at its size, the
    extra files with their SHA-256), else what is wrong with it."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return f"{tag_dir} has no {MARKER} (it was being written when the run stopped)"
    try:
        info = _marker(tag_dir)
        files, hashes = info["files"], info.get("sha256", {})
    except (ValueError, KeyError, TypeError):
        return f"{marker} is unreadable"
    for name, size in files.items():
        p = tag_dir / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} is truncated or changed ({p.stat().st_size} bytes, expected {size})"
    for name, digest in hashes.items():
        p = tag_dir / name
        if not p.is_file() or _sha256(p.read_bytes()) != digest:
            return f"{p} is changed or damaged (its SHA-256 differs from the marker's)"
    return None


def find_resume(root: Path, repair: bool = False, warn=None) -> Optional[str]:
    """The tag to resume from: ``latest`` if complete, else the newest complete one.

    With ``repair`` (only by the run directory's lock holder: a tag being written by a live run
    looks invalid too), every tag that fails :func:`check` is moved aside as
    ``<tag>.invalid-<time>`` (renamed, never deleted) with a warning, and ``latest`` is
    re-pointed at the tag returned (removed when there is none), so the run saves those steps
    again and readers of ``latest`` never meet the bad one. ``warn(message)`` reports each bad
    tag (default: ``warnings.warn``)."""
    warn = warn or (lambda m: warnings.warn(m, stacklevel=3))
    latest = root / LATEST
    wanted = latest.read_text().strip() if latest.is_file() else None
    found, bad = None, []
    if wanted and (root / wanted).is_dir():
        problem = check(root / wanted)
        if problem is None:
            found = wanted
        else:
            bad.append((wanted, problem))
    if found is None:
        for _, tag in _tags(root):
            if tag == wanted:
                continue
            problem = check(root / tag)
            if problem is None:
                found = tag
                break
            bad.append((tag, problem))
    if repair:  # the older ones too: a damaged tag is never resumed, pruned or read
        seen = {t for t, _ in bad} | {found}
        bad += [(t, p) for _, t in _tags(root) if t not in seen and (p := check(root / t))]
    for tag, problem in bad:
        if repair:
            aside = root / f"{tag}.invalid-{time.strftime('%Y%m%d-%H%M%S')}"
            (root / tag).rename(aside)
            warn(f"checkpoint {root / tag} is not usable ({problem}): moved aside to {aside.name}")
        else:
            warn(f"checkpoint {root / tag} is not usable ({problem}); skipping it")
    if repair and wanted != found:
        if found is not None:
            _fsync_write(latest, found)
        elif latest.is_file():
            latest.unlink()
    return found


def load(engine, root: Path, tag: str) -> Dict:
    """Restore DeepSpeed state and this rank's RNG; returns the client state."""
    _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
