"""slurm/pretrain.sbatch across two nodes of a real SLURM cluster (tests/e2e/slurm/twonode.py).

One module-scoped cluster serves every test here: dsq-node1 and dsq-node2, one CPU each, in
their own network namespaces. The jobs, in order:

1. the 2-node reference: ``sbatch -N2``, one rank per node, uninterrupted;
2. the same config on one node with 2 ranks (same global batch): the losses must agree;
3. a 2-node job stopped by SIGUSR1 (both nodes checkpoint at one step, the job requeues, both
   nodes resume), whose second attempt then loses dsq-node2 entirely (every process of it,
   slurmd included, is SIGKILLed): the job must fail on both nodes within seconds, and the
   resubmitted command resumes from the last complete checkpoint and ends with the reference's
   losses, in one MLflow run that rank 0 alone logged.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Dict

import pytest

from tests.conftest import read_metrics
from .conftest import BINARIES, SEARCH_PATH, _in_ci
from .test_sbatch import Watch, rank_processes, steps_logged, wait_for
from .twonode import NODES, TwoNodeCluster, missing_tools

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

STEPS = 24
CKPT_EVERY = 4
ONE_PER_NODE = {"DSQ_NPROC_PER_NODE": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in BINARIES if shutil.which(b, path=SEARCH_PATH) is None]
    missing += missing_tools()
    if missing:
        msg = (f"the two-node SLURM test cluster needs {', '.join(missing)} (.ci/run installs "
               f"slurmctld slurmd slurm-client munge iproute2 and runs as root)")
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    c = TwoNodeCluster(tmp_path_factory.mktemp("slurm2"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def train_args(out: Path, cache: Path, db: Path, experiment: str):
    return ["configs/tiny.yaml", f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}",
            "train.eval_every=0", "train.eval_samples=16", "train.keep_ckpts=3",
            "optim.warmup_steps=4", f"train.out_dir={out}", f"data.cache_dir={cache}",
            f"tracking.uri=sqlite:///{db}", f"tracking.experiment={experiment}",
            "train.progress=false", "train.log_every=1"]


def submit(cluster, root: Path, args, nodes: int, per_node: int, wait: bool = False) -> int:
    return cluster.sbatch(f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1",
                          f"--output={root}/%x-%j.out", "slurm/pretrain.sbatch", *args,
                          env={"DSQ_NPROC_PER_NODE": str(per_node)}, wait=wait)


def job_log(root: Path, job: int) -> str:
    p = root / f"dsq-{job}.out"
    return p.read_text() if p.is_file() else ""


def summary(out: Path) -> Dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    """One sqlite store for the module's jobs (its tables are made once), an experiment each."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def run_job(cluster, tmp_path_factory, name: str, nodes: int, per_node: int, cache: Path,
            db: Path):
    root = tmp_path_factory.mktemp(name)
    out = root / "run"
    t0 = time.time()
    job = submit(cluster, root, train_args(out, cache, db, name), nodes, per_node, wait=True)
    rec = {"job": job, "out": out, "db": db, "experiment": name, "seconds": time.time() - t0,
           "info": cluster.job(job), "log": job_log(root, job)}
    assert rec["info"]["JobState"] == "COMPLETED", (rec["info"], rec["log"][-4000:],
                                                    cluster.logs())
    rec["loss"] = read_metrics(out)
    return rec


@pytest.fixture(scope="module")
def two_nodes(cluster, tmp_path_factory, data_cache, mlflow_db):
    return run_job(cluster, tmp_path_factory, "two_nodes", 2, 1, data_cache, mlflow_db)


@pytest.fixture(scope="module")
def one_node(cluster, tmp_path_factory, data_cache, mlflow_db, two_nodes):
    return run_job(cluster, tmp_path_factory, "one_node", 1, 2, data_cache, mlflow_db)


def test_two_node_job_completes_and_matches_one_node(two_nodes, one_node):
    s = summary(two_nodes["out"])
    assert s["nodes"] == 2 and s["world_size"] == 2 and s["dp"] == 2
    assert s["final_step"] == STEPS
    log = two_nodes["log"]
    assert "2 node(s) x 1 rank(s), rendezvous dsq-node1:" in log, log[-3000:]
    for i, node in enumerate(NODES):  # one launcher per node, each with its node rank
        assert f"node {i}/2 {node}: starting 1 rank(s)" in log, log[-3000:]
    s1 = summary(one_node["out"])
    assert s1["nodes"] == 1 and s1["world_size"] == 2 and s1["dp"] == 2
    a, b = two_nodes["loss"], one_node["loss"]
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    diffs = [abs(a[k] - b[k]) for k in a]
    assert max(diffs) <= 1e-5, diffs
    print(f"\n2 nodes x 1 rank vs 1 node x 2 ranks, {STEPS} steps: max |loss diff| "
          f"{max(diffs):.1e}, final losses {a[STEPS]:.6f} / {b[STEPS]:.6f}; job times "
          f"{two_nodes['seconds']:.0f} s / {one_node['seconds']:.0f} s")


