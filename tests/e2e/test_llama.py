"""llama-tiny end to end: it trains (one process, the loss falls), TP=2 gives the losses of
TP=1 through the launcher (2 ranks each; w8a8g8 at TP=2 vs TP=1 is compared in process by
tests/unit/models/test_llama_tp.py), and the TP=2 run exported as ``LlamaForCausalLM``
computes dsq's logits (the gated fc1 and GQA's QKV merged from their shards)."""

import os

import pytest
import torch

from tests.conftest import dsq, launch, read_metrics

pytestmark = pytest.mark.slow
os.environ["HF_HUB_OFFLINE"] = "1"


def _args(out, cache, *extra, recipe="baseline"):
    return ["configs/tiny.yaml", f"configs/recipes/{recipe}.yaml", "model.preset=llama-tiny", "train.eval_every=0",
            f"train.out_dir={out}", f"data.cache_dir={cache}", "tracking.enabled=false",
            "train.progress=false", *extra]


def test_llama_tiny_trains(tmp_path, data_cache):
    out = tmp_path / "run"
    dsq("train", *_args(out, data_cache, "train.steps=30", "train.ckpt_every=0"))
    loss = read_metrics(out)
    first, last = loss[1], sum(loss[s] for s in range(26, 31)) / 5
    print(f"llama-tiny: loss {first:.3f} at step 1, {last:.3f} over steps 26-30")
    assert first > 7.0 and last < first - 1.5


def test_llama_tiny_tp2_equals_tp1_and_exports(tmp_path, data_cache):
    recipe = "baseline"
    runs = {}
    for tp in (1, 2):
        runs[tp] = tmp_path / f"tp{tp}"
        launch(2, *_args(runs[tp], data_cache, "train.steps=6", f"parallel.tp={tp}",
                         "train.ckpt_every=6", recipe=recipe))
    a, b = read_metrics(runs[1]), read_metrics(runs[2])
    tol = 2e-5  # fp32 reduction order only
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], abs=tol), (recipe, step)
    assert min(abs(a[s] - a[s + 1]) for s in range(1, 6)) > 10 * tol
    from dsq.parallel import shutdown
    from dsq.run.load import load_model
    from dsq.tools.export import export
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    info = export(str(runs[2]), str(tmp_path / "hf"))
    assert info["architecture"] == "LlamaForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    ids = torch.randint(0, 2048, (2, 128), generator=torch.Generator().manual_seed(1))
    try:
        model, _, _ = load_model(str(runs[2]))
        with torch.no_grad():
            ref = model(ids, torch.arange(128).expand(2, -1), None).float()
    finally:
        shutdown()
    with torch.no_grad():
        got = hf(ids).logits.float()
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
