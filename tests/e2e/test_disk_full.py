"""A disk that fills during a run, through the CLI on a real small file system (a tmpfs of
25 MiB; a tiny checkpoint takes about 15 MB): the background write of checkpoint 4 fails,
the run stops with exit 1 and one ``dsq: error:`` line naming the checkpoint and the bytes
needed and free, checkpoint 2 stays complete and ``latest``, the partial one is moved aside;
with space freed the same command resumes from checkpoint 2 and finishes (issue "Long runs"
item 4; every file boundary in-process: tests/unit/run/test_checkpoint_writes.py)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from dsq.run import checkpoint

from tests.conftest import dsq

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=25m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_stops_the_run_with_one_line_and_the_rerun_resumes(small_disk, data_cache):
    out = small_disk / "run"
    args = ["configs/tiny.yaml", "train.steps=6", "train.ckpt_every=2", "train.eval_every=0",
            "train.eval_samples=16", "train.progress=false", "tracking.enabled=false",
            "train.async_ckpt=true", f"train.out_dir={out}", f"data.cache_dir={data_cache}"]
    res = dsq("train", *args, check=False)
    assert res.returncode == 1, res.stderr[-3000:]
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("dsq: error:")]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    root = out / "checkpoints"
    size2 = sum(json.loads((root / checkpoint.tag_for(2) / checkpoint.MARKER).read_text())
                ["files"].values())
    assert err[0].startswith(f"dsq: error: no space left on the device of {root} while "
                             f"writing checkpoint step_00000004"), err[0]
    assert f"({size2} bytes), the size of checkpoint step_00000002;" in err[0], err[0]
    assert " are free;" in err[0] and "resume from step_00000002" in err[0]
    assert (root / "latest").read_text() == checkpoint.tag_for(2)
    assert checkpoint.check(root / checkpoint.tag_for(2)) is None
    assert len(list(root.glob("step_00000004.invalid-*"))) == 1
    assert not (root / checkpoint.tag_for(4)).exists() and not (out / "summary.json").exists()
    subprocess.run(["mount", "-o", "remount,size=80m", str(small_disk)], check=True)  # freed
    res = dsq("train", *args)
    assert f"resumed from {root / checkpoint.tag_for(2)} at step 2" in res.stdout
    assert json.loads((out / "summary.json").read_text())["final_step"] == 6
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and ".invalid-" not in p.name)
    assert tags == [checkpoint.tag_for(4), checkpoint.tag_for(6)]
    assert all(checkpoint.check(root / t) is None for t in tags)
