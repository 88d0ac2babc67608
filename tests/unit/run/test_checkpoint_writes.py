"""A checkpoint save killed at every file boundary (dsq.run.checkpoint.save with a stand-in for
DeepSpeed's engine, one rank): the next run's repair finds either the previous checkpoint as
``latest`` or the complete new one, every tag left has exactly the files its marker lists,
and a file that came out short is never marked complete. The same on real checkpoints of a
training run: tests/e2e/test_long_runs.py."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsq.run import checkpoint, diskfull


class Killed(BaseException):
    """A kill: not an Exception, so nothing in save() handles it."""


class Engine:
    """What checkpoint.save uses of a DeepSpeed engine: save_checkpoint writing its state files
    through ``checkpoint_engine.save``."""

    class CheckpointEngine:
        def save(self, state_dict, path):
            torch.save(state_dict, path)

    def __init__(self):
        self.checkpoint_engine = self.CheckpointEngine()

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": torch.ones(64)}, **client_state},
                                    str(d / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optimizer_state_dict": {"m": torch.zeros(64)}},
                                    str(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        (d / "zero_to_fp32.py").write_text("# recovery script\n")


EXTRA = {"config.yaml": "model: {preset: tiny}\n", "tokenizer.model": b"\x00tok" * 500}


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.setattr(checkpoint.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(checkpoint, "all_reduce_max", lambda v, group=None: v)


def _boundaries(monkeypatch, kill_at=None):
    """Count the writes, renames and syncs of a save (each a boundary where a kill can land),
    killing the process before boundary ``kill_at``."""
    seen = []

    def watch(name, fn):
        def wrapped(*a, **k):
            seen.append(name)
            if kill_at is not None and len(seen) == kill_at:
                raise Killed(name)
            return fn(*a, **k)
        return wrapped

    for name in ("_write_all", "_fsync_write", "_fsync_files", "_fsync_dir", "_prune"):
        monkeypatch.setattr(checkpoint, name, watch(name, getattr(checkpoint, name)))
    monkeypatch.setattr(Engine.CheckpointEngine, "save",
                        watch("torch.save", Engine.CheckpointEngine.save))
    return seen


def _save(root, step):
    return checkpoint.save(Engine(), root, step, {"step": step}, keep=1, extra_files=EXTRA)


def _exact(tag_dir):
    marker = json.loads((tag_dir / checkpoint.MARKER).read_text())
    files = {str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file()}
    return files - {checkpoint.MARKER} == set(marker["files"])


def test_a_save_killed_at_any_boundary_leaves_the_old_or_the_new_checkpoint(
        tmp_path, monkeypatch, one_rank):
    with monkeypatch.context() as m:
        seen = _boundaries(m)
        _save(tmp_path / "count", 2)
    assert seen.count("torch.save") == 2 and seen.index("_fsync_write") > seen.index(
        "_fsync_files")  # the marker after every file is synced, latest after the marker
    outcomes = set()
    for k in range(1, len(seen) + 2):
        root = tmp_path / f"kill{k}"
        _save(root, 2)
        with monkeypatch.context() as m:
            _boundaries(m, kill_at=k)
            try:
                _save(root, 4)
            except Killed:
                pass
        said = []
        tag = checkpoint.find_resume(root, repair=True, warn=said.append)
        outcomes.add(tag)
        assert tag in (checkpoint.tag_for(2), checkpoint.tag_for(4)), k
        assert (root / "latest").read_text() == tag
        for d in (p for p in root.iterdir() if p.is_dir() and ".invalid-" not in p.name):
            assert checkpoint.check(d) is None and _exact(d), (k, d.name)
        if tag == checkpoint.tag_for(4):
            assert (root / tag / "tokenizer.model").read_bytes() == EXTRA["tokenizer.model"]
    assert outcomes == {checkpoint.tag_for(2), checkpoint.tag_for(4)}


def test_a_short_write_is_an_error_not_a_complete_checkpoint(tmp_path, monkeypatch, one_rank):
    """A file system that takes part of a file without an error (the write said so): the
    save fails before the marker, and the tag is moved aside by the next run."""
    real = checkpoint.os.fstat

    def short(fd):  # the tokenizer's size as the file system reports it: half
        st = real(fd)
        if checkpoint.os.readlink(f"/proc/self/fd/{fd}").endswith("tokenizer.model"):
            return SimpleNamespace(st_size=st.st_size // 2)
        return st

    _save(tmp_path, 2)
    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "fstat", short)
        with pytest.raises(checkpoint.CheckpointWriteError,
                           match=r"tokenizer.model: 1000 of 2000 bytes written; it was moved "
                                 r"aside to step_00000004.invalid-"):
            _save(tmp_path, 4)
    assert not (tmp_path / checkpoint.tag_for(4)).exists()
    said = []
    assert checkpoint.find_resume(tmp_path, repair=True, warn=said.append) == \
        checkpoint.tag_for(2)
    assert said == [] and len(list(tmp_path.glob("step_00000004.invalid-*"))) == 1


def test_a_damaged_extra_file_of_the_same_size_fails_the_check(tmp_path, one_rank):
    _save(tmp_path, 2)
    tag = tmp_path / checkpoint.tag_for(2)
    assert _exact(tag) and checkpoint.check(tag) is None
    (tag / "tokenizer.model").write_bytes(b"\x01tok" * 500)
    assert "SHA-256" in checkpoint.check(tag)


def _writes(monkeypatch, fail_at=None, error=lambda name: OSError(errno.ENOSPC, "No space "
                                                                   "left on device", name)):
    """Count the files a save writes (states, RNG, extra files, marker, latest), failing the
    write of file ``fail_at`` with ``error`` (default: ENOSPC, as a full disk raises it)."""
    seen = []

    def watch(fn, name_of):
        def wrapped(*a, **k):
            seen.append(name_of(*a))
            if fail_at is not None and len(seen) == fail_at:
                raise error(seen[-1])
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(checkpoint, "_write_all", watch(checkpoint._write_all,
                                                        lambda p, d: Path(p).name))
    monkeypatch.setattr(checkpoint, "_fsync_write", watch(checkpoint._fsync_write,
                                                          lambda p, t: Path(p).name))
    monkeypatch.setattr(Engine.CheckpointEngine, "save", watch(
        Engine.CheckpointEngine.save, lambda self, sd, p: Path(p).name))
    return seen


def _size(tag_dir):
    return sum(json.loads((tag_dir / checkpoint.MARKER).read_text())["files"].values())


def test_a_full_disk_at_any_file_loses_nothing_and_the_save_works_once_space_is_free(
        tmp_path, monkeypatch, one_rank):
    """Issue "Long runs" item 4: the disk fills while writing each file of checkpoint 4 in
    turn; every time one CheckpointWriteError line names the checkpoint, the bytes needed (the
    size of checkpoint 2) and free, checkpoint 2 stays complete and ``latest``, the partial
    tag is moved aside, and the same save afterwards completes."""
    with monkeypatch.context() as m:
        names = _writes(m)
        _save(tmp_path / "count", 2)
    assert names == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "rng_rank00000.pt", "config.yaml", "tokenizer.model", checkpoint.MARKER,
                     "latest"]
    for k, name in enumerate(names, 1):
        root = tmp_path / f"full{k}"
        _save(root, 2)
        old = root / checkpoint.tag_for(2)
        before = {p.name: p.read_bytes() for p in old.iterdir()}
        with monkeypatch.context() as m:
            _writes(m, fail_at=k)
            with pytest.raises(checkpoint.CheckpointWriteError) as info:
                _save(root, 4)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(
            f"no space left on the device of {root} while writing checkpoint step_00000004 "
            f"(OSError: [Errno 28] No space left on device: '{name}')"), (k, msg)
        assert f"needs about {diskfull.human(_size(old))}, the size of checkpoint step_00000002;" \
            in msg and " are free;" in msg and "resume from step_00000002" in msg, msg
        aside = list(root.glob("step_00000004.invalid-*"))
        assert len(aside) == 1 and f"moved aside to {aside[0].name}" in msg
        assert {p.name: p.read_bytes() for p in old.iterdir()} == before, k
        assert (root / "latest").read_text() == checkpoint.tag_for(2)
        assert checkpoint.find_resume(root, repair=True) == checkpoint.tag_for(2)
        assert _save(root, 4) == checkpoint.tag_for(4)  # space freed: the same save again
        assert checkpoint.check(root / checkpoint.tag_for(4)) is None
        assert (root / "latest").read_text() == checkpoint.tag_for(4)


def test_torch_saves_short_write_is_told_as_a_full_disk_when_the_disk_is_full(
        tmp_path, monkeypatch, one_rank):
    """torch.save's own words for a full disk (``unexpected pos``) on the first checkpoint of a
    run: the estimate is the state saved so far (both 64-float tensors, the failed one too);
    with the disk not full the same error is a write failure, not a full disk."""
    torch_error = lambda name: RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 12")
    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 4096)
    with monkeypatch.context() as m:
        _writes(m, fail_at=2, error=torch_error)
        with pytest.raises(checkpoint.CheckpointWriteError,
                           match=r"needs about 512 bytes, the state saved before the write "
                                 r"failed; 4.0 KiB \(4096 bytes\) are free; .* to start again"):
            _save(tmp_path, 2)
    assert not (tmp_path / "latest").exists() and not (tmp_path / checkpoint.tag_for(2)).exists()
    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 2**40)
    with monkeypatch.context() as m:
        _writes(m, fail_at=2, error=torch_error)
        with pytest.raises(checkpoint.CheckpointWriteError, match=r"^writing checkpoint .* "
                           r"failed: RuntimeError: \[enforce fail"):
            _save(tmp_path, 2)
