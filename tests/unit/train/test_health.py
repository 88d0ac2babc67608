"""The divergence policy and the spike guard as units: bad steps counted and reported, a run of
them stopped with one message, counts carried through a checkpoint, the spike guard from the
first step; pruning that keeps the newest finite checkpoint; summary.json as strict JSON."""

from __future__ import annotations

import json
import math

import pytest

from dsq.config import load_config
from dsq.run import checkpoint
from dsq.train.health import Diverged, StepHealth, hints
from dsq.train.progress import SpikeGuard


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_bad_steps_are_counted_and_a_run_of_them_stops():
    h = StepHealth(3, hints(load_config([], ["optim.lr=1e4"])))
    assert h.check(1, 7.6, 1.2, applied=True) is None and h.healthy
    warn = h.check(2, 9.1, math.inf, applied=False)
    assert warn.startswith("step 2: gradient norm inf, DeepSpeed skipped the update (1 bad")
    assert not h.healthy and not h.diverged
    assert h.check(3, 8.0, 0.9, applied=True) is None  # a good step ends the run of bad ones
    assert h.check(4, math.nan, None, applied=True) == (
        "step 4: loss nan (1 bad in a row; the run stops at train.max_skipped_steps=3)")
    h.check(5, 50.0, math.inf, applied=False)
    h.check(6, 50.0, 2.0, applied=False)
    assert h.diverged and (h.nonfinite, h.skipped, h.streak) == (3, 3, 3)
    assert h.metrics() == {"train/nonfinite_steps": 3, "train/skipped_steps": 3}
    with pytest.raises(Diverged) as e:
        h.raise_diverged(6)
    msg = str(e.value)
    assert e.value.step == 6 and "\n" not in msg
    assert msg.startswith("training diverged at step 6: steps 4-6 (train.max_skipped_steps=3 "
                          "in a row)") and "the last good step was 3" in msg
    assert "a lower optim.lr (now 10000)" in msg and "rerun the same command" in msg
    assert "bf16" not in msg
    assert "deepspeed.precision=fp32" in hints(load_config([], [
        "deepspeed.precision=bf16", "deepspeed.zero_stage=1"]))


def test_counts_and_a_run_of_bad_steps_go_on_across_a_resume():
    h = StepHealth(4, "")
    for step, gn in ((1, 1.0), (2, math.inf), (3, math.inf)):
        h.check(step, 7.0, gn, applied=gn == 1.0)
    again = StepHealth(4, "")
    again.load(json.loads(json.dumps(h.state())), 3)
    assert again.state() == h.state() and again.streak == 2 and again.last_good == 1
    fresh = StepHealth(4, "")
    fresh.load(None, 40)  # a checkpoint from before the policy: a good step
    assert fresh.healthy and fresh.last_good == 40 and fresh.nonfinite == 0


def test_spike_guard_bounds_the_first_steps_by_the_uniform_guess():
    bound = math.log(2048)
    g = SpikeGuard(factor=1.25, window=10, bound=bound)
    flagged = {s: g.check(s, x) for s, x in enumerate([7.7, 50.0, 60.0, 7.4, 7.2], 1)}
    assert [s for s, r in flagged.items() if r] == [2, 3] == g.spikes
    assert flagged[2] == pytest.approx(50.0 / bound) and not g.by_median
    assert list(g.recent) == [7.7, 7.4, 7.2]  # a blown-up loss never becomes the median
    for s, x in enumerate([7.0, 6.9, 6.8], 6):
        assert g.check(s, x) is None
    assert g.check(9, 9.5) == pytest.approx(9.5 / 7.1) and g.by_median  # median of 6 losses
    assert g.check(10, math.nan) is None and len(g.recent) == 7
    # a run that blows up at once is flagged on every step, never against its own median
    g = SpikeGuard(factor=1.25, window=20, bound=bound)
    assert all(g.check(s, 40.0 + s) for s in range(1, 30))
    assert SpikeGuard(factor=1.25, window=2, bound=bound).min_history == 2


def _tag(root, step, finite=True):
    tag = root / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "model.pt").write_bytes(b"x" * 10)
    (tag / checkpoint.MARKER).write_text(json.dumps(
        {"step": step, "files": {"model.pt": 10}, "finite": finite}))


def test_pruning_keeps_the_newest_finite_checkpoint(tmp_path):
    for step, finite in ((2, True), (4, True), (6, False), (8, False), (10, False)):
        _tag(tmp_path, step, finite)
    checkpoint._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000004", "step_00000008", "step_00000010"]
    checkpoint._prune(tmp_path, keep=3)  # the finite one is among the newest 3 anyway
    assert len(list(tmp_path.iterdir())) == 3


def test_summary_json_is_strict_json_and_a_run_without_steps_reports_its_last_loss(tmp_path):
    from dsq.train.record import RunRecord, json_safe

    assert json_safe({"a": [1.0, math.nan], "b": {"c": -math.inf}, "d": "x"}) == {
        "a": [1.0, None], "b": {"c": None}, "d": "x"}
    cfg = load_config([], ["tracking.enabled=false"])
    rows = [{"step": 7, "train/loss": 5.5}, {"step": 8, "train/loss": 5.25},
            {"step": 8, "val/loss": 5.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = RunRecord(cfg, tmp_path, enabled=True, log=lambda *a: None)
    summary = {"final_step": 8, "train_loss": math.nan, "val_loss": 5.3, "val_ppl": math.inf,
               "tokens_per_s": None, "nonfinite_steps": 0, "skipped_steps": 0,
               "quant_sqnr_db": {"fc1": math.nan}}
    rec.finish(summary, [1], [0], [8], 1, "cpu")
    got = _strict((tmp_path / "summary.json").read_text())
    assert got["train_loss"] == 5.25 and got["val_ppl"] is None and got["tokens_per_s"] is None
    assert got["quant_sqnr_db"] == {"fc1": None}
    rec.print_result(got)  # n/a where a value is missing, no formatting error
    rec.close("FINISHED")


def test_the_last_lines_say_so_when_mlflow_never_created_the_run(tmp_path, capsys):
    from dsq.train.record import RunRecord

    cfg = load_config([], ["tracking.enabled=false"])
    rec = RunRecord(cfg, tmp_path, enabled=True, log=lambda *a: None)
    cfg.tracking.enabled = True  # tracked, but the store never answered
    rec.print_result({"final_step": 3, "train_loss": 7.5, "val_loss": 7.4, "val_ppl": 1712.5,
                      "tokens_per_s": 2.0e4, "mlflow_run_id": None})
    out = capsys.readouterr().out
    assert "run None" not in out and "view it" not in out
    assert "MLflow: no run was created in" in out and f"dsq mlflow sync {tmp_path}" in out
