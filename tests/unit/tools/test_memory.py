"""The memory estimate (:mod:`dsq.tools.memory`): a count by hand for llama-tiny, and each part
against the real thing: the parameters ``build_gpt`` creates, the state QAdamW and AdamW hold
after a step, and the tensors autograd keeps for backward after a forward, byte for byte (on
this CPU, whose composite RMSNorm keeps one tensor more than a GPU's fused kernel)."""

from __future__ import annotations


import pytest
import torch

from dsq.config import load_config

from tests.conftest import ROOT

TINY = str(ROOT / "configs/tiny.yaml")
W8A8G8 = str(ROOT / "configs/recipes/w8a8g8.yaml")


def _cfg(*overrides, files=(TINY,)):
    return load_config(list(files), ["model.preset=llama-tiny", *overrides])


def test_llama_tiny_by_hand():
    from dsq.tools.memory import activations, model_states

    # llama-tiny: h 128, 4 heads of 32 in 2 key/value groups, SwiGLU 384, vocabulary 2048, 2
    # layers, untied; tiny.yaml: fp32, ZeRO-2, micro batch 8 x 128 tokens; 2 ranks
    layer = 2 * 128 + (4 + 2 * 2) * 32 * 128 + 128 * 128 + 2 * 384 * 128 + 128 * 384
    n = 2 * layer + 2048 * 128 + 128 + 2048 * 128
    assert n == 918_144
    s = model_states(_cfg(), world_size=2)
    assert s["params"] == n and s["dp"] == 2
    assert (s["weights"], s["master"], s["grads"], s["grad_bucket"]) == (
        4 * n, 4 * n / 2, 4 * n / 2, 2 * 500_000_000 * 4)  # two fp32 buckets (overlap_comm)
    assert s["adamw"] == s["optimizer"] == 8 * n / 2
    linear = 2 * (layer - 2 * 128) + 2048 * 128  # QKV, proj, fc1, fc2, LM head: 8-bit m and v
    other = n - linear  # embedding and norms: fp32 m and v
    assert s["qadamw"] == (linear * (1 + 1 + 2 * 4 / 256) + other * 8) / 2 == 1_716_736

    a = activations(_cfg())
    T, c = 8 * 128, 4
    per_token = (2 * (128 * c + 4)  # the norms' inputs and rstd
                 + 128 * c  # QKV input
                 + (4 + 2 * 2) * 32 * c  # QKV output
                 + (4 + 2) * 32 * c  # rotated q, k
                 + 128 * c + 4 * 4  # attention output (also proj's input), log-sum-exp per head
                 + 128 * c  # fc1 input
                 + 2 * 384 * c + 3 * 384 * c)  # fc1 output; silu(gate), up, fc2 input
    assert per_token == 12_056
    rope = 4 * 128 * 32 * c  # cos and sin for q and k
    assert a["layer"] == T * per_token + rope
    assert a["attention"] == 2 * T * 16  # selective: the log-sum-exp; proj keeps the output
    outside = T * (8 + 128 * c + 4 + 128 * c + 2048 * c + 17)  # ids, final norm, head, logits, loss
    outside += 8 * 8  # the ids: a view of seq_len + 1 per sequence
    assert a["outside"] == outside
    assert a["layers"] == 2 * a["layer"]
    assert a["none"] == 2 * a["layer"] + outside == 34_288_704
    assert a["selective"] == a["none"] - 2 * T * 16
    assert a["full"] == 2 * T * 128 * c + outside
    assert a["full_peak"] == a["full"] + a["layer"]


def test_quantized_linears_keep_codes_by_hand():
    """w8a8g8: each linear keeps its input as int8 codes plus a per-token fp32 scale, and its
    weight's codes plus a per-channel scale."""
    from dsq.tools.memory import activations

    base, q = activations(_cfg()), activations(_cfg(files=(TINY, W8A8G8)))
    T, c = 8 * 128, 4
    # QKV, fc1, fc2 keep codes instead of their inputs; proj keeps codes of the attention
    # output, which SDPA still keeps (and selective recompute then drops)
    inputs = (128 + 128 + 384) * c - (128 + 128 + 384 + 3 * 4) - (128 + 4)  # per token
    rows = (4 + 2 * 2) * 32 + 128 + 2 * 384 + 128  # rows of QKV, proj, fc1, fc2
    weights = (4 + 2 * 2) * 32 * 128 + 128 * 128 + 2 * 384 * 128 + 128 * 384 + 4 * rows
    assert q["layer"] == base["layer"] - T * inputs + weights
    assert q["attention"] == 2 * T * (128 * c + 16)
    head = 2048 * 128 + 4 * 2048
    assert q["outside"] == base["outside"] - T * (128 * c - 128 - 4) + head


