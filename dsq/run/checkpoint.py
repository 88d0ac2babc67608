"""Complete-or-absent checkpoints on top of DeepSpeed's own checkpointing.

DeepSpeed writes model, optimizer and scheduler state into ``<root>/<tag>/``; every rank
adds its RNG state. Only when all ranks are done (a barrier) does rank 0 write the marker
``dsq_complete.json`` (the size of every file of the tag) and then, atomically, ``latest``.
A crash while writing therefore never leaves ``latest`` pointing at a partial checkpoint,
and :func:`find_resume` re-checks the sizes, falling back to the newest complete tag.
"""

from __future__ import annotations

import json
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

from dsq.parallel import barrier

MARKER = "dsq_complete.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def save(engine, root: Path, step: int, client_state: Dict, keep: int, extra_files: Dict = None
         ) -> str:
    """Write checkpoint ``step`` on all ranks; returns its tag once it is complete.
    ``extra_files`` (name -> text or bytes) are written by rank 0 before the completion marker."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        for name, data in (extra_files or {}).items():
            path = root / tag / name
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    barrier()
    if rank == 0:
        files = {str(p.relative_to(root / tag)): p.stat().st_size
                 for p in sorted((root / tag).rglob("*")) if p.is_file() and p.name != MARKER}
        _fsync_write(root / tag / MARKER, json.dumps({"step": step, "files": files}, indent=1))
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


def _prune(root: Path, keep: int) -> None:
    complete = [t for _, t in _tags(root) if check(root / t) is None]
    for tag in complete[keep:]:
        shutil.rmtree(root / tag, ignore_errors=True)


def check(tag_dir: Path) -> Optional[str]:
    """None if the checkpoint is complete, else what is wrong with it."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return f"{tag_dir} has no {MARKER} (it was being written when the run stopped)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return f"{marker} is unreadable"
    for name, size in files.items():
        p = tag_dir / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} is truncated or changed ({p.stat().st_size} bytes, expected {size})"
    return None


def find_resume(root: Path, repair: bool = False, warn=None) -> Optional[str]:
    """The tag to resume from: ``latest`` if complete, else the newest complete one.

    With ``repair`` (only by the run directory's lock holder: a tag being written by a live run
    looks invalid too), every invalid tag newer than the one returned is moved aside as
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
