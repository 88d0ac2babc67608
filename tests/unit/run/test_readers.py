"""Readers pin the checkpoint they read (dsq.run.pin, dsq.run.load.pinned): pruning by the run
writing beside them leaves a pinned checkpoint for later, a reader racing a run that saves
and prunes every moment reads a complete checkpoint every time, and a checkpoint folder that
was pruned is told as such (issue "Long runs" item 5). The saves use the stand-in engine of
test_checkpoint_writes (one rank)."""

from __future__ import annotations

import threading

import pytest
import torch

from dsq.run import checkpoint, pin
from dsq.run.load import CheckpointError, merged_state_dict, pinned, resolve_checkpoint

from tests.unit.run.test_checkpoint_writes import EXTRA, _save, one_rank  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_rank")


def test_pruning_skips_a_pinned_checkpoint_and_removes_it_once_released(tmp_path):
    _save(tmp_path, 2)
    with pinned(str(tmp_path)) as tag_dir:
        assert tag_dir == tmp_path / checkpoint.tag_for(2)
        _save(tmp_path, 4)  # keep=1: would prune 2
        assert checkpoint.check(tag_dir) is None
        assert merged_state_dict(tag_dir, {"w": torch.zeros(64)})["w"].sum() == 64
    assert (tmp_path / checkpoint.tag_for(2)).is_dir()
    _save(tmp_path, 6)  # released: pruned now, with 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", checkpoint.tag_for(6)]


def test_a_pruned_checkpoint_folder_is_told_as_pruned(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    gone = tmp_path / checkpoint.tag_for(2)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {gone} no longer exists \(the run "
                       rf"writing {tmp_path} pruned it: .*give the run directory"):
        resolve_checkpoint(str(gone))
    with pytest.raises(CheckpointError, match=r"step_00000008 does not exist: give the run"):
        resolve_checkpoint(str(tmp_path / checkpoint.tag_for(8)))


def test_a_reader_racing_saves_and_pruning_reads_a_complete_checkpoint_20_times(
        tmp_path):
    """The acceptance check of the issue (eval during a run with ckpt_every=2, 20 tries), in
    one process: a writer thread saves and prunes (keep=1) without pause while a reader picks
    the newest checkpoint of the run directory and reads its weights and tokenizer 20 times,
    each read slower than a save; without the pins most reads lose their checkpoint."""
    _save(tmp_path, 2)
    stop, saves, errors = threading.Event(), [0], []

    def writer():
        step = 4
        try:
            while not stop.is_set():
                _save(tmp_path, step)
                step, saves[0] = step + 2, saves[0] + 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    read = []
    try:
        for _ in range(20):
            start = saves[0]
            with pinned(str(tmp_path)) as tag_dir:
                while saves[0] < start + 2 and t.is_alive():  # two saves prune under it
                    stop.wait(0.001)
                w = merged_state_dict(tag_dir, {"w": torch.zeros(64)})["w"]
                tok = (tag_dir / "tokenizer.model").read_bytes()
            assert torch.equal(w, torch.ones(64)) and tok == EXTRA["tokenizer.model"]
            read.append(tag_dir.name)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert len(read) == 20 and len(set(read)) >= 10, read  # new checkpoints all along
    assert not list(tmp_path.glob(".*.pruning"))
    left = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert len(left) <= 2, left  # pinned ones were pruned later


def test_pin_remove_waits_for_no_reader(tmp_path):
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    with pin.hold(tag) as held:
        assert held and pin.remove(tag) is False and tag.is_dir()
    assert pin.remove(tag) is True and not tag.exists()
    assert not pin.lock_path(tag).exists()
