"""Faults around a run directory, driven through the CLI as a user meets them (2 ranks where the
layout matters): after each, the final checkpoint, summary.json, metrics.jsonl and the MLflow
run describe the same last step, no step is logged twice, and nothing is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsq.run import checkpoint
from dsq.data.prepare import load_manifest

from tests.conftest import ROOT, dsq, launch, read_metrics

pytestmark = pytest.mark.slow

STEPS = 8


def args(out: Path, cache: Path, db: Path | None = None, *extra: str):
    track = [f"tracking.uri=sqlite:///{db}", "tracking.experiment=faults",
             "tracking.system_metrics=false"] if db else ["tracking.enabled=false"]
    return ["configs/tiny.yaml", f"train.steps={STEPS}", "train.ckpt_every=4",
            "train.eval_every=0", "train.eval_samples=64", "optim.warmup_steps=2",
            "train.progress=false", "train.log_every=1", f"train.out_dir={out}",
            f"data.cache_dir={cache}", *track,
            *extra]


def consistent(out: Path, db: Path | None = None) -> int:
    """The run's records agree on one last step, each step logged once; returns it."""
    s = json.loads((out / "summary.json").read_text())
    step = s["final_step"]
    root = out / "checkpoints"
    latest = (root / "latest").read_text().strip()
    assert latest == checkpoint.tag_for(step) and checkpoint.check(root / latest) is None
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in ln]
    assert steps == list(range(1, step + 1))
    if db is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
        assert [r.info.run_id for r in runs] == [s["mlflow_run_id"]]
        hist = client.get_metric_history(s["mlflow_run_id"], "train/loss")
        assert sorted(m.step for m in hist) == list(range(1, step + 1))
    return step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("ref") / "run"
    launch(2, *args(out, data_cache))
    return read_metrics(out)


def test_corrupt_newest_checkpoint_is_moved_aside_and_written_again(tmp_path, data_cache,
                                                                    reference):
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    launch(2, *args(out, data_cache, db))
    bad = out / "checkpoints" / checkpoint.tag_for(STEPS) / "mp_rank_00_model_states.pt"
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size // 2)
    res = launch(2, *args(out, data_cache, db))
    assert "moved aside" in res.stderr and f"at step {STEPS // 2}" in res.stdout
    aside = [p.name for p in (out / "checkpoints").iterdir() if ".invalid-" in p.name]
    assert len(aside) == 1 and aside[0].startswith(checkpoint.tag_for(STEPS))
    assert consistent(out, db) == STEPS
    got = read_metrics(out)
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-6)
    ev = dsq("eval", str(out), "--data", str(ROOT / "dsq/data/corpus/shakespeare/val"),
             "--max-seqs", "4")
    assert checkpoint.tag_for(STEPS) in ev.stdout


def test_second_run_on_the_same_directory_stops_at_once(tmp_path, data_cache):
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # long enough to outlive the second process's start-up (imports); stopped once it has asked
    run = args(out, data_cache, db, "train.steps=100000", "train.ckpt_every=0")
    first = subprocess.Popen(["bash", str(ROOT / "launch/local.sh"), "2", *run], cwd=ROOT,
                             env={**env, "PYTHON": sys.executable}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lock = out / ".dsq.lock"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not (lock.is_file() and lock.stat().st_size):
            assert first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.05)
        t0 = time.time()
        second = dsq("train", *run, check=False)
        assert first.poll() is None, "the first run ended before the second one asked"
        assert second.returncode == 2 and time.time() - t0 < 60
        assert "is in use by pid" in second.stderr and "another train.out_dir" in second.stderr
        assert not (out / "summary.json").exists()  # the second run wrote nothing
    finally:
        os.killpg(first.pid, signal.SIGINT)  # the first run checkpoints and stops (Ctrl-C)
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 130, log[-3000:]
    # the first run's records are whole: the second touched none
    from mlflow.tracking import MlflowClient

    stopped = max(read_metrics(out))
    assert sorted(read_metrics(out)) == list(range(1, stopped + 1))
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == checkpoint.tag_for(stopped)
    assert checkpoint.check(root / checkpoint.tag_for(stopped)) is None
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 1
    hist = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, stopped + 1))


