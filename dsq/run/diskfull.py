"""A checkpoint write that failed, told as what it is: the disk is full, or another write error.

``torch.save`` (DeepSpeed's checkpoint engine) reports a full disk as
``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`` or
``... file write failed``, never "no space left"; Python's own writes raise ``OSError`` with
``errno.ENOSPC`` (or ``EDQUOT``, a quota). :func:`is_disk_full` recognises both (the
``torch.save`` forms only when the file system is in fact nearly full), and :func:`message`
writes the one line a user needs: the checkpoint, the bytes it needs (an estimate: the size of
the previous complete checkpoint, else the state written so far), the bytes free, what was kept
and how to go on. :class:`CheckpointWriteError` carries that line (``dsq train`` prints it as
``dsq: error:`` and exits 1).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

import torch

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how torch.save's zip writer says that a write came out short
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the disk is full, or another write error); the message
    names the checkpoint, what was kept and what to do."""


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the file system of ``path`` (or of its nearest parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException, path: Path, needed: int = 0) -> bool:
    """Whether ``e`` (or an exception it was raised from) is a full disk or quota: an
    ``OSError`` with ENOSPC/EDQUOT, or ``torch.save``'s short-write error while the file system
    of ``path`` has less than ``needed`` bytes (at least 1 MiB) free."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(x, RuntimeError) and any(s in str(x) for s in TORCH_WRITE_FAILED):
            try:
                return free_bytes(path) < max(needed, 2**20)
            except OSError:
                return True
    return False


def nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: what ``torch.save`` will write, about."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def message(tag_dir: Path, error: BaseException, needed: int, basis: str, aside: Optional[Path],
            resume: Optional[str]) -> str:
    """The line for a checkpoint write that failed with a full disk (see the module docstring).
    ``basis`` says where ``needed`` comes from; ``aside`` is where the partial checkpoint went;
    ``resume`` the tag a rerun resumes from (None: the run starts again)."""
    free = free_bytes(tag_dir)
    kept = (f"moved aside to {aside.name}" if aside is not None else "left unfinished")
    again = (f"resume from {resume}" if resume else "start again (no complete checkpoint yet)")
    short = max(needed - free, 0)
    return (f"no space left on the device of {tag_dir.parent} while writing checkpoint "
            f"{tag_dir.name} ({type(error).__name__}: {str(error).splitlines()[0][:120]}): it "
            f"needs about {human(needed)}, {basis}; {human(free)} are free; the partial "
            f"checkpoint was {kept} and no older checkpoint was removed. Free at least "
            f"{human(short + needed // 10)} there (delete the .invalid-* folders of "
            f"{tag_dir.parent} once you do not need them, or lower train.keep_ckpts), then "
            f"rerun the same command to {again}")
