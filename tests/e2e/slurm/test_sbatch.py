"""slurm/pretrain.sbatch and slurm/sweep.sbatch on a real one-node SLURM cluster.

One uninterrupted 2-rank job is the reference. A second job is stopped by SIGUSR1 (SLURM's
warning before a time limit) and requeues itself, loses a rank to SIGKILL in its second
attempt and fails, and is resubmitted after its newest checkpoint was truncated: it must end
with the reference's losses at every step. The sweep runs three recipes as three array
tasks, each its own MLflow run in one experiment.
"""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from .conftest import FINAL_STATES

pytestmark = pytest.mark.slow

STEPS = 40  # room for a stop signal that lands late and two checkpoints after the resume
RANKS = {"DSQ_NPROC_PER_NODE": "2"}


def train_args(out: Path, cache: Path, db: Path, *extra: str):
    return ["configs/tiny.yaml", f"train.steps={STEPS}", "train.ckpt_every=5",
            "train.eval_every=0", "train.keep_ckpts=2", "optim.warmup_steps=5",
            f"train.out_dir={out}", f"data.cache_dir={cache}", f"tracking.uri=sqlite:///{db}",
            "tracking.experiment=slurm", "train.progress=false", "train.log_every=1", *extra]


def submit_2ranks(slurm, log_dir: Path, args, wait: bool = False) -> int:
    """One node, one launcher task with both CPUs, two ranks (a CPU node)."""
    return slurm.sbatch("--nodes=1", "--cpus-per-task=2", f"--output={log_dir}/%x-%j.out",
                        "slurm/pretrain.sbatch", *args, env=RANKS, wait=wait)


def job_log(log_dir: Path, job_id: int) -> str:
    return (log_dir / f"dsq-{job_id}.out").read_text()


def stamps(log: str, pattern: str):
    """Times of the script's log lines (`dsq-slurm [YYYY-mm-dd HH:MM:SS] ...`) matching pattern."""
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            for m in re.finditer(r"dsq-slurm \[([\d\- :]+)\] " + pattern, log)]


def rank_processes(out: Path):
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if (f"train.out_dir={out}" in cmd and "dsq.cli" in cmd
                and "torch.distributed.run" not in cmd and cmd[0] != "bash"):
            found.append(p)
    return found


def wait_for(cond, timeout: float, what: str, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Watch:
    """A job's state from `scontrol`, asked at most once a second (files are polled faster)."""

    def __init__(self, slurm, job: int):
        self.slurm, self.job, self.at, self.last = slurm, job, 0.0, "PENDING"

    def state(self) -> str:
        if time.time() - self.at >= 1.0:
            self.last, self.at = self.slurm.state(self.job), time.time()
        return self.last

    def over(self) -> bool:
        return self.state() in FINAL_STATES


def steps_logged(out: Path) -> int:
    try:
        return len(read_metrics(out))
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory, data_cache):
    """The uninterrupted job, submitted with `sbatch --wait`."""
    root = tmp_path_factory.mktemp("slurm_ref")
    out, db = root / "run", root / "mlflow.db"
    t0 = time.time()
    job = submit_2ranks(slurm, root, train_args(out, data_cache, db), wait=True)
    return {"job": job, "out": out, "db": db, "root": root, "seconds": time.time() - t0,
            "info": slurm.job(job), "log": job_log(root, job), "loss": read_metrics(out)}


def test_pretrain_job_completes_with_summary_and_mlflow_run(reference):
    assert reference["info"]["JobState"] == "COMPLETED", reference["log"][-3000:]
    assert reference["info"]["ExitCode"] == "0:0"
    s = json.loads((reference["out"] / "summary.json").read_text())
    assert s["final_step"] == STEPS and s["world_size"] == 2 and s["dp"] == 2
    assert s["out_dir"] == str(reference["out"])
    assert sorted(reference["loss"]) == list(range(1, STEPS + 1))
    assert "2 rank(s), rendezvous" in reference["log"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{reference['db']}")
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "slurm"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))
    print(f"\n2-rank job of {STEPS} steps: {reference['seconds']:.0f} s from sbatch to the end")


