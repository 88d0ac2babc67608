"""A run directory's guards: one writer at a time, and resume compatibility.

:class:`RunLock` is an exclusive ``fcntl`` lock on ``<out_dir>/.dsq.lock``, taken by rank 0 for
the run's whole life; the file names its holder (host, pid, start time, SLURM job). A second
``dsq train`` (or a second sbatch job) on the same ``train.out_dir`` stops at once with a
message naming the holder. The kernel releases the lock when its process dies, however it
dies; a lock file whose recorded holder is a dead process on this host is reported as stale
and taken over (file systems without working ``flock`` across hosts are not protected against
two hosts).

:func:`resume_changes` compares the config a checkpoint was written with against the new one:
keys whose change would make the resumed run a different experiment (model shape,
vocabulary, quantization recipe, data, seed, batch, optimizer state format, precision,
parallel layout) stop the run with a message listing them; the others (steps, evaluation
and checkpoint cadence, tracking, learning-rate schedule, ...) are allowed and recorded.
Both run before anything in the run directory is written.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

LOCK_NAME = ".dsq.lock"

# Flattened config keys (a trailing dot: every key of the section) that a resumed run may not
# change; the others may.
FROZEN = (
    "model.", "quant.", "data.train", "data.val", "data.val_fraction", "data.text_field",
    "data.tokenizer",
    "train.seed", "train.global_batch", "train.micro_batch", "parallel.tp",
    "deepspeed.zero_stage", "deepspeed.precision",
    "optim.name", "optim.m_bits", "optim.v_bits", "optim.block_size", "optim.quantize",
    "optim.v_domain", "optim.v_signed", "optim.m_format", "optim.v_format",
)
WHY = {
    "model.": "the model", "quant.": "the quantization recipe", "data.": "the data",
    "train.seed": "the data order and initialisation",
    "train.global_batch": "the data schedule", "train.micro_batch": "the data schedule",
    "parallel.tp": "the checkpoint's tensor-parallel shards",
    "deepspeed.": "the checkpoint's format", "optim.": "the optimizer state's format",
}


class RunDirError(RuntimeError):
    """The run directory is in use, or cannot be resumed with this config; the message says
    what and how to go on."""


class RunLock:
    """Exclusive lock of one run directory (see the module docstring)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fh = None
        self.created = False
        self.stale: Optional[str] = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirError` naming the holder."""
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = _describe(fh.read())
            fh.close()
            raise RunDirError(f"train.out_dir={self.path.parent} is in use by {holder}: wait for "
                              f"that run to end or stop it, or give this run another "
                              f"train.out_dir")
        fh.seek(0)
        stale = _stale_holder(fh.read())
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(holder_record()))
        fh.flush()
        self._fh = fh
        self.stale = stale

    def release(self, failed_start: bool = False) -> None:
        """Unlock. ``failed_start``: the run never started, so a directory that the lock
        created and that holds nothing else is removed with it (a refused run leaves nothing)."""
        if self._fh is None:
            return
        try:
            self._fh.seek(0)
            self._fh.truncate()
            if failed_start and self.created:
                self.path.unlink(missing_ok=True)
                try:
                    self.path.parent.rmdir()  # only if empty
                except OSError:
                    pass
            fcntl.flock(self._fh, fcntl.LOCK_UN)
        finally:
            self._fh.close()
            self._fh = None


def holder_record() -> Dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
    except ValueError:
        return "another process"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
    job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
    return f"pid {h.get('pid')} on host {h.get('host')} (since {when}{job})"


def _stale_holder(text: str) -> Optional[str]:
    """The recorded holder when it is a dead process of this host (its lock died with it)."""
    try:
        h = json.loads(text)
    except ValueError:
        return None
    if h.get("host") == socket.gethostname() and not _alive(int(h.get("pid", 0))):
        return _describe(text)
    return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- compatibility
def _frozen(key: str) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in FROZEN)


def _why(key: str) -> str:
    for prefix, what in WHY.items():
        if key.startswith(prefix):
            return what
    return "the run"


_NO_DEFAULT = object()


def _default(key: str):
    """The default of a flattened config key (a sentinel when it has none), with the model's
    architecture switches filled as the default preset's (gpt2): the value a checkpoint written
    before the key existed implies (every model before ``model.arch`` was a GPT-2)."""
    from dsq.config import Config, fill_model

    obj = Config()
    fill_model(obj.model)
    for part in key.split("."):
        obj = getattr(obj, part, _NO_DEFAULT)
        if obj is _NO_DEFAULT:
            break
    return obj


def resume_changes(saved: Dict, new: Dict) -> Tuple[List[str], List[Tuple[str, object, object]]]:
    """``(refused, allowed)`` differences between two flattened configs: refused ones as
    ``"key: old -> new (changes ...)"`` lines, allowed ones as ``(key, old, new)``."""
    refused, allowed = [], []
    for key in sorted(set(saved) | set(new)):
        old, cur = saved.get(key), new.get(key)
        if old == cur or (key not in saved and cur == _default(key)):
            continue  # a key added to dsq after the checkpoint, at its default
        if _frozen(key):
            refused.append(f"{key}: {old} -> {cur} (changes {_why(key)})")
        else:
            allowed.append((key, old, cur))
    return refused, allowed


def check_resume(saved: Dict, new: Dict, ckpt: Path) -> List[Tuple[str, object, object]]:
    """Raise :class:`RunDirError` listing the changes that cannot resume; return the allowed
    ones."""
    refused, allowed = resume_changes(saved, new)
    if refused:
        lines = "\n  ".join(refused)
        raise RunDirError(f"cannot resume {ckpt} with this config; these settings differ from "
                          f"the ones it was trained with:\n  {lines}\nrestore them, or start a "
                          f"new run with another train.out_dir")
    return allowed


def saved_dp(tag_dir: Path) -> Optional[int]:
    """Data-parallel size a ZeRO-1/2 checkpoint was partitioned for (None: not partitioned)."""
    n = len(list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    return n or None


def claim(lock: RunLock, cfg, dp_size: int, tp_size: int, log=print
          ) -> Tuple[Optional[str], List[Tuple[str, object, object]]]:
    """Rank 0, before anything in the run directory is written: take ``lock``, repair the
    checkpoints, and check that the newest valid one can resume under ``cfg`` (resharding it
    with ``train.reshard: auto``). Returns ``(tag to resume or None, allowed config changes)``;
    :class:`RunDirError` says why the run cannot start."""
    from omegaconf import OmegaConf

    from dsq.config import flatten, to_dict
    from dsq.log import warn
    from dsq.run import checkpoint

    out_dir = Path(cfg.train.out_dir).resolve()
    ckpt_dir = out_dir / "checkpoints"
    lock.acquire()
    if lock.stale:
        warn(f"took over the lock of {out_dir} left by {lock.stale} (no longer running)")
    tag = checkpoint.find_resume(ckpt_dir, repair=True, warn=warn)
    if tag is None:
        return None, []
    tag_dir = ckpt_dir / tag
    saved = flatten(OmegaConf.to_container(OmegaConf.load(tag_dir / "config.yaml")))
    changes = check_resume(saved, flatten(to_dict(cfg)), tag_dir)
    old_dp = saved_dp(tag_dir)
    if cfg.deepspeed.zero_stage > 0 and old_dp and old_dp != dp_size:
        if cfg.train.reshard != "auto":
            raise RunDirError(
                f"checkpoint {tag_dir} was written by {old_dp} data-parallel ranks and this "
                f"run has {dp_size}: convert it first with `dsq ckpt reshard "
                f"{ckpt_dir} --dp {dp_size}` (or set train.reshard=auto), or "
                f"launch {old_dp * tp_size} ranks")
        from dsq.run.reshard import reshard_checkpoint

        reshard_checkpoint(ckpt_dir, tag, dp_size)
        log(f"resharded {tag_dir} from dp={old_dp} to dp={dp_size} "
            f"(original kept as {tag}.dp{old_dp})")
        changes.append(("layout.dp", old_dp, dp_size))
    return tag, changes
