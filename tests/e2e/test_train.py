"""End to end through the deepspeed launcher with 2 CPU ranks on the shipped corpus (tiny preset).

One reference run (TP=1, DP=2, ZeRO-2, fp32) is compared with other layouts, a killed and
resumed run, a single-process run, bf16, ``dsq eval`` and the MLflow store.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CORPUS, ROOT, dsq, launch, read_metrics

pytestmark = pytest.mark.slow

STEPS = 40
# The learning rate of the first PREFIX updates (the 5 warmup steps and the first step of the
# cosine, at its top) does not depend on train.steps: a run of PREFIX steps has the
# reference's losses for all of its steps
PREFIX = 7


def base_args(out: Path, cache: Path, db: Path, *extra: str):
    return ["configs/tiny.yaml", f"train.steps={STEPS}", "train.ckpt_every=8",
            "train.eval_every=20", "train.eval_samples=1000", "optim.warmup_steps=5",
            f"train.out_dir={out}", f"data.cache_dir={cache}", f"tracking.uri=sqlite:///{db}",
            "tracking.experiment=e2e", "train.progress=false", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def ref(tmp_path_factory, data_cache):
    """The uninterrupted reference run."""
    root = tmp_path_factory.mktemp("ref")
    db = root / "mlflow.db"
    out = root / "run"
    import socket

    with socket.socket() as sock:  # this run's port names its segments (other tests run beside)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    shm = lambda: set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    before = shm()
    res = launch(2, *base_args(out, data_cache, db),
                 env={"DSQ_LOG_LEVEL": "INFO", "MASTER_PORT": str(port)})  # verbose
    return {"out": out, "db": db, "cache": data_cache, "root": root, "stdout": res.stdout,
            "log": res.stdout + res.stderr, "shm_left": shm() - before,
            "summary": json.loads((out / "summary.json").read_text()),
            "loss": read_metrics(out)}


def test_reference_run_trains_and_reports(ref):
    s = ref["summary"]
    assert s["final_step"] == STEPS and s["world_size"] == 2 and s["dp"] == 2 and s["tp"] == 1
    for key in ("train_loss", "val_loss", "val_ppl", "vocab_size", "tokens_per_s", "params",
                "optimizer_state_bytes", "peak_rss_bytes", "mlflow_run_id", "tracking_uri"):
        assert key in s, key
    # throughput as users compare it: the tiny model's hand-counted FLOPs per token
    # (tests/unit/train/test_throughput.py), per device over 2 ranks, no MFU on CPUs
    assert s["model_flops_per_token"] == 4_325_376
    assert s["tokens_per_s_per_device"] == pytest.approx(s["tokens_per_s"] / 2, rel=1e-12)
    assert s["mfu"] is None and s["peak_flops"] is None
    # training works: validation far below the uniform-guess loss ln(V), and it falls
    val = read_metrics(ref["out"], "val/loss")
    assert sorted(val) == [20, 40]
    assert val[40] < val[20] < math.log(s["vocab_size"]) - 1.0
    assert s["val_ppl"] == pytest.approx(math.exp(s["val_loss"]), rel=1e-9)
    # fp32 AdamW under ZeRO-2 over 2 ranks: each rank holds m and v (8 B) for half the params
    per_rank = 8 * s["params"] / 2
    for b in s["optimizer_state_bytes"]:
        assert abs(b - per_rank) / per_rank < 0.01
    assert len(s["peak_rss_bytes"]) == 2 and min(s["peak_rss_bytes"]) > 50e6
    assert sorted(ref["loss"]) == list(range(1, STEPS + 1))
    # the resolved config and the generated DeepSpeed JSON are saved with run and checkpoints
    assert "preset: tiny" in (ref["out"] / "config.yaml").read_text()
    ds = json.loads((ref["out"] / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 1
    latest = (ref["out"] / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:08d}"
    assert (ref["out"] / "checkpoints" / latest / "config.yaml").is_file()
    assert "mlflow ui --backend-store-uri sqlite:///" in ref["stdout"]
    # the tokenizer is a record of the run directory (`dsq mlflow sync` uploads it), and part
    # of the checkpoint its marker lists
    tok = (ref["out"] / "checkpoints" / latest / "tokenizer.model").read_bytes()
    assert (ref["out"] / "tokenizer.model").read_bytes() == tok and len(tok) > 1000
    marker = json.loads((ref["out"] / "checkpoints" / latest / "dsq_complete.json").read_text())
    assert marker["files"]["tokenizer.model"] == len(tok)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{ref['db']}")
    assert "tokenizer.model" in {a.path for a in c.list_artifacts(s["mlflow_run_id"])}


def test_run_leaves_no_shared_memory_behind(ref):
    # on CPUs DeepSpeed's all-reduce op maps a ~66 MB /dev/shm segment per rank (RAM) and never
    # unlinks it; dsq unlinks the names once all ranks are connected (the op's build message
    # shows with DSQ_LOG_LEVEL=INFO, as here)
    assert "deepspeed_shm_comm_op built successfully" in ref["log"]
    assert ref["shm_left"] == set()


def test_mlflow_store_holds_the_run(ref):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ref['db']}")
    run = client.get_run(ref["summary"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "e2e"
    p = run.data.params
    assert p["model.preset"] == "tiny" and p["train.steps"] == str(STEPS)
    assert p["deepspeed.zero_stage"] == "2" and p["parallel.tp"] == "1"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))
    for m in hist:
        assert m.value == pytest.approx(ref["loss"][m.step], rel=1e-6)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val/loss")} == {20, 40}
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/tokens_per_s_per_device", "summary/tokens_per_s_per_device", "val/ppl"):
        assert client.get_metric_history(run.info.run_id, key), key
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ds_config.json", "summary.json"} <= arts
    assert run.data.tags["dsq.layout"] == "tp1xdp2"


@pytest.mark.parametrize("variant", [
    ("parallel.tp=2",),
    ("deepspeed.zero_stage=0",),
    ("deepspeed.zero_stage=1",),
])
def test_layouts_and_zero_stages_match_reference(ref, tmp_path, variant):
    """Same seed and global batch: the same losses up to fp32 reduction-order noise."""
    out = tmp_path / "run"
    launch(2, *base_args(out, ref["cache"], tmp_path / "db.db", "tracking.enabled=false",
                         "train.ckpt_every=0", "train.eval_every=0", f"train.steps={PREFIX}"),
           *variant)
    got = read_metrics(out)
    for step in range(1, PREFIX + 1):
        assert got[step] == pytest.approx(ref["loss"][step], abs=2e-5), (variant, step)
    # and the comparison is sharp: consecutive steps differ by far more than the tolerance
    assert abs(ref["loss"][2] - ref["loss"][1]) > 1e-3


def test_single_process_without_launcher(ref, tmp_path):
    out = tmp_path / "run"
    args = base_args(out, ref["cache"], tmp_path / "db.db", "tracking.enabled=false",
                     "train.ckpt_every=0", "train.eval_every=0", f"train.steps={PREFIX}")
    dsq("train", *args)
    got = read_metrics(out)
    for step in range(1, PREFIX + 1):
        assert got[step] == pytest.approx(ref["loss"][step], abs=2e-5)


def test_kill_and_resume_continues_exactly(ref, tmp_path):
    out = tmp_path / "run"
    args = base_args(out, ref["cache"], tmp_path / "db.db")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(["bash", str(ROOT / "launch/local.sh"), "2", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    assert latest.exists(), "the run never wrote a checkpoint"
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    killed_at = max(read_metrics(out))
    res = launch(2, *args)
    resumed = [ln for ln in res.stdout.splitlines() if "resumed from" in ln]
    assert resumed, res.stdout[-2000:]
    start = int(resumed[0].rsplit("step", 1)[1])
    assert 8 <= start < STEPS and start % 8 == 0
    got = read_metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(start + 1, STEPS + 1):
        assert got[step] == pytest.approx(ref["loss"][step], abs=1e-6), step
    s = json.loads((out / "summary.json").read_text())
    assert s["val_loss"] == pytest.approx(ref["summary"]["val_loss"], abs=1e-6)
    # one MLflow run, every step logged once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'db.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert [r.info.run_id for r in runs] == [s["mlflow_run_id"]]
    steps = [m.step for m in client.get_metric_history(s["mlflow_run_id"], "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), (killed_at, start)
    # the same command once more (a late requeue, a rerun): nothing to train, results kept
    before = (out / "summary.json").read_text()
    res = launch(2, *args)
    assert "nothing to do" in res.stdout and (out / "summary.json").read_text() == before
    steps = [m.step for m in client.get_metric_history(s["mlflow_run_id"], "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))


def test_bf16_trains_close_to_fp32(ref, tmp_path):
    out = tmp_path / "run"
    launch(2, *base_args(out, ref["cache"], tmp_path / "db.db", "tracking.enabled=false",
                         "train.ckpt_every=0", "train.eval_every=0",
                         "deepspeed.precision=bf16", "deepspeed.zero_stage=1", "train.steps=10"))
    got = read_metrics(out)
    # bf16 compute rounds at ~3 significant digits: close to fp32, but not identical
    assert got[1] == pytest.approx(ref["loss"][1], abs=0.02)
    assert got[1] != ref["loss"][1]
    assert got[10] < got[1] - 0.2


def test_eval_cli_matches_training_validation(ref, tmp_path):
    out_json = tmp_path / "eval.json"
    dsq("eval", str(ref["out"]), "--data", str(ROOT / "dsq/data/corpus/shakespeare/val"),
        "--json", str(out_json))
    got = json.loads(out_json.read_text())
    # the same windows of the same tokens as the run's final validation (eval_samples >= all)
    assert got["loss"] == pytest.approx(ref["summary"]["val_loss"], abs=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]))
    res = dsq("eval", str(tmp_path / "nothing"), "--data", "x.txt", check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr


def _rank_pids(out: Path):
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if "dsq.cli" in " ".join(p.info["cmdline"] or []) and f"train.out_dir={out}"
            in (p.info["cmdline"] or []) and "deepspeed.launcher" not in " ".join(p.info["cmdline"])]


def test_stop_signal_on_one_rank_checkpoints_all_and_resumes(ref, tmp_path):
    """SIGUSR1 (SLURM's warning) to one rank: all ranks checkpoint at the same step boundary,
    exit with code 75, and a rerun finishes with the reference losses."""
    from dsq.train.stop import PREEMPTED_EXIT_CODE

    out = tmp_path / "run"
    args = base_args(out, ref["cache"], tmp_path / "db.db", "train.ckpt_every=0")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(["bash", str(ROOT / "launch/local.sh"), "2", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3:
            break
        time.sleep(0.02)
    ranks = _rank_pids(out)
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    assert "stopped by signal SIGUSR1" in log
    stopped = max(read_metrics(out))
    assert 3 <= stopped < STEPS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    res = launch(2, *args)
    assert f"at step {stopped}" in res.stdout
    got = read_metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(stopped + 1, STEPS + 1):
        assert got[step] == pytest.approx(ref["loss"][step], abs=1e-6), step


def _run_in_terminal(cmd, timeout: int = 600):
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal of 120 columns, as a user does;
    returns (exit code, everything it wrote)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    for k in ("DSQ_LOG_LEVEL", "OMP_NUM_THREADS"):
        env.pop(k, None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 1.0)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed: every writer exited
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def _unigram_entropy(tokenizer: Path, folder: Path) -> float:
    """Entropy (nats) of the token frequencies of the text files in ``folder``."""
    import numpy as np
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = [i for f in sorted(folder.iterdir()) for i in sp.encode(f.read_text())]
    p = np.bincount(np.array(ids)) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_readme_first_command_is_smooth_and_quiet(data_cache, tmp_path):
    """The README's first command (tiny config, w8a8g8 with 8-bit states and integer GEMMs, 2
    ranks, in a terminal): no loss spike (no step after step 10 above 1.15x the lowest loss
    before it), every linear quantized, and at most 10 lines besides the progress bar and the
    final summary."""
    out = tmp_path / "run"
    code, text = _run_in_terminal(["bash", "launch/local.sh", "2", "configs/tiny.yaml",
                                   "configs/recipes/w8a8g8.yaml",
                                   "configs/recipes/optim/m8v8.yaml", "quant.compute=int8",
                                   f"train.out_dir={out}", f"data.cache_dir={data_cache}",
                                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 0, text[-3000:]
    loss = read_metrics(out)
    assert sorted(loss) == list(range(1, 201))
    spikes = [s for s in loss if s > 10 and loss[s] > 1.15 * min(loss[t] for t in loss if t < s)]
    assert spikes == [], {s: loss[s] for s in spikes}
    summary = json.loads((out / "summary.json").read_text())
    # learned more than token frequencies: below the training text's unigram entropy (what
    # the best context-free model scores), computed here with the run's tokenizer
    h1 = _unigram_entropy(out / "tokenizer.model", CORPUS / "train")
    assert summary["loss_spikes"] == [] and summary["train_loss"] < h1 - 0.5, (summary, h1)
    assert summary["quantized_layers"] == 9, summary
    assert "quantized linears: 9" in text, text[-3000:]
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    bar = [ln for ln in lines if "\r" in ln or ln.startswith("train:")]
    final = [ln for ln in lines if ln.startswith(("done:", "results:", "MLflow:", "  view it:"))]
    other = [ln for ln in lines if ln not in bar and ln not in final]
    assert bar and len(final) == 4, text[-3000:]
    assert len(other) <= 10, "\n".join(other)
    assert not any("INFO" in ln or "Traceback" in ln for ln in other), "\n".join(other)
    # nothing is wrong, so nothing warns; the start-up lines say what runs
    assert not any("warning" in ln.lower() for ln in other), "\n".join(other)
    assert any(ln.startswith("dsq: quant.compute=int8 for w=int8:channel") for ln in other)
    assert "optimizer: qadamw, m 8-bit, v 8-bit (linear), blocks of 256" in text
    assert any(ln.startswith("kernels: quantization ") for ln in other), "\n".join(other)


def test_ctrl_c_checkpoints_and_exits_130_without_traceback(ref, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the launcher's whole process group. Every rank
    checkpoints at the same step boundary, as on SIGTERM, and the run exits 130 quietly."""
    out = tmp_path / "run"
    args = base_args(out, ref["cache"], tmp_path / "db.db", "train.ckpt_every=0")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    env.pop("DSQ_LOG_LEVEL", None)
    proc = subprocess.Popen(["bash", str(ROOT / "launch/local.sh"), "2", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "stopped by signal SIGINT" in log
    stopped = max(read_metrics(out))
    assert 3 <= stopped < STEPS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
