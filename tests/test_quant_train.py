"""Quantized training end to end: TP=2 equals TP=1, SQNR reaches summary.json and MLflow."""

import json

import pytest

from .conftest import launch, read_metrics

pytestmark = pytest.mark.slow


def _run(tmp_path, cache, name, *extra):
    out = tmp_path / name
    launch(2, "configs/tiny.yaml", "configs/recipes/w8a8g8.yaml", "train.steps=6",
           "train.eval_every=3", "train.ckpt_every=0", f"train.out_dir={out}",
           f"data.cache_dir={cache}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
           "tracking.experiment=quant", "train.progress=false", *extra)
    return out


def test_w8a8g8_tp2_equals_tp1_and_reports_sqnr(tmp_path, data_cache):
    from mlflow.tracking import MlflowClient

    tp1 = _run(tmp_path, data_cache, "tp1")
    tp2 = _run(tmp_path, data_cache, "tp2", "parallel.tp=2")
    a, b = read_metrics(tp1), read_metrics(tp2)
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], abs=3e-5), step
    s = json.loads((tp2 / "summary.json").read_text())
    assert s["quantized_layers"] == 2 * 4 + 1  # qkv, proj, fc1, fc2 per layer + LM head
    sq = s["quant_sqnr_db"]
    kinds = {f"{k}/{op}" for k in ("qkv", "proj", "fc1", "fc2", "lm_head")
             for op in ("weight", "activation", "grad")}
    assert set(sq) == kinds
    # 8-bit symmetric: ~40 dB for Gaussian-like weights; nothing near the 4-bit range
    assert all(28 < v < 60 for v in sq.values()), sq
    assert json.loads((tp1 / "summary.json").read_text())["quant_sqnr_db"]["fc1/weight"] == \
        pytest.approx(sq["fc1/weight"], abs=0.05)
    c = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = c.get_run(s["mlflow_run_id"])
    assert run.data.tags["dsq.recipe"] == "w8a8g8"
    steps = {m.step for m in c.get_metric_history(run.info.run_id, "sqnr_db/fc1/grad")}
    assert steps == {3, 6}
