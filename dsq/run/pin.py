"""Readers pin the checkpoint they read, so that the run writing beside them cannot prune it.

A reader (``dsq eval``, ``export``, ``generate``) holds a shared ``fcntl`` lock on
``<checkpoints>/.<tag>.readers`` while it reads ``<tag>`` (:func:`pinned`). The pruner
(:func:`remove`) takes that lock exclusively without waiting: when a reader holds it, the tag
is left for a later pruning; otherwise, under the lock, the tag is renamed out of the way
(``.<tag>.pruning``, atomically, so no reader can find it half deleted) and then deleted.
A reader checks, once it holds its lock, that the tag is still there and complete; when it
is not (pruned between choosing it and locking it), :func:`dsq.run.load.pinned` chooses
again. A reader that cannot create the lock file (a read-only run directory) reads unpinned.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from pathlib import Path
from typing import Iterator, Optional


def lock_path(tag_dir: Path) -> Path:
    return tag_dir.parent / f".{tag_dir.name}.readers"


@contextlib.contextmanager
def hold(tag_dir: Path) -> Iterator[bool]:
    """A shared (reader) lock on ``tag_dir`` for the block; yields whether it is held."""
    fh = None
    try:
        fh = open(lock_path(tag_dir), "a+")
    except OSError:  # a read-only run directory: nothing to protect it from, read unpinned
        pass
    try:
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_SH)
        yield fh is not None
    finally:
        if fh is not None:
            fh.close()  # releases the lock


def remove(tag_dir: Path) -> bool:
    """Delete ``tag_dir`` unless a reader holds it; returns whether it was deleted."""
    path = lock_path(tag_dir)
    fh: Optional[object] = None
    try:
        fh = open(path, "a+")
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return False
    except OSError:
        fh = None  # cannot lock here: delete as before
    try:
        gone = tag_dir.with_name(f".{tag_dir.name}.pruning")
        shutil.rmtree(gone, ignore_errors=True)  # left by a pruning that was killed
        try:
            tag_dir.rename(gone)
        except OSError:
            return False  # gone already
        shutil.rmtree(gone, ignore_errors=True)
        path.unlink(missing_ok=True)
        return True
    finally:
        if fh is not None:
            fh.close()


def sweep(root: Path) -> None:
    """Remove the lock files of tags that no longer exist and that no reader holds."""
    for path in root.glob(".step_*.readers"):
        if (root / path.name[1:-len(".readers")]).exists():
            continue
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            path.unlink(missing_ok=True)
