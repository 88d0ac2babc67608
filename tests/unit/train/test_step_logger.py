"""Which steps reach MLflow: every ``train.log_every`` steps, the last step, evaluations, SQNR
measurements and bad steps; ``metrics.jsonl`` gets every step."""

import json
from types import SimpleNamespace

from dsq.train.components import StepLogger


class Tracker:
    def __init__(self):
        self.steps = []

    def log_metrics(self, metrics, step):
        self.steps.append(step)


def test_mlflow_cadence_keeps_last_step_evals_sqnr_and_bad_steps(tmp_path):
    cfg = SimpleNamespace(log_every=10, steps=25, spike_factor=1.25, spike_window=5,
                          progress=False)
    tracker = Tracker()
    log = StepLogger(tmp_path, tracker, cfg, start_step=0, enabled=True, vocab_size=100)
    for step in range(1, 26):
        metrics = {"train/loss": 1.0}
        if step == 7:
            metrics["val/loss"] = 2.0
        if step == 13:
            metrics["sqnr_db/fc1/grad"] = 30.0
        log.log(step, metrics, force=step == 17)
    assert tracker.steps == [7, 10, 13, 17, 20, 25]
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26))
