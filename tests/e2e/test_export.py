"""``dsq export`` / ``dsq generate`` / strict loading, on two tiny runs of 2 steps: TP=1 with an
untied LM head (one process) and TP=2 with tied embeddings (2 ranks).

The exported directory is loaded with ``transformers`` alone (AutoModelForCausalLM,
AutoTokenizer) and compared with dsq's own model: logits on the same ids, the loss of
``dsq eval`` on a text file, the tokenizer's ids and text.
"""

import json
import os
import shutil

import pytest
import torch

from tests.conftest import CORPUS, ROOT, dsq, launch

pytestmark = pytest.mark.slow
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VAL = CORPUS / "val" / "tempest_gut.txt"


def _args(out, cache, *extra):
    return ["configs/tiny.yaml", "train.steps=2", "train.ckpt_every=2", "train.eval_every=0",
            "optim.warmup_steps=1", f"train.out_dir={out}", f"data.cache_dir={cache}",
            "tracking.enabled=false", "train.progress=false", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("export")
    dsq("train", *_args(root / "tp1", data_cache))  # TP=1, untied (the tiny preset)
    launch(2, *_args(root / "tp2", data_cache, "parallel.tp=2", "model.tie_embeddings=true"))
    return root


@pytest.fixture(scope="module")
def exported(runs):
    from dsq.tools.export import export

    out = {}
    for name in ("tp1", "tp2"):
        out[name] = runs / f"hf-{name}"
        info = export(str(runs / name), str(out[name]))
        assert info["architecture"] == "GPT2LMHeadModel"
    return out


def _dsq_logits(run, ids, quantize=True):
    from dsq.parallel import shutdown
    from dsq.run.load import load_model

    try:
        model, cfg, _ = load_model(str(run), quantize=quantize)
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        with torch.no_grad():
            return model(ids, pos, None).float(), cfg
    finally:
        shutdown()


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_transformers_logits_equal_dsq(runs, exported, name):
    from transformers import GPT2LMHeadModel

    hf = _hf(exported[name])
    assert isinstance(hf, GPT2LMHeadModel)
    ids = torch.randint(0, 2048, (2, 128), generator=torch.Generator().manual_seed(1))
    ref, cfg = _dsq_logits(runs / name, ids)
    with torch.no_grad():
        got = hf(ids).logits.float()
    diff = (got - ref).abs().max().item()
    print(f"{name}: max abs logit diff {diff:.3g} (logits up to {ref.abs().max().item():.2f})")
    assert diff <= 1e-4
    assert ref.std() > 0.1  # a real comparison, not of zeros
    tied = hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert tied == bool(cfg.model.tie_embeddings) == (name == "tp2")
    c = hf.config
    assert c.activation_function == "gelu" and c.layer_norm_epsilon == 1e-5
    assert c.n_positions == cfg.model.seq_len and c.vocab_size == cfg.model.vocab_size


def test_transformers_loss_equals_dsq_eval(runs, exported, tmp_path):
    from transformers import AutoTokenizer

    from dsq.tools.evaluate import evaluate_checkpoint

    text = tmp_path / "val.txt"
    text.write_text(VAL.read_text()[:40_000])
    want = evaluate_checkpoint(str(runs / "tp2"), [str(text)], max_seqs=16)
    tok = AutoTokenizer.from_pretrained(exported["tp2"])
    hf = _hf(exported["tp2"])
    ids = tok.encode(text.read_text()) + [tok.eos_token_id]  # one document, as dsq reads it
    L = hf.config.n_positions
    n = min((len(ids) - 1) // L, 16)
    x = torch.tensor(ids[: n * L + 1])
    rows = torch.stack([x[i * L: i * L + L + 1] for i in range(n)])
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             rows[:, 1:].reshape(-1)).item()
    print(f"dsq eval loss {want['loss']:.6f}, transformers {loss:.6f}")
    assert want["tokens"] == rows[:, 1:].numel()
    assert loss == pytest.approx(want["loss"], abs=1e-5)


def test_exported_tokenizer_equals_sentencepiece(exported):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["tp1"])
    sp = spm.SentencePieceProcessor(model_file=str(exported["tp1"] / "tokenizer.model"))
    texts = [VAL.read_text()[:20_000], "  spaces   and\n\n\nnewlines\t\ttabs  ",
             "naïve café — ﬁne ＡＢＣ 日本語 🙂 \u2581", "</s> <unk> as text"]
    from dsq.data.tokenizer import decode, encode

    for t in texts:  # the ids dsq trains and evaluates on (dsq prepare's encoder)
        ids = encode(sp, t)
        assert tok.encode(t) == ids
        assert tok.decode(ids) == decode(sp, ids) == t
    assert tok.eos_token_id == sp.eos_id() and tok.unk_token_id == sp.unk_id()


def _copy_with_config(run, dst, *overrides):
    """A copy of ``run``'s latest checkpoint whose config.yaml has ``overrides`` applied."""
    from dsq.run import checkpoint
    from dsq.config import load_config, to_yaml

    src = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    shutil.copytree(src, dst)
    cfg = load_config([str(dst / "config.yaml")], list(overrides))
    (dst / "config.yaml").write_text(to_yaml(cfg))
    _reseal(dst)
    assert checkpoint.check(dst) is None
    return dst


def _reseal(tag_dir):
    from dsq.run import checkpoint

    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != checkpoint.MARKER}
    (tag_dir / checkpoint.MARKER).write_text(json.dumps({"step": 2, "files": files}))


