"""Run-directory guards as units: the lock, resume compatibility, checkpoint repair, verified
prepared data and stale build locks (the CLI-level faults are in tests/e2e/test_faults.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsq.run import checkpoint
from dsq.config import flatten, load_config, to_dict
from dsq.data.prepare import sampled_sha256, split_record, verify
from dsq.run.rundir import RunDirError, RunLock, check_resume, resume_changes
from dsq.runtime import clear_stale_build_locks


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    a = RunLock(tmp_path / "run")
    a.acquire()
    code = ("import sys; from dsq.run.rundir import RunLock, RunDirError\n"
            "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunDirError as e:\n"
            "    print(e); sys.exit(3)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert res.returncode == 3
    assert f"pid {os.getpid()} on host" in res.stdout and "another train.out_dir" in res.stdout
    a.release()
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_lock_of_a_dead_process_is_taken_over_and_reported(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    (tmp_path / ".dsq.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "started": 0, "slurm_job_id": "77"}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.stale and f"pid {dead}" in lock.stale and "SLURM job 77" in lock.stale
    assert json.loads((tmp_path / ".dsq.lock").read_text())["pid"] == os.getpid()
    lock.release()


def _flat(*overrides):
    return flatten(to_dict(load_config([], list(overrides))))


def test_resume_compatibility_refuses_a_different_experiment():
    saved = _flat("train.steps=40")
    refused, allowed = resume_changes(saved, _flat(
        "train.steps=45", "train.eval_every=5", "tracking.experiment=x", "optim.lr=1e-4",
        "model.hidden_size=256", "quant.weight=int8:channel", "train.seed=1",
        "data.val_fraction=0.1", "data.val=[]", "train.global_batch=32", "optim.name=qadamw"))
    keys = [r.split(":")[0] for r in refused]
    assert keys == ["data.val", "data.val_fraction", "model.hidden_size", "optim.name",
                    "quant.weight", "train.global_batch", "train.seed"]
    assert {k for k, _, _ in allowed} == {"train.steps", "train.eval_every",
                                          "tracking.experiment", "optim.lr"}
    with pytest.raises(RunDirError, match=r"model.hidden_size: 128 -> 256 \(changes the model\)"):
        check_resume(saved, _flat("model.hidden_size=256"), Path("ckpt"))
    assert check_resume(saved, _flat("train.steps=80"), Path("c")) == [("train.steps", 40, 80)]


def test_a_checkpoint_from_before_the_architecture_keys_resumes():
    """config.yaml of a run written before model.arch and its switches existed (a GPT-2)."""
    new = _flat("train.steps=40")
    added = ("model.arch", "model.norm", "model.mlp", "model.positions", "model.rope_base",
             "model.num_query_groups", "model.bias", "model.norm_eps")
    saved = {k: v for k, v in new.items() if k not in added}
    assert check_resume(saved, new, Path("ckpt")) == []
    refused, _ = resume_changes(saved, _flat("model.preset=llama-tiny"))
    assert {r.split(":")[0] for r in refused} >= {"model.arch", "model.norm", "model.mlp",
                                                  "model.positions", "model.bias"}


def _tag(root: Path, step: int, complete: bool = True, corrupt: bool = False) -> str:
    tag = checkpoint.tag_for(step)
    (root / tag).mkdir(parents=True)
    (root / tag / "model.pt").write_bytes(b"x" * 100)
    if complete:
        (root / tag / checkpoint.MARKER).write_text(json.dumps(
            {"step": step, "files": {"model.pt": 100}}))
    if corrupt:
        (root / tag / "model.pt").write_bytes(b"x" * 40)
    return tag


def test_repair_moves_bad_tags_aside_and_repoints_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _tag(root, 10), _tag(root, 20), _tag(root, 30, corrupt=True), _tag(root, 40, complete=False)
    (root / "latest").write_text("step_00000030")
    seen = []
    assert checkpoint.find_resume(root, warn=seen.append) == "step_00000020"
    assert (root / "step_00000030").is_dir() and len(seen) == 2  # read-only: nothing moved
    assert checkpoint.find_resume(root, repair=True, warn=seen.append) == "step_00000020"
    assert (root / "latest").read_text() == "step_00000020"
    names = sorted(p.name for p in root.iterdir())
    assert names[:2] == ["latest", "step_00000010"] and names[2] == "step_00000020"
    assert {n.split(".invalid-")[0] for n in names[3:]} == {"step_00000030", "step_00000040"}
    assert "truncated" in seen[2] and "moved aside" in seen[2]
    assert checkpoint.find_resume(root, repair=True) == "step_00000020"  # idempotent


def test_prepared_data_is_verified(tmp_path):
    ids = np.arange(5000, dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    ids[:100].tofile(tmp_path / "val.bin")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "dtype": "uint16", "tokens": {"train": 5000, "val": 100},
        "splits": {"train": split_record(tmp_path / "train.bin"),
                   "val": split_record(tmp_path / "val.bin")}}))
    assert verify(tmp_path) is None
    with open(tmp_path / "train.bin", "r+b") as fh:  # same size, other content
        fh.seek(4000)
        fh.write(b"\xff\xff")
    assert "content differs" in verify(tmp_path)
    ids.tofile(tmp_path / "train.bin")
    with open(tmp_path / "train.bin", "r+b") as fh:
        fh.truncate(6000)  # an even size: a whole number of tokens, fewer than promised
    assert verify(tmp_path) == ("train.bin has 6,000 bytes, the manifest's 5,000 tokens need "
                                "10,000")


def test_sampled_hash_reads_a_bounded_part_of_large_files(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    h = sampled_sha256(big)
    data = bytearray(big.read_bytes())
    data[(8 << 20) - 10] ^= 1  # inside the last window
    big.write_bytes(bytes(data))
    assert sampled_sha256(big) != h


def test_stale_build_locks_are_cleared_live_ones_kept(tmp_path):
    old, fresh, busy = (tmp_path / "py311_cpu" / n for n in ("old_op", "fresh_op", "busy_op"))
    for d in (old, fresh, busy):
        d.mkdir(parents=True)
        (d / "lock").write_text("")
    past = time.time() - 3600
    os.utime(old / "lock", (past, past))
    os.utime(busy / "lock", (past, past))
    builder = subprocess.Popen(["sleep", "30"], cwd=busy)  # stands for ninja building there
    try:
        said = []
        removed = clear_stale_build_locks([tmp_path], log=said.append)
    finally:
        builder.kill()
    assert removed == [old / "lock"] and not (old / "lock").exists()
    assert (fresh / "lock").exists() and (busy / "lock").exists()
    assert len(said) == 1 and "old_op" in said[0] and "killed half-way" in said[0]


def test_damaged_data_whose_sources_cannot_be_read_is_one_clear_error(tmp_path, monkeypatch):
    from dsq.data import prepare as P

    (tmp_path / "tr.txt").write_text("To be, or not to be, that is the question. " * 200)
    cfg = load_config([], [f"data.train=[{tmp_path / 'tr.txt'}]",
                           f"data.val=[{tmp_path / 'tr.txt'}]", "model.vocab_size=300",
                           f"data.cache_dir={tmp_path / 'cache'}"])
    out = P.prepare(cfg.data, 300, log=lambda *a: None)
    (out / "val.bin").write_bytes(b"\0")

    def gone(*a, **k):
        raise P.DataError("data 'user/corpus' is neither an existing file or folder nor a Hub "
                          "dataset that could be loaded")

    monkeypatch.setattr(P.sources, "iter_documents", gone)
    said = []
    with pytest.raises(P.DataError, match=r"was damaged \(val.bin has 1 bytes.*cannot be "
                                          r"prepared again: data 'user/corpus'"):
        P.prepare(cfg.data, 300, log=said.append)
    assert "moved aside" in said[0] and not out.exists()
