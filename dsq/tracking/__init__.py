"""MLflow tracking for rank 0 that can never slow down or stop training.

Every call from the training loop only appends to an in-memory queue. A background thread
owns the ``MlflowClient`` and sends the queue in order, in batches; when the tracking
server is unreachable or slow it keeps everything, warns once, retries with back-off, and
sends it all when the server is back. ``<out_dir>/metrics.jsonl`` is the local record of
every logged step, so whatever could not be sent before the process ended is uploaded
later by ``dsq mlflow sync OUT_DIR``.

One run per ``out_dir``: its id is kept in ``<out_dir>/mlflow_run_id``, so a resumed or
requeued run continues the same MLflow run. Before sending metrics of a continued run the
worker reads the last step the server has for each key and skips what it already has, so
no step is ever logged twice.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Tuple

RUN_ID_FILE = "mlflow_run_id"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment tag MLflow 3's UI reads to open an experiment in its model-training view
(runs table and metric charts) rather than the GenAI view (traces, evaluation runs)."""
ARTIFACTS_DIR = "mlflow-artifacts"
"""For a SQLite store, new experiments keep their artifacts in this folder next to the
database file (``runs/mlflow-artifacts`` by default), not in ``./mlruns`` of the current
directory."""


def process_start_ms() -> int:
    """When this process started (ms since the epoch): the run's start time."""
    try:
        import psutil

        return int(psutil.Process().create_time() * 1000)
    except Exception:
        return _IMPORTED_MS


_IMPORTED_MS = int(time.time() * 1000)


def run_source_tags() -> Dict[str, str]:
    """Who started the run and how: MLflow's user and source tags."""
    import getpass
    import sys

    try:
        user = getpass.getuser()
    except Exception:
        user = os.environ.get("USER", "unknown")
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("cli.py", "dsq", "-c")) else sys.argv
    return {"mlflow.user": user,
            "mlflow.source.name": ("dsq " + " ".join(argv))[:500],
            "mlflow.source.type": "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL"}


def artifact_location(uri: str) -> Optional[str]:
    """Artifact root for new experiments of a SQLite store (next to the database), else None
    (the server's or MLflow's default)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).resolve().as_uri()
    return None


def normalize_uri(uri: str) -> str:
    """Make relative sqlite/file URIs absolute, so every process and the UI see the same store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + os.path.abspath(uri[len("file:"):])
    from dsq.config.sections import is_bare_path

    if is_bare_path(uri):
        return "file:" + os.path.abspath(uri)
    return uri


def ui_command(uri: str, experiment_id: Optional[str] = None) -> str:
    """How to look at a store; with an experiment id, the link opens it in MLflow 3's model-
    training view (the UI's GenAI/Model training switch is global and starts on GenAI)."""
    page = f"/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page} in a browser"
    return f"mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000{page})"