def test_weight_quantized_export(runs, tmp_path):
    """A w8 (per-channel) checkpoint with a quantized LM head and tied embeddings (TP=2):
    quantized export equals dsq's quantized forward; trained export equals the fp model."""
    from dsq.tools.export import ExportError, export

    ck = _copy_with_config(runs / "tp2", tmp_path / "w8", "quant.weight=int8:channel",
                           "quant.lm_head=true")
    ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(2))
    q_ref, _ = _dsq_logits(ck, ids, quantize=True)
    fp_ref, _ = _dsq_logits(ck, ids, quantize=False)
    info = export(str(ck), str(tmp_path / "hq"))
    assert info["weights"] == "quantized" and not info["tied_embeddings"]  # quantized head
    with torch.no_grad():
        q = _hf(tmp_path / "hq")(ids).logits
    assert (q - q_ref).abs().max().item() <= 1e-4
    assert (q_ref - fp_ref).abs().max().item() > 1e-3  # quantization changes the model
    export(str(ck), str(tmp_path / "ht"), weights="trained")
    hf = _hf(tmp_path / "ht")
    with torch.no_grad():
        t = hf(ids).logits
    assert (t - fp_ref).abs().max().item() <= 1e-4
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    act = _copy_with_config(runs / "tp1", tmp_path / "a8", "quant.activation=int8:token")
    warned = []
    info = export(str(act), str(tmp_path / "ha"), warn=warned.append)
    assert len(warned) == 1 and "activation quantization" in warned[0] and info["notes"] == warned
    sr = _copy_with_config(runs / "tp1", tmp_path / "sr", "quant.weight=int8:channel:stochastic")
    with pytest.raises(ExportError, match="--weights trained"):
        export(str(sr), str(tmp_path / "hs"))
    assert not (tmp_path / "hs").exists() and not list(tmp_path.glob(".hs.*"))


def test_generate_is_deterministic_for_a_seed(runs):
    from dsq.tools.generate import generate

    a = generate(str(runs / "tp2"), "KING.\n", max_new_tokens=12, top_k=20, seed=7)
    b = generate(str(runs / "tp2"), "KING.\n", max_new_tokens=12, top_k=20, seed=7)
    c = generate(str(runs / "tp2"), "KING.\n", max_new_tokens=12, top_k=20, seed=8)
    assert a == b and len(a["ids"]) > 0 and a["text"].startswith("KING.\n")
    assert a["ids"] != c["ids"]
    g1 = generate(str(runs / "tp1"), "O", max_new_tokens=5, temperature=0)
    g2 = generate(str(runs / "tp1"), "O", max_new_tokens=5, temperature=0, seed=3)
    assert g1["ids"] == g2["ids"]  # greedy ignores the seed


def test_bad_path_and_corrupt_checkpoint_fail_with_one_message(runs, tmp_path):
    from dsq.run.load import CheckpointError
    from dsq.tools.export import ExportError, export
    from dsq.tools.generate import generate

    res = dsq("export", str(tmp_path / "nothing"), str(tmp_path / "o"), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("dsq: error:") and "does not exist" in res.stderr
    with pytest.raises(CheckpointError, match="does not exist"):
        generate(str(tmp_path / "nothing"), "x")
    bad = _copy_with_config(runs / "tp1", tmp_path / "bad")
    shard = bad / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size: only loading can tell
    res = dsq("export", str(bad), str(tmp_path / "o"), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"dsq: error: checkpoint file {shard} is corrupt")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    with pytest.raises(CheckpointError, match="corrupt"):
        generate(str(bad), "x")
    with pytest.raises(ExportError, match="already exists"):
        export(str(runs / "tp1"), str(runs / "hf-tp1"))


def test_eval_loads_weights_strictly(runs, tmp_path):
    from dsq.run.load import CheckpointError, merged_state_dict
    from dsq.tools.evaluate import evaluate_checkpoint

    ck = _copy_with_config(runs / "tp2", tmp_path / "ck")
    shards = sorted(ck.glob("mp_rank_*_model_states.pt"))
    ref = {k: v for k, v in _full_reference().items()}
    cases = ((lambda m: m.pop("decoder.final_layernorm.bias"), "final_layernorm.bias"),
             (lambda m: m.__setitem__("decoder.extra.weight", torch.zeros(2)),
              "decoder.extra.weight"))
    for i, (edit, match) in enumerate(cases):
        for f in shards:
            state = torch.load(f, weights_only=False)
            edit(state["module"])
            torch.save(state, tmp_path / f.name)
        bad = tmp_path / f"case{i}"
        shutil.copytree(ck, bad)
        for f in shards:
            shutil.copy(tmp_path / f.name, bad / f.name)
        _reseal(bad)
        with pytest.raises(CheckpointError, match=match):
            merged_state_dict(bad, ref)
    merged = merged_state_dict(ck, ref)  # the untouched copy loads, _extra_state included
    assert set(merged) == set(ref)
    with pytest.raises(CheckpointError, match="decoder.extra.weight"):  # what dsq eval reports
        evaluate_checkpoint(str(bad), [str(VAL)], max_seqs=1)


def _full_reference():
    """State dict of a TP=1 tied tiny model (the keys and full shapes a TP=2 run must merge to)."""
    from dsq.config import load_config
    from dsq.parallel import DistEnv, init_distributed, shutdown
    from dsq.models.gpt import build_gpt

    cfg = load_config([str(ROOT / "configs/tiny.yaml")], ["model.tie_embeddings=true"])
    init_distributed(DistEnv(0, 1, 0), tp=1)
    try:
        return build_gpt(cfg.model, "fp32", seed=0).state_dict()
    finally:
        shutdown()


def test_export_without_transformers_says_how_to_install(runs, monkeypatch, tmp_path):
    import builtins

    from dsq.tools import export as ex

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.split(".")[0] == "transformers":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ex.ExportError, match=r"pip install 'dsq\[export\]'"):
        ex.export(str(runs / "tp1"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
