"""What a requeued or resubmitted job resumes from when the newest checkpoint is damaged
(a kill during the write, a full disk, a file cut short on a shared file system).

Checkpoints are built by hand here in the layout ``dsq.run.checkpoint.save`` writes (files, then
the ``dsq_complete.json`` marker with every file's size, then ``latest``); the end-to-end
case through SLURM is in test_sbatch.py.
"""

import json
import warnings
from pathlib import Path

import pytest

from dsq.run import checkpoint


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    tag = root / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    files = {"mp_rank_00_model_states.pt": 4096, "rng_rank00000.pt": 512}
    for name, size in files.items():
        (tag / name).write_bytes(b"x" * size)
    if complete:
        (tag / checkpoint.MARKER).write_text(json.dumps({"step": step, "files": files}))
        (root / checkpoint.LATEST).write_text(tag.name)
    return tag


def test_truncated_latest_warns_with_the_file_and_falls_back(tmp_path):
    fake_checkpoint(tmp_path, 5)
    tag = fake_checkpoint(tmp_path, 10)
    victim = tag / "mp_rank_00_model_states.pt"
    with open(victim, "r+b") as fh:
        fh.truncate(1000)
    with pytest.warns(UserWarning) as rec:
        assert checkpoint.find_resume(tmp_path) == "step_00000005"
    msg = " ".join(str(w.message) for w in rec)
    assert "step_00000010 is not usable" in msg and str(victim) in msg
    assert "1000 bytes, expected 4096" in msg


def test_latest_without_marker_or_missing_file_falls_back(tmp_path):
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 15, complete=False)  # killed while writing: latest still says 10
    (tmp_path / "step_00000010" / "rng_rank00000.pt").unlink()
    with pytest.warns(UserWarning, match="rng_rank00000.pt is missing"):
        assert checkpoint.find_resume(tmp_path) == "step_00000005"


def test_nothing_usable_means_a_fresh_start(tmp_path):
    assert checkpoint.find_resume(tmp_path / "absent") is None
    tag = fake_checkpoint(tmp_path, 5)
    (tag / checkpoint.MARKER).write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert checkpoint.find_resume(tmp_path) is None
