"""``launch/sweep.sh``: recipes x seeds, runs named by their recipe paths, a rerun that skips
what finished, and a failed run that does not stop the sweep."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _sweep(cwd, *args):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", str(ROOT / "launch" / "sweep.sh"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


def test_sweep_over_seeds_reruns_only_what_is_missing(tmp_path, data_cache):
    rec = tmp_path / "recipes"
    rec.mkdir()
    (rec / "lr-low.yaml").write_text("optim: {lr: 1.0e-4}\n")
    (rec / "broken.yaml").write_text("train: {micro_batch: 3}\n")  # 16 is not a multiple of 3
    good = f"{rec / 'lr-low.yaml'}+{ROOT / 'configs/recipes/optim/m8v8.yaml'}"
    args = ["--seeds", "1,2", 1, "exp", ROOT / "configs/tiny.yaml", good, rec / "broken.yaml",
            "--", "train.steps=2", "train.eval_every=0", "train.ckpt_every=0",
            "train.eval_samples=8", f"data.cache_dir={data_cache}", "tracking.system_metrics=false"]
    res = _sweep(tmp_path, *args)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    exp = tmp_path / "runs" / "exp"
    for seed in (1, 2):
        run = exp / "lr-low+optim-m8v8" / f"seed{seed}"
        assert (run / "summary.json").is_file(), out[-3000:]
        assert f"seed: {seed}" in (run / "config.yaml").read_text()
        assert (exp / "broken" / f"seed{seed}" / "sweep_failed").read_text().strip() == "2"
    # seed-major: both recipes at seed 1 before seed 2; the failure did not stop the sweep
    started = [ln for ln in res.stdout.splitlines() if ln.startswith("sweep: ")]
    assert started == ["sweep: lr-low+optim/m8v8 seed 1", "sweep: broken seed 1",
                       "sweep: lr-low+optim/m8v8 seed 2", "sweep: broken seed 2"]
    md = (exp / "report" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| lr-low+optim/m8v8 |"))
    assert row.split("|")[8].strip() == "2"  # two seeds
    again = _sweep(tmp_path, *args)
    assert again.returncode == 1
    lines = [ln for ln in again.stdout.splitlines() if ln.startswith("sweep: ")]
    assert lines == ["sweep: lr-low+optim/m8v8 seed 1 done already "
                     "(runs/exp/lr-low+optim-m8v8/seed1)",
                     "sweep: broken seed 1 failed before (exit 2); delete "
                     "runs/exp/broken/seed1/sweep_failed to retry",
                     "sweep: lr-low+optim/m8v8 seed 2 done already "
                     "(runs/exp/lr-low+optim-m8v8/seed2)",
                     "sweep: broken seed 2 failed before (exit 2); delete "
                     "runs/exp/broken/seed2/sweep_failed to retry"]
