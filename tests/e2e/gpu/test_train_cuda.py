"""``dsq train`` of the tiny preset on one GPU: the bf16 baseline and the full int8 recipe."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import launch, read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _train(tmp_path, data_cache, *extra):
    out = tmp_path / "run"
    res = launch(1, "configs/tiny.yaml", "train.steps=12", "train.eval_every=0",
                 "train.ckpt_every=6", "train.progress=false", "tracking.enabled=false",
                 "deepspeed.precision=bf16", f"train.out_dir={out}",
                 f"data.cache_dir={data_cache}", *extra)
    return json.loads((out / "summary.json").read_text()), read_metrics(out), res


def _learned(s, losses):
    """Validation well below what an untrained model scores: its first loss and the uniform
    guess ln(V) (7.62 nats), by 0.5 nats (a CPU fp32 run of these 12 steps: 0.92 below)."""
    assert s["val_loss"] < min(losses[1], math.log(s["vocab_size"])) - 0.5, (s, losses)


def test_train_bf16_on_one_gpu(tmp_path, data_cache):
    s, losses, _ = _train(tmp_path, data_cache)
    assert s["device"] == "cuda" and s["world_size"] == 1
    assert s["peak_gpu_bytes"][0] > 1 << 20
    assert losses[12] < losses[1] - 0.5, losses
    _learned(s, losses)


def test_train_int8_recipe_with_8bit_states_on_one_gpu(tmp_path, data_cache):
    s, losses, res = _train(tmp_path, data_cache, "configs/recipes/w8a8g8.yaml",
                            "optim.name=qadamw", "quant.compute=int8")
    assert "on CUDA: torch._int_mm" in res.stderr + res.stdout
    assert s["device"] == "cuda" and s["quantized_layers"] > 0
    assert s["peak_gpu_bytes"][0] > 1 << 20
    assert losses[12] < losses[1] - 0.5, losses
    _learned(s, losses)