class LogWatch:
    """First time (this process's clock) each pattern appeared in a job log, polled often."""

    def __init__(self, path: Path):
        self.path, self.seen = path, {}

    def poll(self, *patterns: str) -> str:
        text = self.path.read_text() if self.path.is_file() else ""
        for p in patterns:
            if p not in self.seen and re.search(p, text):
                self.seen[p] = time.time()
        return text


@pytest.fixture(scope="module")
def lifecycle(cluster, two_nodes, tmp_path_factory, data_cache, mlflow_db):
    from dsq.run import checkpoint

    root = tmp_path_factory.mktemp("lifecycle")
    out, db = root / "run", mlflow_db
    args = train_args(out, data_cache, db, "lifecycle")
    ckpts = out / "checkpoints"
    latest = ckpts / "latest"
    rec: Dict = {"out": out, "db": db, "root": root, "experiment": "lifecycle"}
    REQUEUED, ATTEMPT2 = r"requeueing job", r"attempt 2 started"

    # 1. SIGUSR1 to the batch shell mid-run: checkpoint on both nodes, requeue, resume
    job = rec["job"] = submit(cluster, root, args, 2, 1)
    watch, logw = Watch(cluster, job), LogWatch(root / f"dsq-{job}.out")
    wait_for(lambda: steps_logged(out) >= 3 or watch.over(), 600, "3 training steps")
    assert cluster.state(job) == "RUNNING" and steps_logged(out) < STEPS, job_log(root, job)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    def resumed_and_checkpointed():
        log = logw.poll(REQUEUED, ATTEMPT2)
        m = re.search(r"stopped by signal SIGUSR1 at step (\d+)", log)
        if m is None or ATTEMPT2 not in logw.seen:
            return False
        if "stopped" not in rec:
            rec["stopped"] = int(m.group(1))
            rec["stop_files"] = sorted(p.name for p in (ckpts / checkpoint.tag_for(
                rec["stopped"])).iterdir())
        tag = latest.read_text().strip() if latest.is_file() else ""
        return tag > checkpoint.tag_for(rec["stopped"])  # a checkpoint of attempt 2

    wait_for(lambda: resumed_and_checkpointed() or watch.over(), 600,
             "the requeued attempt's first checkpoint")
    rec["requeue_delay"] = logw.seen[ATTEMPT2] - logw.seen[REQUEUED]
    rec["info_before_crash"] = cluster.job(job)
    assert rec["info_before_crash"]["JobState"] == "RUNNING", job_log(root, job)[-4000:]
    ranks = rank_processes(out)
    rec["ranks_by_node"] = {n: sorted(int(p.environ().get("RANK", -1)) for p in ranks
                                      if p.pid in set(cluster.ns_pids(n))) for n in NODES}
    # what the submitter exported and what the batch script set, seen by the rank on node 2
    env2 = [p.environ() for p in ranks if p.pid in set(cluster.ns_pids(NODES[1]))]
    rec["env_node2"] = {k: env2[0].get(k) for k in ("DSQ_NPROC_PER_NODE", "OMP_NUM_THREADS",
                                                      "PYTHONUNBUFFERED", "MASTER_ADDR")}

    # 2. dsq-node2 dies: every process of it, slurmd included, SIGKILLed at once
    EXITED = r"attempt 2 started[\s\S]*training exited with"
    t0 = time.time()
    rec["crashed_at"] = max(read_metrics(out))
    cluster.crash(NODES[1])
    node1_ranks = lambda: [p for p in rank_processes(out) if p.pid in set(
        cluster.ns_pids(NODES[0]))]
    wait_for(lambda: not node1_ranks(), 120, "dsq-node1's ranks to exit", poll=0.05)
    rec["ranks_gone_s"] = time.time() - t0
    wait_for(lambda: logw.poll(EXITED) and EXITED in logw.seen, 120,
             "the batch script to see training end", poll=0.05)
    rec["batch_saw_exit_s"] = logw.seen[EXITED] - t0
    wait_for(lambda: not rank_processes(out) and not cluster.ns_pids(NODES[1]), 30,
             "nothing left of the job on either node", poll=0.05)
    # the node comes back (a reboot): its slurmd tells slurmctld the job is gone there
    cluster.boot(NODES[1])
    rec["info"] = cluster.wait_final(job, timeout=120, poll=0.2)
    rec["final_s"] = time.time() - t0
    rec["log"] = job_log(root, job)
    rec["tag"] = latest.read_text().strip()
    rec["tag_complete"] = checkpoint.check(ckpts / rec["tag"]) is None
    cluster.wait_idle()

    # 3. the same command again resumes from the last complete checkpoint
    job2 = rec["job2"] = submit(cluster, root, args, 2, 1, wait=True)
    rec["info2"], rec["log2"] = cluster.job(job2), job_log(root, job2)
    rec["loss"] = read_metrics(out)
    return rec


