"""Rank 0's record of a run: the files of its run directory that tell what happened
(``config_changes.jsonl``, ``metrics.jsonl`` trimmed on resume, ``summary.json``, the loss
plot) and its MLflow run (params, tags, artifacts, system metrics). On other ranks every
method is a no-op."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

from dsq.config import Config, flatten, to_dict
from dsq.run.info import peak_gpu_bytes, peak_rss_bytes, run_provenance
from dsq.tracking import (
    RUN_ARTIFACTS,
    Tracker,
    normalize_uri,
    plot_loss_curve,
    read_metrics_log,
    ui_command,
)


def resource_metrics(optimizer, device) -> Dict[str, float]:
    """Peak memory (host, and GPU on CUDA) and optimizer state bytes, max over ranks
    (collective: all ranks call)."""
    from dsq.optim import optimizer_state_bytes
    from dsq.parallel import all_reduce_host

    rss, gpu, state = all_reduce_host(
        [peak_rss_bytes(), peak_gpu_bytes(device), optimizer_state_bytes(optimizer)], "max")
    out = {"mem/peak_rss_bytes": rss, "optim/state_bytes": state}
    if device.type == "cuda":
        out["mem/peak_gpu_bytes"] = gpu
    return out


def json_safe(obj):
    """``obj`` with every non-finite float as None: what ``json.dumps(allow_nan=False)`` takes
    (NaN and Infinity are not JSON; readers other than Python's refuse them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class RunRecord:
    def __init__(self, cfg: Config, out_dir: Path, enabled: bool, log=print):
        self.cfg, self.out_dir, self.enabled, self.log = cfg, out_dir, enabled, log
        self.tracker = Tracker.from_config(cfg, out_dir, enabled=enabled)
        self._sysmon = None
        self.close_s: Optional[float] = None

    def record_changes(self, tag: Optional[str], changes: List) -> None:
        """Log the allowed config changes of a resume from ``tag`` and append them to
        ``config_changes.jsonl`` (MLflow gets them as the tag ``dsq.config_changes``)."""
        if not (self.enabled and changes):
            return
        text = ", ".join(f"{k} {a} -> {b}" for k, a, b in changes)
        self.log(f"resuming {tag} with changed settings: {text}")
        with open(self.out_dir / "config_changes.jsonl", "a") as fh:
            fh.write(json.dumps({"resume_from": tag, "time": time.time(),
                                 "changes": [[k, a, b] for k, a, b in changes]},
                                default=str) + "\n")

    def start(self, step: int, kernels: Dict[str, str], tp: int, dp: int) -> None:
        """Trim ``metrics.jsonl`` to ``step`` (a resume computes the rest again), send MLflow
        what it has not seen, and the run's params, tags and config artifacts."""
        if not self.enabled:
            return
        cfg, t = self.cfg, self.tracker
        rows = read_metrics_log(self.out_dir, up_to_step=step)
        (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for row in rows:
            t.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
        t.log_params({**flatten(to_dict(cfg)), **run_provenance(), **kernels})
        t.set_tags({"dsq.recipe": cfg.tracking.recipe, "dsq.precision": cfg.deepspeed.precision,
                    "dsq.layout": f"tp{tp}xdp{dp}",
                    "dsq.zero_stage": cfg.deepspeed.zero_stage, "dsq.preset": cfg.model.preset,
                    "dsq.arch": cfg.model.arch,
                    "dsq.slurm_job_id": os.environ.get("SLURM_JOB_ID", "none")})
        changes = self.out_dir / "config_changes.jsonl"
        if changes.is_file():
            t.set_tags({"dsq.config_changes": changes.read_text()[-5000:]})
        for name in ("config.yaml", "ds_config.json", "tokenizer.model"):
            t.log_artifact(self.out_dir / name)
        if cfg.tracking.system_metrics and t.enabled and t.flush(5.0) and t.run_id:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._sysmon = SystemMetricsMonitor(t.run_id, sampling_interval=10,
                                                    resume_logging=True, tracking_uri=t.uri)
                self._sysmon.start()
            except Exception:  # optional: psutil/pynvml missing or an old MLflow
                self._sysmon = None

    def await_run_id(self) -> None:
        """Wait briefly for the MLflow run id (it comes with the first contact)."""
        if self.enabled and self.tracker.enabled and self.tracker.run_id is None:
            self.tracker.flush(5.0)

    def finish(self, summary: Dict, rss: List[int], gpu: List[int], state_bytes: List[int],
               params: int, device_type: str) -> None:
        """Write ``summary.json`` (valid JSON: a value that is not finite is null) and the loss
        plot; send the summary metrics and artifacts. A run that took no step here (resumed
        at its last step) reports the training loss ``metrics.jsonl`` holds for that step."""
        if not self.enabled:
            return
        if not math.isfinite(summary["train_loss"]):
            rows = [r for r in read_metrics_log(self.out_dir, up_to_step=summary["final_step"])
                    if "train/loss" in r]
            if rows and rows[-1]["step"] == summary["final_step"]:
                summary["train_loss"] = rows[-1]["train/loss"]
        summary.update(json_safe(summary))
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        metrics = {
            "summary/tokens_per_s": summary["tokens_per_s"],
            "summary/tokens_per_s_per_device": summary.get("tokens_per_s_per_device"),
            "summary/mfu": summary.get("mfu"), "summary/peak_rss_bytes": max(rss),
            **({"summary/peak_gpu_bytes": max(gpu)} if device_type == "cuda" else {}),
            "summary/optimizer_state_bytes": max(state_bytes),
            "summary/optimizer_state_bytes_per_param": sum(state_bytes) / params,
            "summary/train_loss": summary["train_loss"], "summary/val_loss": summary["val_loss"],
            "summary/val_ppl": summary["val_ppl"],
            "summary/nonfinite_steps": summary["nonfinite_steps"],
            "summary/skipped_steps": summary["skipped_steps"]}
        self.tracker.log_metrics({k: v for k, v in metrics.items() if v is not None},
                                 summary["final_step"])
        plot_loss_curve(self.out_dir)
        for name in RUN_ARTIFACTS:
            if name in ("summary.json", "loss_curve.png") and (self.out_dir / name).is_file():
                self.tracker.log_artifact(self.out_dir / name)

    def print_result(self, summary: Dict) -> None:
        """The last lines of a run: its numbers, where they are, and how to see them."""
        if not self.enabled:
            return
        num = lambda key, fmt: "n/a" if summary[key] is None else format(summary[key], fmt)
        print(f"\ndone: step {summary['final_step']}  train loss {num('train_loss', '.4f')}  "
              f"val loss {num('val_loss', '.4f')}  val ppl {num('val_ppl', '.2f')}  "
              f"{num('tokens_per_s', ',.0f')} tokens/s")
        print(f"results: {self.out_dir / 'summary.json'}")
        if self.cfg.tracking.enabled:
            uri = normalize_uri(self.cfg.tracking.uri)
            if summary["mlflow_run_id"] is None:  # the store never answered: nothing to view
                print(f"MLflow: no run was created in {uri}; the run's metrics are kept in "
                      f"{self.out_dir}: send them with `dsq mlflow sync {self.out_dir}`")
                return
            print(f"MLflow: experiment '{self.cfg.tracking.experiment}', run "
                  f"{summary['mlflow_run_id']} in {uri}\n  view it: "
                  f"{ui_command(uri, self.tracker.experiment_id)}")

    def close(self, status: str) -> None:
        """End the MLflow run with ``status`` (idempotent); says so when operations are left."""
        if self._sysmon is not None:
            self._sysmon.finish()
            self._sysmon = None
        if not self.enabled or self.close_s is not None:
            return
        t0 = time.perf_counter()
        sent = self.tracker.close(status)
        self.close_s = time.perf_counter() - t0
        if not sent:
            self.log(f"MLflow: {self.tracker.pending} operations not sent; later run "
                     f"`dsq mlflow sync {self.out_dir}`")
