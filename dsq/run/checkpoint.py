"""Complete-or-absent checkpoints on top of DeepSpeed's own checkpointing.

DeepSpeed writes model, optimizer and scheduler state (the client state holds the step, which
is the data position, and the config) into ``<root>/<tag>/``; every rank adds its RNG state,
and rank 0 the extra files (``config.yaml``, ``tokenizer.model``), each checked to hold all
its bytes. Every rank fsyncs the files it wrote and the tag's directory, and the ranks agree
that all of them succeeded (one all-reduce: a rank that failed does not leave the others
waiting). Only then does rank 0 write the marker ``dsq_complete.json``, which lists every
file of the tag with its size (and a SHA-256 of the extra files), fsynced, and then,
atomically, ``latest``; pruning of older tags comes last. A crash or a full disk at any point
therefore never leaves ``latest`` pointing at a partial checkpoint. A write that fails (a
full disk: :mod:`dsq.run.diskfull`) raises :class:`CheckpointWriteError` on every rank, one
line naming the checkpoint, the bytes needed and free, after rank 0 moved the partial tag
aside as ``<tag>.invalid-<time>``; nothing older was pruned. The state can also be taken on
the training thread and written later (:func:`begin`, :meth:`Pending.complete`,
:mod:`dsq.run.async_ckpt`) under the same rules. :func:`check`
re-verifies a tag against its marker (:func:`find_resume` falls back to the newest complete
tag, and the run directory's owner moves every tag that fails aside).

The marker also records the step's training loss and whether the state was a good one
(``finite``: see :mod:`dsq.train.health`); pruning keeps the newest ``keep`` complete tags and,
beyond them, the newest finite one, so a run that went bad never prunes its last good state.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dsq.parallel import all_reduce_max, broadcast_object, gather_ints
from dsq.run import diskfull, pin
from dsq.run.diskfull import CheckpointWriteError, is_disk_full
from dsq.run.state import Written as _Written
from dsq.run.state import portable as _portable
from dsq.run.state import recording as _recording
from dsq.run.state import rng_state, set_rng_state, snapshot  # noqa: F401 (part of this API)
from dsq.run.state import write_state as _write_state

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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Pending:
    """One checkpoint between :func:`begin` (on the training thread: DeepSpeed's state taken,
    with ``defer`` copied to the CPU instead of written) and :meth:`complete` (writing what was
    deferred, the RNG state and the extra files, fsync, the ranks' agreement, then rank 0's
    marker, ``latest`` and pruning); :func:`save` does both at once, :mod:`dsq.run.async_ckpt`
    the second in a background thread. Failures raise :class:`CheckpointWriteError` (a full
    disk: :mod:`dsq.run.diskfull`) on every rank, after rank 0 moved the partial tag aside."""

    def __init__(self, root: Path, step: int, keep: int, loss: Optional[float], finite: bool):
        self.root, self.step, self.keep = root, step, keep
        self.tag, self.loss, self.finite = tag_for(step), loss, finite
        self.tag_dir = root / self.tag
        self.rank = dist.get_rank()
        self.deferred: List = []
        self.written: Optional[_Written] = None
        self.extra: Dict[str, bytes] = {}
        self.rng = b""
        self.error: Optional[BaseException] = None

    def complete(self, group=None) -> str:
        """Finish the checkpoint on this rank (all ranks call it; collectives over ``group``)."""
        hashes = {}
        if self.error is None:
            try:
                for state, path in self.deferred:
                    _write_state(state, path)
                self.deferred = []
                _write_all(self.tag_dir / f"rng_rank{self.rank:05d}.pt", self.rng)
                for name, data in self.extra.items():
                    _write_all(self.tag_dir / name, data)
                    hashes[name] = _sha256(data)
                # this rank's DeepSpeed files (its own were synced as written); rank 0 also
                # every file that is not a state (.pt) of some rank: what DeepSpeed copies
                # beside the states
                written = self.written
                mine = list(written or [])
                if written is None or self.rank == 0:
                    mine += [p for p in self.tag_dir.rglob("*") if p.is_file() and (
                        written is None or p.suffix != ".pt")]
                _fsync_files(sorted(set(mine)))
                _fsync_dir(self.tag_dir)
            except Exception as e:  # every rank learns of it below, before anything is marked
                self.error = e
        self._agree(self.error, group)
        error = None
        if self.rank == 0:
            try:
                files = {str(p.relative_to(self.tag_dir)): p.stat().st_size
                         for p in sorted(self.tag_dir.rglob("*"))
                         if p.is_file() and p.name != MARKER}
                loss = self.loss
                marker = {"step": self.step, "files": files, "sha256": hashes,
                          "loss": loss if loss is not None and math.isfinite(loss) else None,
                          "finite": bool(self.finite)}
                _fsync_write(self.tag_dir / MARKER, json.dumps(marker, indent=1,
                                                               allow_nan=False))
                _fsync_write(self.root / LATEST, self.tag)
                _prune(self.root, self.keep)
            except Exception as e:
                error = e
        self._agree(error, group)  # also the barrier: every rank returns once it is marked
        return self.tag

    def _agree(self, error: Optional[BaseException], group) -> None:
        """Raise on every rank when ``error`` is set on any (see the class docstring)."""
        if all_reduce_max(1.0 if error is not None else 0.0, group=group) == 0:
            return
        report = None
        if error is not None:
            needed, basis = self._needed()
            report = (is_disk_full(error, self.tag_dir, needed), needed, basis, error)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            failed = gather_ints(int(error is not None), group=group)
            report = broadcast_object(report if error is None else _portable(report),
                                      src=failed.index(1), group=group)
        full, needed, basis, first = report
        aside = self._move_aside() if self.rank == 0 else None
        if full:
            raise CheckpointWriteError(diskfull.message(
                self.tag_dir, first, needed, basis, aside,
                find_resume(self.root, warn=lambda m: None))) from error
        where = f"moved aside to {aside.name}" if aside else "left for the next run to repair"
        raise CheckpointWriteError(
            f"writing checkpoint {self.tag_dir} failed: {type(first).__name__}: "
            f"{str(first).splitlines()[0] if str(first) else ''}; it was {where}, and every "
            f"checkpoint before it is kept: fix the cause and rerun the same command to "
            f"resume") from error

    def _needed(self) -> Tuple[int, str]:
        """Bytes this checkpoint needs, about: the newest complete one's, else what was saved."""
        for _, tag in _tags(self.root):
            if tag != self.tag and check(self.root / tag) is None:
                size = sum(_marker(self.root / tag)["files"].values())
                return size, f"the size of checkpoint {tag}"
        size = (self.written.bytes if self.written else 0) + sum(map(len, self.extra.values()))
        return size, "the state saved before the write failed"

    def _move_aside(self) -> Optional[Path]:
        """Rank 0: the partial tag renamed ``<tag>.invalid-<time>`` (its marker removed)."""
        if not self.tag_dir.is_dir():
            return None
        (self.tag_dir / MARKER).unlink(missing_ok=True)
        (self.root / f".{LATEST}.tmp").unlink(missing_ok=True)
        aside = _aside(self.root, self.tag)
        self.tag_dir.rename(aside)
        if (self.root / LATEST).is_file() and (self.root / LATEST).read_text() == self.tag:
            (self.root / LATEST).unlink()  # its fsync failed after it was replaced
        return aside