def _fast_fail_http() -> None:
    """MLflow's HTTP client retries for minutes by default; our worker retries on its own."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class Tracker:
    """Rank 0's MLflow run. ``background=False`` sends synchronously (``dsq mlflow sync``)."""

    def __init__(self, uri: str, experiment: str, out_dir: Path, run_name: Optional[str] = None,
                 enabled: bool = True, background: bool = True, close_timeout_s: float = 60.0,
                 retry_max_s: float = 30.0):
        self.enabled = enabled
        self.uri = normalize_uri(uri)
        self.experiment, self.run_name = experiment, run_name or Path(out_dir).name
        self.out_dir = Path(out_dir)
        self.close_timeout_s, self.retry_max_s = close_timeout_s, retry_max_s
        self._id_file = self.out_dir / RUN_ID_FILE
        self.run_id: Optional[str] = (self._id_file.read_text().strip()
                                      if self._id_file.is_file() else None)
        self.start_ms = process_start_ms()
        self.experiment_id: Optional[str] = None
        self._ops: Deque[Tuple[str, tuple]] = collections.deque()
        self._cv = threading.Condition()
        self._client = None
        self._logged_until: Optional[Dict[str, int]] = None
        self._warned = False
        self.failures = 0
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        if not enabled:
            return
        _fast_fail_http()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        if background:
            self._thread = threading.Thread(target=self._worker, name="dsq-mlflow", daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, cfg, out_dir: Path, enabled: bool = True) -> "Tracker":
        t = cfg.tracking
        return cls(t.uri, t.experiment, out_dir, t.run_name, enabled=enabled and t.enabled,
                   close_timeout_s=t.close_timeout_s)

    # ------------------------------------------------------------ producer side (training)
    def _put(self, kind: str, *args) -> None:
        if not self.enabled:
            return
        with self._cv:
            self._ops.append((kind, args))
            self._cv.notify()
        if self._thread is None:
            self._drain(raise_errors=True)

    def log_params(self, params: Dict) -> None:
        self._put("params", {k: str(v)[:6000] for k, v in params.items()})

    def set_tags(self, tags: Dict) -> None:
        self._put("tags", {k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._put("metrics", [(k, float(v), ts, int(step)) for k, v in metrics.items()])

    def log_artifact(self, path: Path, subdir: Optional[str] = None) -> None:
        self._put("artifact", str(path), subdir)

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Wait up to ``timeout_s`` for the queue to drain; True if everything was sent."""
        if not self.enabled:
            return True
        deadline = time.time() + timeout_s
        with self._cv:
            while self._ops and time.time() < deadline:
                self._cv.wait(timeout=min(0.2, max(0.0, deadline - time.time())))
            return not self._ops

    @property
    def pending(self) -> int:
        return len(self._ops)

    def close(self, status: str = "FINISHED") -> bool:
        """Send what is queued (waiting at most ``close_timeout_s``); True if all was sent."""
        if not self.enabled:
            return True
        self._put("terminate", status, int(time.time() * 1000))
        done = self.flush(self.close_timeout_s)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if not done:
            warnings.warn(f"MLflow at {self.uri} did not take {self.pending} queued operations "
                          f"before the run ended; they are kept in {self.out_dir}: upload them "
                          f"with `dsq mlflow sync {self.out_dir}`", stacklevel=2)
        return done

    # ------------------------------------------------------------ consumer side (worker)
    def _worker(self) -> None:
        delay = 1.0
        while True:
            with self._cv:
                while not self._ops and not self._closing:
                    self._cv.wait()
                if self._closing and not self._ops:
                    return
            try:
                self._drain(raise_errors=True)
                delay = 1.0
            except Exception as e:  # unreachable, slow, or refusing: keep the ops, try later
                self.failures += 1
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"MLflow at {self.uri} is unreachable ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); "
                                  f"training continues, metrics are kept and sent when it is "
                                  f"back (or with `dsq mlflow sync {self.out_dir}`)",
                                  stacklevel=2)
                with self._cv:
                    if self._closing:
                        return
                    self._cv.wait(timeout=delay)
                delay = min(self.retry_max_s, delay * 2)

    def _store_lock(self):
        """An exclusive file lock for a SQLite store: MLflow's first-use table set-up is not
        safe when several jobs (an array of sweeps) open a new database at once."""
        import contextlib
        import fcntl

        if not self.uri.startswith("sqlite:///"):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def locked():
            with open(self.uri[len("sqlite:///"):] + ".lock", "w") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

        return locked()

    def _connect(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            with self._store_lock():
                client = MlflowClient(self.uri)
                client.search_experiments(max_results=1)  # creates the tables, under the lock
            self._client = client
        c = self._client
        if self.run_id is None:
            with self._store_lock():
                exp = c.get_experiment_by_name(self.experiment)
                if exp is None:
                    exp_id = c.create_experiment(self.experiment,
                                                 artifact_location=artifact_location(self.uri),
                                                 tags=EXPERIMENT_KIND)
                else:
                    exp_id = exp.experiment_id
                    for k, v in EXPERIMENT_KIND.items():
                        if k not in exp.tags:  # made by an older dsq, or by hand
                            c.set_experiment_tag(exp_id, k, v)
            self.experiment_id = exp_id
            self.run_id = c.create_run(exp_id, start_time=self.start_ms, run_name=self.run_name,
                                       tags=run_source_tags()).info.run_id
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._id_file.write_text(self.run_id)
        if self._logged_until is None:
            run = c.get_run(self.run_id)
            self.experiment_id = run.info.experiment_id
            if run.info.status != "RUNNING":
                c.update_run(self.run_id, status="RUNNING")
            self._logged_until = {key: max((m.step for m in c.get_metric_history(self.run_id, key)),
                                           default=-1) for key in run.data.metrics}
            self._params = dict(run.data.params)
        return c

    def _drain(self, raise_errors: bool) -> None:
        """Send queued operations in order; an op leaves the queue only once it was sent."""
        from mlflow.entities import Metric, Param

        c = self._connect()
        while True:
            with self._cv:
                if not self._ops:
                    self._cv.notify_all()
                    return
                kind, args = self._ops[0]
                # merge consecutive metric ops into one batch
                n = 1
                if kind == "metrics":
                    rows = list(args[0])
                    while n < len(self._ops) and self._ops[n][0] == "metrics" and len(rows) < 900:
                        rows += self._ops[n][1][0]
                        n += 1
            if kind == "params":
                new = [Param(k, v) for k, v in args[0].items() if k not in self._params]
                for i in range(0, len(new), 100):
                    c.log_batch(self.run_id, params=new[i:i + 100])
                self._params.update(args[0])
            elif kind == "tags":
                for k, v in args[0].items():
                    c.set_tag(self.run_id, k, v)
            elif kind == "metrics":
                fresh = [Metric(k, v, ts, s) for k, v, ts, s in rows
                         if s > self._logged_until.get(k, -1)]
                if fresh:
                    c.log_batch(self.run_id, metrics=fresh)
                for m in fresh:
                    self._logged_until[m.key] = max(self._logged_until.get(m.key, -1), m.step)
            elif kind == "artifact":
                c.log_artifact(self.run_id, args[0], args[1])
            elif kind == "terminate":
                c.set_terminated(self.run_id, status=args[0], end_time=args[1])
                self._logged_until = None  # a later resume re-reads the server's state
            with self._cv:
                for _ in range(n):
                    self._ops.popleft()


# ---------------------------------------------------------------- run records
def read_metrics_log(out_dir: Path, up_to_step: Optional[int] = None) -> List[Dict]:
    """Rows of ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    path = Path(out_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for ln in path.read_text().splitlines():
            try:
                row = json.loads(ln)
            except ValueError:
                continue
            if up_to_step is None or row["step"] <= up_to_step:
                rows.append(row)
    return rows


def plot_loss_curve(out_dir: Path) -> Optional[Path]:
    """``loss_curve.png`` of train and validation loss from metrics.jsonl."""
    rows = read_metrics_log(out_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, style in (("train/loss", dict(lw=1, alpha=0.8)), ("val/loss", dict(marker="o"))):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(out_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(out_dir) / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


RUN_ARTIFACTS = ("config.yaml", "ds_config.json", "summary.json", "loss_curve.png",
                 "tokenizer.model")


def sync_run(out_dir: Path, uri: Optional[str] = None, log: Callable = print) -> str:
    """Upload a run directory's record to MLflow (idempotent: nothing is logged twice)."""
    from dsq.config import flatten, load_config, to_dict

    out_dir = Path(out_dir)
    if not (out_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{out_dir} is not a dsq run directory (no config.yaml)")
    cfg = load_config([str(out_dir / "config.yaml")])
    tracker = Tracker(uri or cfg.tracking.uri, cfg.tracking.experiment, out_dir,
                      cfg.tracking.run_name, background=False)
    tracker.log_params(flatten(to_dict(cfg)))
    rows = read_metrics_log(out_dir)
    for row in rows:
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
    plot_loss_curve(out_dir)
    for name in RUN_ARTIFACTS:
        if (out_dir / name).is_file():
            tracker.log_artifact(out_dir / name)
    if (out_dir / "summary.json").is_file():
        tracker.close("FINISHED")
    log(f"synced {len(rows)} steps of {out_dir} to run {tracker.run_id} at {tracker.uri}")
    return tracker.run_id