def test_mx_and_nvfp4_scales_are_one_byte_by_hand():
    """MX keeps X's column copy (blocks of 32 along the tokens) with a 1-byte E8M0 scale per
    block; NVFP4 keeps X's column copy (blocks of 16) and W's 16 x 16 tiles with a 1-byte E4M3
    scale per block and one 4-byte fp32 scale per tensor."""
    from dsq.tools.memory import activations

    fmt = lambda r: _cfg(files=(TINY, str(ROOT / f"configs/recipes/formats/{r}.yaml")))
    base, mx, nv = activations(_cfg()), activations(fmt("mxfp8")), activations(fmt("nvfp4"))
    T, c = 8 * 128, 4
    widths = 128 + 128 + 384  # inputs of QKV, fc1, fc2 (proj's: 128, kept beside SDPA's output)
    assert mx["layer"] - base["layer"] == T * (widths * (1 + 1 / 32) - widths * c
                                               + 128 * (1 + 1 / 32)) == -1_810_432
    assert mx["outside"] - base["outside"] == T * (128 * (1 + 1 / 32) - 128 * c) == -389_120
    # weights (rows x width): QKV 256 x 128, proj 128 x 128, fc1 768 x 128, fc2 128 x 384
    weights = sum(r * w + r * (w / 16) / 16 + 4
                  for r, w in ((256, 128), (128, 128), (768, 128), (128, 384)))
    assert weights == 196_608 + 768 + 16
    assert nv["layer"] - base["layer"] == (T * (widths * (1 + 1 / 16) - widths * c
                                                + 128 * (1 + 1 / 16)) + weights + 4 * 4
                                           ) == -1_588_448
    head = 2048 * 128 + 2048 * (128 / 16) / 16 + 4
    assert nv["outside"] - base["outside"] == T * (128 * (1 + 1 / 16) - 128 * c) + head + 4 \
        == -121_848


def _model(cfg):
    from dsq.models.gpt import build_gpt
    from dsq.models.quant_layers import apply_quantization

    model = build_gpt(cfg.model, "fp32", seed=0)
    apply_quantization(model, cfg.quant)
    return model


@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=true"],
                                       ["model.preset=tiny"], ["model.num_query_groups=null",
                                                               "model.bias=true"]],
                         ids=["llama-tiny", "tied", "gpt2-tiny", "mha-bias"])
def test_parameters_are_the_models(dist_one, overrides):
    from dsq.tools.memory import parameters

    cfg = _cfg(*overrides)
    got = {n: tuple(p.shape) for n, p in _model(cfg).named_parameters()}
    assert dict(parameters(cfg.model)) == got


@pytest.mark.parametrize("optim", [["optim.name=adamw"], ["optim.name=qadamw"],
                                   ["optim.name=qadamw", "optim.m_bits=4", "optim.v_bits=32"],
                                   ["optim.name=qadamw", "optim.block_size=tensor"],
                                   ["optim.name=qadamw", "optim.block_size=row",
                                    "optim.quantize=all"],
                                   ["optim.name=qadamw", "optim.m_format=fp8e4m3",
                                    "optim.v_format=fp8e5m2"]],
                         ids=["adamw", "m8v8", "m4", "tensor", "row-all", "fp8"])
def test_optimizer_states_are_the_optimizers(dist_one, optim):
    from dsq.optim import build_optimizer, optimizer_state_bytes as held
    from dsq.tools.memory import optimizer_state_bytes, parameters

    cfg = _cfg(*optim)
    model = _model(cfg)
    opt = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    steps = sum(v.numel() * v.element_size() for st in opt.state.values()
                for k, v in st.items() if k == "step" and torch.is_tensor(v))
    assert held(opt) - steps == optimizer_state_bytes(parameters(cfg.model), cfg.optim)


