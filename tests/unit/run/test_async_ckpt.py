"""Background checkpoint writes (dsq.run.async_ckpt, train.async_ckpt) with the stand-in engine
of test_checkpoint_writes, one rank: the save returns before any file is written, with the
state as it was at the step; until the write is done the previous checkpoint stays
``latest`` (what a crash then leaves), the marker, ``latest`` and pruning come after every
file; a write that fails on a full disk fails the next save and the end of the run with the
disk-full error, the previous checkpoint kept (issue "Long runs" item 6, checkpoint part)."""

from __future__ import annotations

import errno
import threading

import pytest
import torch

from dsq.run import checkpoint, state
from dsq.run.async_ckpt import BackgroundWriter
from dsq.train.components import Checkpointer

from tests.unit.run.test_checkpoint_writes import EXTRA, Engine, _save, one_rank  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_rank")


class LiveEngine(Engine):
    """A model whose weights training changes in place after each save."""

    def __init__(self):
        super().__init__()
        self.w = torch.zeros(64)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = root + "/" + tag
        import os
        os.makedirs(d, exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": self.w}, **client_state},
                                    f"{d}/mp_rank_00_model_states.pt")
        self.checkpoint_engine.save({"optimizer_state_dict": {"m": self.w * 2}},
                                    f"{d}/zero_pp_rank_0_mp_rank_00_optim_states.pt")


def _gate(monkeypatch):
    """Hold every deferred file write until the returned event is set."""
    go, real = threading.Event(), state.write_state

    def held(st, path):
        assert go.wait(10)
        real(st, path)
    monkeypatch.setattr(checkpoint, "_write_state", held)
    return go


def test_a_background_save_returns_first_and_completes_under_the_same_rules(
        tmp_path, monkeypatch):
    _save(tmp_path, 2)
    engine, writer = LiveEngine(), BackgroundWriter()
    go = _gate(monkeypatch)
    engine.w.fill_(4.0)
    tag = writer.submit(engine, tmp_path, 4, {"step": 4}, keep=1, extra_files=EXTRA)
    assert writer.pending and tag == checkpoint.tag_for(4)
    engine.w.fill_(5.0)  # training goes on: the checkpoint holds step 4's state
    new = tmp_path / tag
    assert not (new / checkpoint.MARKER).exists()
    assert not (new / "mp_rank_00_model_states.pt").exists()
    # a crash now: the previous checkpoint is the one to resume
    assert (tmp_path / "latest").read_text() == checkpoint.tag_for(2)
    assert checkpoint.find_resume(tmp_path, warn=lambda m: None) == checkpoint.tag_for(2)
    go.set()
    writer.wait()
    assert not writer.pending and checkpoint.check(new) is None
    assert (tmp_path / "latest").read_text() == tag
    assert not (tmp_path / checkpoint.tag_for(2)).exists()  # pruned after, keep=1
    sd = torch.load(new / "mp_rank_00_model_states.pt", weights_only=False)
    opt = torch.load(new / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert torch.equal(sd["module"]["w"], torch.full((64,), 4.0)) and sd["step"] == 4
    assert torch.equal(opt["optimizer_state_dict"]["m"], torch.full((64,), 8.0))
    assert (new / "tokenizer.model").read_bytes() == EXTRA["tokenizer.model"]


def test_a_full_disk_in_a_background_write_fails_the_next_save_and_the_end(
        tmp_path, monkeypatch):
    _save(tmp_path, 2)
    ckpt = Checkpointer(LiveEngine(), tmp_path, every=2, last=10, keep=1,
                        state=lambda s: {"step": s}, files=lambda: EXTRA, background=True)

    def full(st, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_write_state", full)
        assert ckpt.maybe_save(4) is True  # returns: the failure is in the thread
        with pytest.raises(checkpoint.CheckpointWriteError,
                           match=r"^no space left on the device of .* while writing checkpoint "
                                 r"step_00000004 .* needs about .*, the size of checkpoint "
                                 r"step_00000002;"):
            ckpt.maybe_save(6)
    assert (tmp_path / "latest").read_text() == checkpoint.tag_for(2)
    assert checkpoint.check(tmp_path / checkpoint.tag_for(2)) is None
    assert len(list(tmp_path.glob("step_00000004.invalid-*"))) == 1
    assert ckpt.maybe_save(6) is True and ckpt.maybe_save(10, last=True) is True
    assert (tmp_path / "latest").read_text() == checkpoint.tag_for(10)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and "invalid" not in p.name
                  ) == [checkpoint.tag_for(10)]
    assert len(ckpt.stalls) == 3 and all(s >= 0 for s in ckpt.stalls)


def test_the_last_save_of_a_step_saved_in_the_background_is_not_written_twice(
        tmp_path, monkeypatch):
    ckpt = Checkpointer(LiveEngine(), tmp_path, every=2, last=4, keep=2,
                        state=lambda s: {"step": s}, files=lambda: EXTRA, background=True)
    go = _gate(monkeypatch)
    assert ckpt.maybe_save(2) is True
    go.set()
    assert ckpt.maybe_save(2, last=True) is False  # waited: step 2 is complete
    assert checkpoint.check(tmp_path / checkpoint.tag_for(2)) is None