def begin(engine, root: Path, step: int, client_state: Dict, keep: int,
          extra_files: Dict = None, loss: Optional[float] = None, finite: bool = True,
          defer: bool = False) -> Pending:
    """The training thread's part of checkpoint ``step`` (all ranks): DeepSpeed's
    ``save_checkpoint`` (with ``defer``, its states copied to the CPU rather than written),
    this rank's RNG state and rank 0's extra files taken. A failure here is kept for
    :meth:`Pending.complete`, so the ranks still agree."""
    p = Pending(root, step, keep, loss, finite)
    try:
        if p.rank == 0:  # a tag of this step left by an earlier attempt is not complete from now
            (p.tag_dir / MARKER).unlink(missing_ok=True)
        with _recording(engine, p.deferred if defer else None) as written:
            p.written = written
            engine.save_checkpoint(str(root), tag=p.tag, client_state=client_state,
                                   save_latest=False)
        buf = io.BytesIO()
        torch.save(rng_state(), buf)
        p.rng = buf.getvalue()
        if p.rank == 0:
            p.extra = {n: d if isinstance(d, bytes) else d.encode()
                       for n, d in (extra_files or {}).items()}
    except Exception as e:
        p.error = e
    return p


def save(engine, root: Path, step: int, client_state: Dict, keep: int, extra_files: Dict = None,
         loss: Optional[float] = None, finite: bool = True) -> str:
    """Write checkpoint ``step`` on all ranks; returns its tag once it is complete (see the
    module docstring). ``extra_files`` (name -> text or bytes) are written by rank 0;
    ``loss`` and ``finite`` go into the marker. A write that fails on any rank raises
    :class:`CheckpointWriteError` on every rank before the marker, and the partial tag is
    moved aside."""
    return begin(engine, root, step, client_state, keep, extra_files, loss, finite).complete()


def _aside(root: Path, tag: str) -> Path:
    """A new name ``<tag>.invalid-<time>[.N]`` for a tag moved aside."""
    base = root / f"{tag}.invalid-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = base, 1
    while aside.exists():
        aside, n = base.with_name(f"{base.name}.{n}"), n + 1
    return aside


def _tags(root: Path) -> List[Tuple[int, str]]:
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p.name) for p in root.iterdir()
           if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(out, reverse=True)


def _marker(tag_dir: Path) -> Dict:
    return json.loads((tag_dir / MARKER).read_text())


def _prune(root: Path, keep: int) -> None:
    """Delete complete tags beyond the newest ``keep``, except the newest finite one and those
    a reader has pinned (:mod:`dsq.run.pin`)."""
    complete = [t for _, t in _tags(root) if check(root / t) is None]
    finite = [t for t in complete if _marker(root / t).get("finite", True)]
    for tag in complete[keep:]:
        if finite and tag == finite[0]:
            continue
        pin.remove(root / tag)  # left for a later pruning while a reader holds it
    pin.sweep(root)


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
            aside = _aside(root, tag)
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