def test_incompatible_rerun_changes_nothing_and_says_how(tmp_path, data_cache):
    out = tmp_path / "run"
    launch(2, *args(out, data_cache, None, "train.steps=4"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    one = dsq("train", *args(out, data_cache, None, "train.steps=6"), check=False)
    assert one.returncode == 2
    assert "written by 2 data-parallel ranks" in one.stderr and "dsq ckpt reshard" in one.stderr
    other = launch(2, *args(out, data_cache, None, "train.steps=6", "model.hidden_size=64",
                            "train.seed=7"), check=False)
    assert other.returncode != 0
    assert "model.hidden_size: 128 -> 64" in other.stderr and "train.seed: 1234 -> 7" in \
        other.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    for name in ("config.yaml", "ds_config.json", "summary.json", "metrics.jsonl"):
        assert after[name] == before[name], name
    ok = dsq("train", *args(out, data_cache, None, "train.steps=6", "train.reshard=auto"))
    assert "resharded" in ok.stdout and "train.steps 4 -> 6" in ok.stdout
    assert consistent(out) == 6
    changes = json.loads((out / "config_changes.jsonl").read_text().splitlines()[-1])
    assert ["train.steps", 4, 6] in changes["changes"] and ["layout.dp", 2, 1] in \
        changes["changes"]


def test_damaged_prepared_data_is_prepared_again_or_refused(tmp_path):
    src = tmp_path / "corpus"
    shutil.copytree(ROOT / "dsq/data/corpus/shakespeare", src)
    cache = tmp_path / "cache"
    extra = [f"data.train=[{src / 'train'}]", f"data.val=[{src / 'val'}]", "train.steps=2",
             "train.ckpt_every=0"]
    dsq("train", *args(tmp_path / "a", cache, None, *extra))
    prepared = next(p for p in cache.iterdir() if (p / "manifest.json").is_file())
    manifest = load_manifest(prepared)
    train_bin = prepared / "train.bin"
    with open(train_bin, "r+b") as fh:
        fh.truncate(2 * (manifest["tokens"]["train"] // 3))  # even: whole tokens, fewer
    res = dsq("train", *args(tmp_path / "b", cache, None, *extra))
    assert "is damaged" in res.stdout + res.stderr
    assert train_bin.stat().st_size == 2 * manifest["tokens"]["train"]
    assert len([p for p in cache.iterdir() if ".damaged-" in p.name]) == 1
    with open(train_bin, "r+b") as fh:
        fh.truncate(train_bin.stat().st_size - 1)  # odd
    shutil.rmtree(src / "train")  # and the sources are gone
    res = dsq("train", *args(tmp_path / "c", cache, None, *extra), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("dsq: error:") == 1 and f"{src / 'train'}' does not exist" in \
        res.stderr
    assert not (tmp_path / "c" / "summary.json").exists()


def test_stale_build_lock_is_cleared_and_the_run_goes_on(tmp_path, data_cache, monkeypatch):
    """A build of DeepSpeed's CPU op killed half-way leaves its ``lock``: PyTorch's builder would
    wait on it forever. The run reports and clears it, and goes on with the built op."""
    import shutil

    import torch.utils.cpp_extension as ce

    # the built op (launch/setup.sh builds it in <venv>/torch_extensions), copied to a folder of
    # this test's own: the lock planted there is seen by this run only, not by tests beside it
    venv = Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(venv))
    built = Path(ce._get_build_directory("deepspeed_shm_comm", verbose=False))
    if not list(built.glob("*.so")):
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
        launch(2, *args(tmp_path / "warm", data_cache, None, "train.steps=1",
                        "train.ckpt_every=0"))
    own = tmp_path / "torch_extensions"
    shutil.copytree(venv, own)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(own))
    op = Path(ce._get_build_directory("deepspeed_shm_comm", verbose=False))
    assert list(op.glob("*.so")), op
    lock = op / "lock"
    lock.write_text("")
    past = time.time() - 3600
    os.utime(lock, (past, past))
    res = launch(2, *args(tmp_path / "run", data_cache, None, "train.steps=2",
                          "train.ckpt_every=0"), timeout=300)
    assert not lock.exists()
    assert f"removed the stale build lock {lock}" in res.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_step"] == 2


def test_stop_signal_during_data_preparation_ends_cleanly(tmp_path):
    """SIGTERM while rank 0 trains the tokenizer (before any step): the handler is already in
    place, so the run stops at its first step boundary with a checkpoint and exit code 75."""
    from dsq.train.stop import PREEMPTED_EXIT_CODE

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "dsq.cli", "train",
                             *args(out, tmp_path / "fresh_cache", None, "train.steps=50")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if "data: training" in line:
            proc.send_signal(signal.SIGTERM)
            break
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == checkpoint.tag_for(1)
    assert "Traceback" not in log
