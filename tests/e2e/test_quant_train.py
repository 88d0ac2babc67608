"""Quantized training end to end: TP=2 equals TP=1, SQNR reaches summary.json and MLflow."""

import json
import shutil

import pytest

from tests.conftest import dsq, launch, read_metrics

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
    # fp32 reduction order differs between layouts, and a difference of one ulp can move a
    # value across a rounding boundary of the 8-bit grid: the same quantized model up to a few
    # code flips, far below the change of the loss from one step to the next
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], abs=5e-4), step
    assert min(abs(a[s] - a[s + 1]) for s in range(1, 6)) > 5e-3
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


def test_qadamw_state_bytes_and_resume_on_fewer_ranks(tmp_path, data_cache):
    """8-bit states under ZeRO-2 on 2 ranks: per-rank bytes match the formula; a checkpoint
    of 2 ranks resharded to 1 continues with the same losses in a single process."""
    from dsq.config import load_config

    args = ["configs/tiny.yaml", "configs/recipes/optim/m8v8.yaml", "train.steps=12",
            "train.ckpt_every=6", "train.eval_every=0", f"data.cache_dir={data_cache}",
            "tracking.enabled=false", "train.progress=false"]
    ref = tmp_path / "ref"
    launch(2, *args, f"train.out_dir={ref}")
    s = json.loads((ref / "summary.json").read_text())
    # formula: 2 B per quantized param (linear weights) + 8 B per other param, halved by
    # ZeRO-2 over 2 ranks, plus one fp32 scale per 256-element block for m and for v
    cfg = load_config(["configs/tiny.yaml"])
    m, L = cfg.model, cfg.model.num_layers
    h, f, v = m.hidden_size, m.ffn_hidden_size, m.vocab_size
    linear = L * (3 * h * h + h * h + 2 * h * f) + v * h  # qkv, proj, fc1, fc2 + LM head
    other = s["params"] - linear
    expect = (2 * linear + 8 * other + 2 * 4 * linear / 256) / 2
    for b in s["optimizer_state_bytes"]:
        assert abs(b - expect) / expect < 0.05, (b, expect)
    assert sum(s["optimizer_state_bytes"]) < 0.5 * 8 * s["params"]
    # resume the step-6 checkpoint with one rank
    one = tmp_path / "one"
    shutil.copytree(ref, one, ignore=shutil.ignore_patterns("summary.json", "mlflow_run_id"))
    ckpt = one / "checkpoints"
    (ckpt / "latest").write_text("step_00000006")
    shutil.rmtree(ckpt / "step_00000012")
    dsq("ckpt", "reshard", str(ckpt), "--dp", "1")
    res = dsq("train", *args, f"train.out_dir={one}")
    assert "at step 6" in res.stdout
    a, b = read_metrics(ref), read_metrics(one)
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], abs=1e-4), step


def test_int8_training_tp2_equals_tp1_and_reports(tmp_path, data_cache):
    """Real 2-rank runs: the same losses at TP=1 and TP=2; the start-up line names fallbacks."""
    def train(name, *extra):
        out = tmp_path / name
        res = launch(2, "configs/tiny.yaml", "configs/recipes/w8a8g8.yaml", "train.steps=4",
                     "train.eval_every=0", "train.ckpt_every=0", f"train.out_dir={out}",
                     f"data.cache_dir={data_cache}", "tracking.enabled=false",
                     "train.progress=false", "quant.compute=int8", *extra)
        return read_metrics(out), res.stdout + res.stderr

    tp1, log1 = train("tp1")
    tp2, _ = train("tp2", "parallel.tp=2")
    both, log3 = train("both", "quant.grad_gemms=both")
    # TP changes the float summation order (row-parallel partial outputs, dX all-reduce, DP vs
    # accumulation), and a last-bit change can move a code by one step: compute=simulate shows
    # the same ~1e-4 loss differences between TP=1 and TP=2 here (the layers themselves match
    # to 1e-5, and a missing statistics reduction is caught there: test_int8_tp2_equals_tp1)
    for step in range(1, 5):
        assert tp2[step] == pytest.approx(tp1[step], abs=3e-4), step
    # grad_gemms=weight: dX keeps the full-precision G by design, said once, by rank 0; a
    # warning only on a CPU where int8 does not pay
    from dsq.quant.cpu_gemm import int8_outlook
    prefix = "dsq: quant.compute=int8" if int8_outlook()[0] else "dsq: warning: quant.compute=int8"
    assert log1.count(prefix) == 1 and log1.count("quant.compute=int8 for") == 1
    assert "input grad dX = G W because grad is not quantized for this GEMM" in log1
    assert log3.count(prefix) == 1
    assert abs(both[4] - tp1[4]) < 0.05  # both recipes train alike over 4 steps