def test_usr1_checkpoints_both_nodes_at_one_step_requeues_and_resumes(lifecycle):
    log, out = lifecycle["log"], lifecycle["out"]
    assert lifecycle["info_before_crash"]["Restarts"] == "1", log[-4000:]
    stopped = lifecycle["stopped"]
    assert 3 <= stopped < STEPS - CKPT_EVERY, stopped
    # one checkpoint, written by both ranks (rank 1 runs on dsq-node2) at the same step
    files = lifecycle["stop_files"]
    assert {"rng_rank00000.pt", "rng_rank00001.pt", "dsq_complete.json"} <= set(files), files
    first, second = log.split("attempt 2 started")
    for attempt in (first, second):
        for i, node in enumerate(NODES):
            assert f"node {i}/2 {node}: starting 1 rank(s)" in attempt, attempt[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" \
        in second
    # global rank 0 (MLflow, metrics, summary) on node rank 0, the batch node
    assert lifecycle["ranks_by_node"] == {NODES[0]: [0], NODES[1]: [1]}
    assert lifecycle["env_node2"] == {"DSQ_NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1",
                                      "PYTHONUNBUFFERED": "1", "MASTER_ADDR": NODES[0]}
    delay = lifecycle["requeue_delay"]
    assert 0 <= delay < 60, delay
    print(f"\nSIGUSR1 at 2 nodes: both checkpointed step {stopped}; requeue delay "
          f"{delay:.1f} s (cred_expire=5); both nodes resumed")


def test_node_death_fails_the_job_on_both_nodes_within_seconds(lifecycle):
    info, log = lifecycle["info"], lifecycle["log"]
    assert info["JobState"] in ("FAILED", "NODE_FAIL") and info["ExitCode"] != "0:0", \
        (info, log[-3000:])
    assert info["Restarts"] == "1" and log.count("requeueing job") == 1  # no requeue on a crash
    assert "srun still waits for other nodes after 5 s (a node down?): ending the job" in log
    assert lifecycle["ranks_gone_s"] < 10 and lifecycle["batch_saw_exit_s"] < 30, lifecycle
    assert lifecycle["tag_complete"]
    print(f"\ndsq-node2 killed at step ~{lifecycle['crashed_at']}: dsq-node1's rank gone "
          f"{lifecycle['ranks_gone_s']:.1f} s later, the batch script saw training end after "
          f"{lifecycle['batch_saw_exit_s']:.1f} s, job {info['JobState']} "
          f"{lifecycle['final_s']:.1f} s after the kill (node rebooted in between)")


def test_resubmission_resumes_and_ends_with_the_uninterrupted_losses(lifecycle, two_nodes):
    log2, out, tag = lifecycle["log2"], lifecycle["out"], lifecycle["tag"]
    assert lifecycle["info2"]["JobState"] == "COMPLETED", log2[-4000:]
    assert f"resumed from {out / 'checkpoints' / tag} at step {int(tag[5:])}" in log2
    assert int(tag[5:]) > lifecycle["stopped"]
    got, ref = lifecycle["loss"], two_nodes["loss"]
    assert sorted(got) == list(range(1, STEPS + 1))
    diffs = [abs(got[s] - ref[s]) for s in got]
    assert max(diffs) <= 1e-5, diffs
    s = summary(out)
    assert s["nodes"] == 2 and s["world_size"] == 2 and s["final_step"] == STEPS
    print(f"\nresubmission resumed from {tag}; max |loss - uninterrupted 2-node| over {STEPS} "
          f"steps after a requeue and a node death: {max(diffs):.1e}")


def test_one_mlflow_run_per_job_logged_by_rank0_only(lifecycle, two_nodes):
    from mlflow.tracking import MlflowClient

    for rec in (two_nodes, lifecycle):  # one job (1 attempt), and one job + resubmission
        s = summary(rec["out"])
        client = MlflowClient(f"sqlite:///{rec['db']}")
        runs = client.search_runs([client.get_experiment_by_name(rec["experiment"])
                                   .experiment_id])
        assert [r.info.run_id for r in runs] == [s["mlflow_run_id"]]
        assert runs[0].info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(s["mlflow_run_id"], "train/loss")]
        assert sorted(steps) == list(range(1, STEPS + 1)), steps  # each step once
        # rank 0 alone writes metrics.jsonl: every step's training row once
        rows = [json.loads(line) for line in (rec["out"] / "metrics.jsonl").read_text()
                .splitlines()]
        assert sorted(r["step"] for r in rows if "train/loss" in r) == list(range(1, STEPS + 1))
