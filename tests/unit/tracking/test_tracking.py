"""MLflow run records without training: the experiment opens in MLflow 3's model-training view,
runs have their real start and end time, a user and a source, and a SQLite store keeps
artifacts next to the database."""

import getpass
import time

from mlflow.tracking import MlflowClient

from dsq.tracking import EXPERIMENT_KIND, Tracker, process_start_ms


def test_run_record(tmp_path):
    db = tmp_path / "runs" / "mlflow.db"
    uri = f"sqlite:///{db}"
    before = time.time() * 1000
    t = Tracker(uri, "exp", tmp_path / "out", "r1", background=False)
    t.log_metrics({"train/loss": 7.5}, 1)
    (tmp_path / "a.txt").write_text("artifact")
    t.log_artifact(tmp_path / "a.txt")
    time.sleep(1.2)  # the run lasts at least this long
    t.close("FINISHED")
    after = time.time() * 1000
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("exp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" == \
        EXPERIMENT_KIND["mlflow.experimentKind"]
    # artifacts next to the database, not in ./mlruns of the current directory
    assert exp.artifact_location == (db.parent / "mlflow-artifacts").as_uri()
    assert (db.parent / "mlflow-artifacts" / t.run_id / "artifacts" / "a.txt").read_text() == \
        "artifact"
    run = c.get_run(t.run_id)
    # start: when this process started (before the tracker existed); end: at close()
    assert run.info.start_time == process_start_ms() <= before
    assert before + 1200 <= run.info.end_time <= after
    tags = run.data.tags
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"].startswith("dsq")


def test_existing_experiment_gets_the_kind_tag(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp_id = c.create_experiment("old")
    assert "mlflow.experimentKind" not in c.get_experiment(exp_id).tags
    t = Tracker(uri, "old", tmp_path / "out", background=False)
    t.log_metrics({"x": 1.0}, 1)
    t.close()
    assert c.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_link_opens_the_model_training_view():
    from dsq.tracking import ui_command

    assert ui_command("sqlite:////x/runs/mlflow.db", "3").endswith(
        "(then open http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning)")
    assert ui_command("http://h:5000/", "7") == \
        "open http://h:5000/#/experiments/7?workflowType=machine_learning in a browser"


def test_sync_uploads_every_record_of_a_run_directory(tmp_path):
    """`dsq mlflow sync` of a run that trained without MLflow: params, metrics and every file
    of RUN_ARTIFACTS that the trainer writes, the tokenizer included (bytes unchanged)."""
    import json
    from pathlib import Path

    from dsq.config import load_config, to_yaml
    from dsq.tracking import RUN_ARTIFACTS, sync_run

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "run"
    out.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (out / "config.yaml").write_text(to_yaml(load_config([str(root / "configs/tiny.yaml")])))
    (out / "ds_config.json").write_text("{}")
    (out / "tokenizer.model").write_bytes(bytes(range(256)) * 3)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 7.0}) + "\n")
    (out / "summary.json").write_text(json.dumps({"final_step": 1}))
    run_id = sync_run(out, uri=uri, log=lambda *a: None)
    c = MlflowClient(uri)
    names = {a.path for a in c.list_artifacts(run_id)}
    assert names == set(RUN_ARTIFACTS) and "tokenizer.model" in names
    local = c.download_artifacts(run_id, "tokenizer.model", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (out / "tokenizer.model").read_bytes()
    assert [m.value for m in c.get_metric_history(run_id, "train/loss")] == [7.0]
