"""A real MLflow tracking server (SQLite backend, proxied artifacts) on a loopback port:
2-rank training logs into it, survives it going down mid-run, and ``dsq report`` reads it."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dsq.parallel import free_port

from tests.conftest import ROOT, dsq, launch, read_metrics

pytestmark = pytest.mark.slow
STEPS = 30


class Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 180) -> None:
        env = {**os.environ, "MLFLOW": str(Path(sys.executable).parent / "mlflow")}
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "launch/mlflow_server.sh"), "--port", str(self.port),
             "--backend", f"sqlite:///{self.root}/server.db", "--artifacts",
             str(self.root / "artifacts")], env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.root / "server.log", "a"), start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"MLflow server did not come up: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s
    s.stop()


def args(out, cache, uri, *extra):
    return ["configs/tiny.yaml", f"train.steps={STEPS}", "train.eval_every=10",
            "train.ckpt_every=0", f"train.out_dir={out}", f"data.cache_dir={cache}",
            f"tracking.uri={uri}", "tracking.experiment=server", "train.progress=false", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def server_run(server, tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("srv") / "run"
    launch(2, *args(out, data_cache, server.uri))
    return out


def test_training_logs_to_server(server, server_run):
    from mlflow.tracking import MlflowClient

    s = json.loads((server_run / "summary.json").read_text())
    assert s["tracking_uri"] == server.uri
    c = MlflowClient(server.uri)
    run = c.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.preset"] == "tiny"
    assert run.data.params["versions.torch"].startswith("2.")
    assert run.data.tags["dsq.recipe"] == "baseline" and run.data.tags["dsq.layout"] == "tp1xdp2"
    losses = read_metrics(server_run)
    hist = c.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))
    assert all(m.value == pytest.approx(losses[m.step], rel=1e-6) for m in hist)
    assert {m.step for m in c.get_metric_history(run.info.run_id, "val/ppl")} == {10, 20, 30}
    assert c.get_metric_history(run.info.run_id, "optim/state_bytes")[0].value > 0
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ds_config.json", "summary.json", "loss_curve.png",
            "tokenizer.model"} <= arts
    local = c.download_artifacts(run.info.run_id, "summary.json", str(server_run.parent))
    assert json.loads(Path(local).read_text())["final_step"] == STEPS


def test_server_down_mid_run_then_sync(server, server_run, tmp_path, data_cache):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "default"}
    proc = subprocess.Popen(["bash", str(ROOT / "launch/local.sh"), "2",
                             *args(out, data_cache, server.uri, "tracking.close_timeout_s=3")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3:
            break
        time.sleep(0.05)
    server.stop()
    t_down = time.time()
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert log.count("is unreachable") == 1, log[-3000:]  # warned once
    assert "dsq mlflow sync" in log
    # training was unaffected: the same losses as with the server up
    ref, got = read_metrics(server_run), read_metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == pytest.approx(ref[s], abs=1e-6) for s in got)
    wall_after_down = time.time() - t_down
    server.start()
    s = json.loads((out / "summary.json").read_text())
    dsq("mlflow", "sync", str(out))
    c = MlflowClient(server.uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert s["mlflow_run_id"] in (None, run_id)
    steps = [m.step for m in c.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))  # all there, none twice
    assert c.get_run(run_id).info.status == "FINISHED"
    # a second sync changes nothing
    dsq("mlflow", "sync", str(out))
    assert len(c.get_metric_history(run_id, "train/loss")) == STEPS
    print(f"\nserver down for the last {wall_after_down:.1f}s of the run; "
          f"tokens/s down={s['tokens_per_s']:.0f} up="
          f"{json.loads((server_run / 'summary.json').read_text())['tokens_per_s']:.0f}")


def test_report_table_and_plot(tmp_path, data_cache):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path}/m.db"
    for recipe, extra in (("baseline", []), ("lr-x3", ["optim.lr=6e-3"]),
                          ("lr-x0.3", ["optim.lr=6e-4"])):
        dsq("train", *args(tmp_path / recipe, data_cache, db, f"tracking.recipe={recipe}",
                           "tracking.experiment=sweep", "train.steps=12", "train.eval_every=4",
                           "train.micro_batch=16", *extra))
    res = dsq("report", "--experiment", "sweep", "--tracking-uri", db, "--out",
              str(tmp_path / "report"))
    md = (tmp_path / "report" / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "lr-x0.3", "lr-x3"]
    vals = {r.split("|")[1].strip(): r.split("|") for r in rows}
    base_val = float(vals["baseline"][10])  # one seed each: no std, s.e. or noise verdict
    assert vals["baseline"][12].strip() == "+0.0000" and vals["baseline"][8].strip() == "1"
    for name in ("lr-x3", "lr-x0.3"):
        assert float(vals[name][12]) == pytest.approx(float(vals[name][10]) - base_val, abs=2e-4)
        assert [vals[name][i].strip() for i in (11, 13, 14)] == ["-", "-", "-"]
    png = tmp_path / "report" / "val_curves.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    c = MlflowClient(db)
    exp = c.get_experiment_by_name("sweep")
    reports = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("dsq.kind") == "report"]
    assert len(reports) == 1
    assert {a.path for a in c.list_artifacts(reports[0].info.run_id)} == {"report.md", "val_curves.png"}
    assert "baseline" in res.stdout
    bad = dsq("report", "--experiment", "nope", "--tracking-uri", db, check=False)
    assert bad.returncode == 2 and "no experiment 'nope'" in bad.stderr