@pytest.fixture(scope="module")
def lifecycle(slurm, reference, tmp_path_factory, data_cache):
    """One run through everything a long job meets, submitted like a user would:

    1. SIGUSR1 to the batch shell mid-run (what `--signal=B:USR1@120` does before a time
       limit): the ranks checkpoint, the script requeues, the second attempt resumes;
    2. SIGKILL to one rank of the second attempt after its second checkpoint: the job fails;
    3. the newest checkpoint is truncated on purpose, and the same command is resubmitted.
    One chain rather than three jobs keeps the suite short (each job start costs ~40 s here).
    """
    from dsq.run import checkpoint

    root = tmp_path_factory.mktemp("slurm_lifecycle")
    out, db = root / "run", root / "mlflow.db"
    args = train_args(out, data_cache, db)
    latest = out / "checkpoints" / "latest"
    rec = {"out": out, "db": db, "root": root}

    # 1. stop signal, checkpoint, requeue, resume
    job = rec["job"] = submit_2ranks(slurm, root, args)
    watch = Watch(slurm, job)
    wait_for(lambda: steps_logged(out) >= 3 or watch.over(), 600, "3 training steps")
    assert slurm.state(job) == "RUNNING" and steps_logged(out) < STEPS, job_log(root, job)
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))

    # 2. the second attempt writes two checkpoints, then loses a rank
    def resumed_and_checkpointed():
        log = job_log(root, job)
        m = re.search(r"stopped by signal SIGUSR1 at step (\d+)", log)
        if m is None or "attempt 2 started" not in log:
            return False
        second = (int(m.group(1)) // 5 + 2) * 5  # ckpt_every=5: attempt 2's second checkpoint
        tag = latest.read_text().strip() if latest.is_file() else ""
        return tag >= f"step_{second:08d}"

    wait_for(lambda: resumed_and_checkpointed() or watch.over(), 900,
             "the requeued attempt's second checkpoint")
    victims = rank_processes(out)
    rec["info_before_kill"] = slurm.job(job)
    assert slurm.state(job) == "RUNNING" and len(victims) == 2, \
        ("the job ended before the kill", job_log(root, job)[-4000:])
    t0 = time.time()
    victims[-1].send_signal(signal.SIGKILL)
    wait_for(lambda: slurm.state(job) not in ("RUNNING", "COMPLETING"), 300, "the job to end",
             poll=0.1)
    rec["seconds_to_fail"] = time.time() - t0
    rec["info"] = slurm.job(job)
    rec["log"] = job_log(root, job)
    wait_for(lambda: not rank_processes(out), 60, "the other rank to be gone", poll=0.5)
    rec["summary_after_kill"] = (out / "summary.json").exists()
    rec["killed_at"] = max(read_metrics(out))

    # 3. damage the newest checkpoint, resubmit the same command
    tag = rec["tag"] = latest.read_text().strip()
    rec["tag_complete"] = checkpoint.check(out / "checkpoints" / tag) is None
    rec["previous"] = sorted(p.name for p in (out / "checkpoints").glob("step_*")
                             if p.name < tag and checkpoint.check(p) is None)
    victim = rec["victim"] = max((p for p in (out / "checkpoints" / tag).iterdir()
                                  if p.name != checkpoint.MARKER), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    job2 = rec["job2"] = submit_2ranks(slurm, root, args, wait=True)
    rec["info2"] = slurm.job(job2)
    rec["log2"] = job_log(root, job2)
    rec["loss"] = read_metrics(out)
    return rec


def test_usr1_checkpoints_requeues_and_resumes(lifecycle):
    log, out = lifecycle["log"], lifecycle["out"]
    assert lifecycle["info_before_kill"]["Restarts"] == "1", log[-4000:]
    m = re.search(r"stopped by signal SIGUSR1 at step (\d+)", log)
    assert m, log[-4000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < STEPS - 10  # mid-run, with room for attempt 2's two checkpoints
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in log
    # the requeue delay: from `scontrol requeue` to the second attempt's first line
    requeued, = stamps(log, "requeueing job")
    started, = stamps(log, r"job \d+ attempt 2 started")
    delay = started - requeued
    assert 0 <= delay < 120, delay
    print(f"\nSIGUSR1: stopped at step {stopped}, requeue delay {delay:.0f} s (cred_expire=5)")


def test_killed_rank_fails_the_job_fast_without_requeue(lifecycle):
    info, log = lifecycle["info"], lifecycle["log"]
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log[-3000:])
    assert info["Restarts"] == "1" and log.count("requeueing job") == 1  # no new requeue
    assert lifecycle["seconds_to_fail"] < 120
    assert not lifecycle["summary_after_kill"]
    assert lifecycle["tag_complete"]  # the last checkpoint survived the kill complete
    print(f"\nSIGKILL of a rank at step ~{lifecycle['killed_at']}: job FAILED "
          f"{lifecycle['seconds_to_fail']:.1f} s later")


def test_resubmission_skips_a_truncated_checkpoint_and_ends_with_the_reference(
        lifecycle, reference):
    log2, out, tag = lifecycle["log2"], lifecycle["out"], lifecycle["tag"]
    assert lifecycle["info2"]["JobState"] == "COMPLETED", log2[-4000:]
    assert lifecycle["previous"], "no complete checkpoint before the truncated one"
    victim = lifecycle["victim"]
    assert re.search(rf"{tag} is not usable \({re.escape(str(victim))} is truncated.*\): "
                     rf"moved aside to {tag}\.invalid-", log2), log2[-4000:]
    prev = lifecycle["previous"][-1]
    assert f"resumed from {out / 'checkpoints' / prev} at step {int(prev[5:])}" in log2
    got = lifecycle["loss"]
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference["loss"][step], abs=1e-6), step
    worst = max(abs(got[s] - reference["loss"][s]) for s in got)
    # three attempts, one MLflow run, every step logged once
    from mlflow.tracking import MlflowClient

    s = json.loads((out / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{lifecycle['db']}")
    runs = client.search_runs([client.get_experiment_by_name("slurm").experiment_id])
    assert [r.info.run_id for r in runs] == [s["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(s["mlflow_run_id"], "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))
    print(f"\nresubmission skipped truncated {tag} ({victim.name}), resumed from {prev}; "
          f"max |loss - uninterrupted| over {STEPS} steps after 2 stops: {worst:.1e}")


def test_sweep_runs_one_recipe_per_array_task_into_one_experiment(slurm, tmp_path, data_cache):
    recipes = ["configs/recipes/baseline.yaml", "configs/recipes/w8.yaml",
               "configs/recipes/w8a8.yaml"]
    db = tmp_path / "mlflow.db"
    base = ["configs/tiny.yaml", "train.steps=3", "train.ckpt_every=0", "train.eval_every=0",
            "train.eval_samples=16", f"train.out_dir={tmp_path / 'sweep'}",
            f"data.cache_dir={data_cache}", f"tracking.uri=sqlite:///{db}",
            "tracking.experiment=sweep", "train.progress=false", "train.log_every=1"]
    job = slurm.sbatch("--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.out",
                       "slurm/sweep.sbatch", *base, "--", *recipes,
                       env={"DSQ_NPROC_PER_NODE": "1"}, wait=True)
    logs = {p.name: p.read_text() for p in tmp_path.glob("dsq-sweep-*.out")}
    assert len(logs) == 3, sorted(logs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("sweep")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["baseline", "w8", "w8a8"], "\n".join(v[-2000:] for v in logs.values())
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        s = json.loads((tmp_path / "sweep" / name / "summary.json").read_text())
        assert s["mlflow_run_id"] == run.info.run_id and s["final_step"] == 3
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3
    assert runs["baseline"].data.params["quant.weight"] == "None"
    assert runs["w8"].data.params["quant.weight"] == "int8:channel"
    assert runs["w8a8"].data.params["quant.activation"] == "int8:token"
    assert slurm.job(job)["JobState"] == "COMPLETED"
