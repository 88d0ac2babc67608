"""Readers beside a run that checkpoints and prunes all the time, through the CLI (issue "Long
runs", the check of item 5): ``dsq train configs/tiny.yaml`` runs as a subprocess with
``train.ckpt_every=2 train.keep_ckpts=1`` (every second step saves one checkpoint and prunes the
one before) while this process runs ``dsq eval <run dir>`` 20 times, one ``dsq export`` and one
``dsq generate`` through :func:`dsq.cli.main` (what the ``dsq`` command runs). Each reader exits
0 and names the checkpoint that was the newest when it started, or a newer one; the readers see
many different checkpoints (the run saved and pruned under them). The run is asked for more steps
than the readers can outlast on any machine and stopped by SIGTERM once they are done, so every
read happens while it trains: it then writes its stop checkpoint and exits 75, nothing
half-pruned."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from dsq.cli import main
from dsq.run import checkpoint
from dsq.train.stop import PREEMPTED_EXIT_CODE

from tests.conftest import CORPUS, ROOT

pytestmark = pytest.mark.slow

STEPS = 1_000_000  # never reached: the run is stopped when the readers are done


def _step(name: str) -> int:
    m = checkpoint.TAG_RE.match(name)
    assert m, name
    return int(m.group(1))


def _latest(root) -> int:
    return _step((root / "latest").read_text().strip())


def _cli(*argv) -> int:
    """``dsq ARGV`` in this process; its exit status."""
    try:
        main(list(argv))
    except SystemExit as e:
        return 0 if e.code is None else e.code
    return 0


def test_eval_export_generate_during_a_run_that_prunes_every_save(tmp_path, data_cache,
                                                                  capsys):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    log = open(tmp_path / "train.log", "w")
    train = subprocess.Popen(
        [sys.executable, "-m", "dsq.cli", "train", "configs/tiny.yaml", f"train.out_dir={out}",
         f"data.cache_dir={data_cache}", f"train.steps={STEPS}", "train.ckpt_every=2",
         "train.keep_ckpts=1", "train.global_batch=8", "train.eval_every=0",
         "train.eval_samples=8", "train.progress=false", "tracking.enabled=false"],
        cwd=ROOT, env={**env, "PYTHONWARNINGS": "ignore"}, stdout=log, stderr=subprocess.STDOUT)
    root, started = out / "checkpoints", time.monotonic()
    val = tmp_path / "val.txt"  # a few windows of text: each eval reads it whole
    val.write_text((CORPUS / "val" / "tempest_gut.txt").read_text()[20_000:26_000])
    steps, live, done = [], 0, False
    try:
        deadline = time.monotonic() + 300  # the first run of a session prepares the data
        while not (root / "latest").is_file():
            assert train.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.1)
        capsys.readouterr()
        t0 = time.monotonic()
        first = t0 - started
        for i in range(20):
            before = _latest(root)
            res = tmp_path / f"eval{i}.json"
            code = _cli("eval", str(out), "--data", str(val), "--max-seqs", "2",
                        "--json", str(res))
            printed = capsys.readouterr()
            assert code == 0, printed.err
            got = json.loads(res.read_text())
            step = _step(os.path.basename(got["checkpoint"]))
            assert before <= step <= _latest(root) and step % 2 == 0, (before, step)
            assert math.isfinite(got["loss"]) and 0 < got["loss"] < 9, got
            assert got["tokens"] == 2 * 128 and f"({got['checkpoint']})" in printed.out
            steps.append(step)
            live += train.poll() is None
            if i == 9:  # one export and one generate in the middle of the evals
                before = _latest(root)
                assert _cli("export", str(out), str(tmp_path / "hf")) == 0, capsys.readouterr()
                info = json.loads((tmp_path / "hf" / "dsq_export.json").read_text())
                assert before <= _step(os.path.basename(info["checkpoint"])) <= _latest(root)
                assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 1_000_000
                assert _cli("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens",
                            "8", "--temperature", "0") == 0
                text = capsys.readouterr().out  # DeepSpeed may print a line first
                assert "\nROMEO:" in f"\n{text}", text
        done, reading = True, time.monotonic() - t0
        assert train.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        train.terminate()  # SIGTERM: checkpoint at the next step, then exit 75
    finally:
        if not done and train.poll() is None:
            train.kill()
        code = train.wait(timeout=600)
        log.close()
    with capsys.disabled():
        print(f"\nfirst checkpoint after {first:.1f} s; eval read steps {steps} ({live} of 20 "
              f"while the run trained); readers {reading:.1f} s; run ended "
              f"{time.monotonic() - started:.1f} s after its start")
    assert code == PREEMPTED_EXIT_CODE, (tmp_path / "train.log").read_text()[-3000:]
    assert live == 20 and len(set(steps)) >= 4, (live, steps)  # it saved and pruned under them
    assert steps == sorted(steps)
    left = sorted(p.name for p in root.iterdir() if p.is_dir())
    # keep_ckpts=1: the last one, and the one before if a reader held it at the last save
    assert left[-1] == (root / "latest").read_text().strip() and len(left) <= 2, left
    assert _latest(root) >= steps[-1]
    assert all(checkpoint.check(root / t) is None for t in left)
    assert not list(root.glob(".*.pruning"))
    assert {p.name for p in root.glob(".*.readers")} <= {f".{t}.readers" for t in left}
