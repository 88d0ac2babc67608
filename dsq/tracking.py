"""MLflow tracking for rank 0: params, metrics with steps, artifacts; one run per out_dir.

The run id is kept in ``<out_dir>/mlflow_run_id`` so that a resumed run logs into the same
MLflow run. Metrics are buffered and sent in batches through ``MlflowClient.log_batch``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, Optional

RUN_ID_FILE = "mlflow_run_id"


def normalize_uri(uri: str) -> str:
    """Make relative sqlite/file URIs absolute, so every process and the UI see the same store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + os.path.abspath(uri[len("file:"):])
    if "://" not in uri and ":" not in uri:
        return "file:" + os.path.abspath(uri)
    return uri


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"


class Tracker:
    """A thin MLflow client wrapper; a no-op when disabled."""

    def __init__(self, cfg, out_dir: Path, enabled: bool = True, flush_every_s: float = 10.0):
        self.enabled = enabled and cfg.tracking.enabled
        self.uri = normalize_uri(cfg.tracking.uri)
        self.run_id: Optional[str] = None
        self._buffer = []
        self._logged_until: Dict[str, int] = {}
        self._last_flush = time.time()
        self.flush_every_s = flush_every_s
        if not self.enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.tracking.experiment)
        id_file = out_dir / RUN_ID_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            # a resumed run re-computes steps after its checkpoint: never log a step twice
            for key in self.client.get_run(self.run_id).data.metrics:
                hist = self.client.get_metric_history(self.run_id, key)
                self._logged_until[key] = max((m.step for m in hist), default=-1)
        else:
            run = self.client.create_run(exp_id, run_name=cfg.tracking.run_name or out_dir.name)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id)

    def log_params(self, params: Dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Dict) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items()
                         if step > self._logged_until.get(k, -1)]
        if time.time() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self._buffer:
            return
        for i in range(0, len(self._buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
        self._buffer = []
        self._last_flush = time.time()

    def log_artifact(self, path: Path, subdir: Optional[str] = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), subdir)

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
