"""llama-tiny end to end: it trains (one process, the loss falls) and resumes after a stop
signal with the losses of the uninterrupted run, bit for bit; TP=2 gives the losses of TP=1
through the launcher (2 ranks each; w8a8g8 at TP=2 vs TP=1 is compared in process by
tests/unit/models/test_llama_tp.py), and the TP=2 run exported as ``LlamaForCausalLM`` computes
dsq's logits (the gated fc1 and GQA's QKV merged from their shards) and ``dsq eval``'s loss on a
held-out text. ``configs/llama-1b-fineweb.yaml`` with 2 of its 22 layers trains a step here."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import CORPUS, ROOT, dsq, launch, read_metrics

pytestmark = pytest.mark.slow
os.environ["HF_HUB_OFFLINE"] = "1"
STEPS = 30


def _args(out, cache, *extra, recipe="baseline"):
    return ["configs/tiny.yaml", f"configs/recipes/{recipe}.yaml", "model.preset=llama-tiny", "train.eval_every=0",
            f"train.out_dir={out}", f"data.cache_dir={cache}", "tracking.enabled=false",
            "train.progress=false", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """The uninterrupted one-process run: STEPS steps, no checkpoint before the end."""
    out = tmp_path_factory.mktemp("llama") / "run"
    args = _args(out, data_cache, f"train.steps={STEPS}", "train.ckpt_every=0")
    dsq("train", *args)
    return {"args": args, "loss": read_metrics(out)}


def test_llama_tiny_trains(trained):
    loss = trained["loss"]
    first, last = loss[1], sum(loss[s] for s in range(26, 31)) / 5
    print(f"llama-tiny: loss {first:.3f} at step 1, {last:.3f} over steps 26-30")
    assert first > 7.0 and last < first - 1.5


def test_llama_tiny_resumes_a_stopped_run_bit_for_bit(trained, tmp_path):
    """SIGTERM mid-run: the run checkpoints at the next step boundary and exits 75; the same
    command resumes there, and every step's loss equals the uninterrupted run's exactly."""
    from dsq.train.stop import PREEMPTED_EXIT_CODE

    out = tmp_path / "run"
    args = [a if not a.startswith("train.out_dir=") else f"train.out_dir={out}"
            for a in trained["args"]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "dsq.cli", "train", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    stopped = max(read_metrics(out))
    assert 3 <= stopped < STEPS, stopped
    res = dsq("train", *args)
    assert f"at step {stopped}" in res.stdout, res.stdout[-2000:]
    got = read_metrics(out)
    print(f"stopped at step {stopped}; step {STEPS} loss {got[STEPS]!r} vs "
          f"{trained['loss'][STEPS]!r}")
    assert got == trained["loss"]  # every step, bit for bit


def test_llama_1b_with_two_layers_trains_a_step(tmp_path, data_cache):
    """The 32-rank config, its 22 layers cut to 2, its vocabulary to the shipped corpus's 2048
    pieces and its batch to one 128-token sequence: one step in one process (bf16, ZeRO-2)."""
    from dsq.config import load_config
    from dsq.tools.memory import parameters

    out = tmp_path / "run"
    over = ["model.num_layers=2", "model.seq_len=128", "model.vocab_size=2048",
            f"data.train={CORPUS / 'train'}", f"data.val={CORPUS / 'val'}",
            "data.val_fraction=0", "train.micro_batch=1", "train.global_batch=1",
            "train.steps=1", "train.eval_every=0", "train.eval_samples=1", "train.ckpt_every=0",
            f"train.out_dir={out}", f"data.cache_dir={data_cache}", "tracking.enabled=false",
            "train.progress=false"]
    dsq("train", "configs/llama-1b-fineweb.yaml", *over)
    summary = json.loads((out / "summary.json").read_text())
    cfg = load_config([str(ROOT / "configs/llama-1b-fineweb.yaml")], over)
    n = sum(math.prod(s) for _, s in parameters(cfg.model))
    layer = 2 * 2048 + (32 + 2 * 4) * 64 * 2048 + 2048 * 2048 + 3 * 5632 * 2048
    assert summary["params"] == n == 2 * layer + 2 * 2048 * 2048 + 2048 == 96_479_232
    loss = read_metrics(out)[1]
    print(f"llama-1b, 2 layers: step 1 loss {loss:.4f} (ln 2048 = {math.log(2048):.4f})")
    # at initialisation the logits have a std of about 0.02 sqrt(2048) = 0.9 (unit-RMS hidden
    # states through the 0.02-std head): a loss of about ln 2048 + 0.9^2 / 2
    assert math.log(2048) < loss < math.log(2048) + 1.0


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
    _hf_loss_equals_dsq_eval(runs[2], tmp_path / "hf", hf, tmp_path / "heldout.txt")


def _hf_loss_equals_dsq_eval(run, exported, hf, text):
    """The exported model and tokenizer alone, on the windows ``dsq eval`` reads from a text
    the run never trained on (The Tempest): the same tokens and the same mean loss."""
    from transformers import AutoTokenizer

    from dsq.tools.evaluate import evaluate_checkpoint

    text.write_text((CORPUS / "val" / "tempest_gut.txt").read_text()[:40_000])
    want = evaluate_checkpoint(str(run), [str(text)], max_seqs=16)
    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok.encode(text.read_text()) + [tok.eos_token_id]  # one document, as dsq reads it
    L = hf.config.max_position_embeddings
    n = min((len(ids) - 1) // L, 16)
    x = torch.tensor(ids[: n * L + 1])
    rows = torch.stack([x[i * L: i * L + L + 1] for i in range(n)])
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             rows[:, 1:].reshape(-1)).item()
    print(f"dsq eval loss {want['loss']:.7f}, transformers {loss:.7f} on {n} windows of {L}")
    assert want["tokens"] == rows[:, 1:].numel() == 16 * L
    assert loss == pytest.approx(want["loss"], rel=1e-5)
