"""A checkpoint save killed at every file boundary (dsq.run.checkpoint.save with a stand-in for
DeepSpeed's engine, one rank): the next run's repair finds either the previous checkpoint as
``latest`` or the complete new one, every tag left has exactly the files its marker lists,
and a file that came out short is never marked complete. The same on real checkpoints of a
training run: tests/e2e/test_long_runs.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsq.run import checkpoint


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
    monkeypatch.setattr(checkpoint, "all_reduce_max", lambda v: v)
    monkeypatch.setattr(checkpoint, "barrier", lambda: None)


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
        with pytest.raises(OSError, match=r"tokenizer.model: 1000 of 2000 bytes written"):
            _save(tmp_path, 4)
    assert not (tmp_path / checkpoint.tag_for(4) / checkpoint.MARKER).exists()
    said = []
    assert checkpoint.find_resume(tmp_path, repair=True, warn=said.append) == \
        checkpoint.tag_for(2)
    assert len(said) == 1 and "moved aside" in said[0]


def test_a_damaged_extra_file_of_the_same_size_fails_the_check(tmp_path, one_rank):
    _save(tmp_path, 2)
    tag = tmp_path / checkpoint.tag_for(2)
    assert _exact(tag) and checkpoint.check(tag) is None
    (tag / "tokenizer.model").write_bytes(b"\x01tok" * 500)
    assert "SHA-256" in checkpoint.check(tag)