def _kept_by_autograd(model, cfg) -> int:
    """Bytes of the storages autograd keeps for backward after one forward and loss
    (parameters left out; a storage several tensors view counted once)."""
    m, b = cfg.model, cfg.train.micro_batch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.vocab_size, (b, m.seq_len + 1), generator=g)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = st.nbytes()
        return t

    pos = torch.arange(m.seq_len).expand(b, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:]).float().mean()
    del loss
    return sum(kept.values())


@pytest.mark.parametrize("case", ["llama-tiny", "llama-tiny-w8a8g8", "gpt2-tiny"])
def test_activations_are_what_autograd_keeps(dist_one, case):
    from dsq.tools.memory import activations

    files = (TINY, W8A8G8) if case.endswith("w8a8g8") else (TINY,)
    extra = ["model.preset=tiny"] if case == "gpt2-tiny" else []
    cfg = _cfg("train.micro_batch=4", "model.seq_len=64", *extra, files=files)
    got = _kept_by_autograd(_model(cfg).train(), cfg)
    want = activations(cfg)["none"]
    m, T = cfg.model, 4 * 64
    if m.norm == "rmsnorm":  # the CPU's composite RMSNorm keeps its normalized input too
        want += (2 * m.num_layers + 1) * T * m.hidden_size * 4
    print(f"{case}: autograd keeps {got:,} bytes, the estimate {want:,.0f}")
    assert got == want


@pytest.mark.parametrize("zero, precision, overlap, want", [
    (2, "fp32", "true", (2, 4)), (2, "fp32", "false", (1, 4)), (2, "bf16", "true", (2, 2)),
    (1, "fp32", "null", (2, 4)), (1, "bf16", "true", (0, 0)), (0, "fp32", "true", (0, 0))])
def test_reduce_buckets_by_hand(zero, precision, overlap, want):
    """Buffers of deepspeed.reduce_bucket_size elements of the weights' dtype: two with
    overlap_comm (null: on, as on the GPUs the estimate is for); none under ZeRO-0 or bf16
    ZeRO-1 (DeepSpeed's BF16_Optimizer)."""
    from dsq.tools.memory import model_states, reduce_buckets

    cfg = _cfg(f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}",
               f"deepspeed.overlap_comm={overlap}", "deepspeed.reduce_bucket_size=3000")
    count, width = want
    assert reduce_buckets(cfg.deepspeed) == (count, 3000 * width if count else 0)
    assert model_states(cfg, world_size=2)["grad_bucket"] == count * 3000 * width


@pytest.mark.parametrize("zero, precision, overlap", [(2, "fp32", True), (2, "fp32", False),
                                                      (2, "bf16", True), (1, "fp32", True),
                                                      (1, "bf16", True)])
def test_reduce_buckets_are_what_deepspeed_allocates(dist_one, monkeypatch, zero, precision,
                                                     overlap):
    """One backward through dsq's DeepSpeed engine (one rank): the bytes of the gradient
    buffers ZeRO's setup_buckets allocates equal the estimate."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from dsq.optim import build_optimizer
    from dsq.parallel.engine import initialize_engine
    from dsq.tools.memory import reduce_buckets

    cfg = _cfg(f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}",
               f"deepspeed.overlap_comm={str(overlap).lower()}",
               "deepspeed.reduce_bucket_size=40000", "train.micro_batch=2",
               "train.global_batch=2", "model.seq_len=16")
    seen = []
    setup = DeepSpeedZeroOptimizer.setup_buckets

    def record(self):
        setup(self)
        seen.append(sum(b.numel() * b.element_size() for bucket in self.ipg_buckets.values()
                        for b in bucket.buffer))
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "setup_buckets", record)
    monkeypatch.setenv("LOCAL_RANK", "0")
    model = _model(cfg)
    engine, *_ = initialize_engine(cfg, model, build_optimizer(model, cfg.optim), None, 1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, -1)
    loss = engine(ids[:, :-1], pos, None, labels=ids[:, 1:]).float().mean()
    engine.backward(loss)
    count, each = reduce_buckets(cfg.deepspeed)
    if (precision, zero) == ("bf16", 1):  # BF16_Optimizer: no ZeRO buckets
        assert not seen and count * each == 0
    else:
        assert seen and seen[0] == count * each == (2 if overlap else 1) * 40000 * (
            2 if precision == "bf16" else 4)
