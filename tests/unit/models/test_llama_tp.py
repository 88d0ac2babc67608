"""llama-tiny (RMSNorm, SwiGLU, RoPE, GQA, no biases) under tensor parallelism.

One 2-process gloo run (the module fixture ``results``): each rank builds llama-tiny from one seed
at TP=1, then at TP=2, runs the same batch forward and backward, unquantized and with w8a8g8,
and writes its TP=2 shards as a checkpoint's ``mp_rank_XX_model_states.pt``; rank 0 merges them
(:func:`dsq.run.load.merged_state_dict`) and compares with the TP=1 model. The tests assert on
what rank 0 saved.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import spawn

pytestmark = pytest.mark.slow  # one 2-process gloo run for the module

OVERRIDES = ["model.preset=llama-tiny", "model.seq_len=32"]
RECIPES = {
    "baseline": {},
    "w8a8g8": dict(weight="int8:channel", activation="int8:token", grad="int8:token",
                   lm_head=True),
}


def _model_cfg():
    from dsq.config import load_config

    return load_config([], OVERRIDES).model


def _batch(cfg):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=g)
    pos = torch.arange(cfg.seq_len).expand(2, -1)
    return ids[:, :-1], pos, ids[:, 1:]


def _step(recipe: str):
    """(loss, {param: full gradient}, model) of one forward/backward at the current TP size."""
    from megatron.core import parallel_state

    from dsq.config import QuantConfig
    from dsq.models.gpt import build_gpt
    from dsq.models.quant_layers import apply_quantization
    from dsq.run.load import merge_shards, tp_layouts

    cfg = _model_cfg()
    model = build_gpt(cfg, "fp32", seed=0)
    names = apply_quantization(model, QuantConfig(**RECIPES[recipe]))
    ids, pos, labels = _batch(cfg)
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    group = parallel_state.get_tensor_model_parallel_group()
    layouts = tp_layouts(model)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach()
        if name in layouts and group.size() > 1:
            parts = [torch.empty_like(g) for _ in range(group.size())]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = merge_shards(parts, *layouts[name])
        grads[name] = g
    return float(loss.detach()), grads, model, names


def _tensors(sd):
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def _worker(rank, world, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

        from dsq.config import QuantConfig
        from dsq.models.quant_layers import apply_quantization
        from dsq.run.load import merged_state_dict, tp_layouts
    out = {}
    ckpt = Path(path).parent / "ckpt"
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        tp1 = {r: _step(r) for r in RECIPES}
        ref_model = tp1["baseline"][2]
        ref = ref_model.state_dict()
        layouts = tp_layouts(ref_model)
        parallel_state.destroy_model_parallel()

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        tp2 = {r: _step(r) for r in RECIPES}
        model2 = tp2["baseline"][2]
        if rank == 0:
            ckpt.mkdir()
        dist.barrier()
        torch.save({"module": model2.state_dict()}, ckpt / f"mp_rank_{rank:02d}_model_states.pt")
        dist.barrier()
        # a group format that divides the fc1 shard (384) but not its gate/up halves (192)
        try:
            cfg = _model_cfg()
            from dsq.models.gpt import build_gpt

            m = build_gpt(cfg, "fp32", seed=0)
            apply_quantization(m, QuantConfig(grad="int8:group128", layers=["*linear_fc1"]))
            ids, pos, labels = _batch(cfg)
            m(ids, pos, None, labels=labels).float().mean().backward()
            out["group_error"] = None
        except ValueError as e:
            out["group_error"] = str(e)
        if rank == 0:
            out["merged"] = _tensors(merged_state_dict(ckpt, ref, layouts))
            out["ref"] = _tensors(ref)
            out["layouts"] = layouts
            shards = [torch.load(ckpt / f"mp_rank_{r:02d}_model_states.pt",
                                 weights_only=False)["module"] for r in range(2)]
            out["naive_fc1"] = torch.cat(
                [s["decoder.layers.0.mlp.linear_fc1.weight"] for s in shards], 0)
            try:
                merged_state_dict(ckpt, ref, {k: v for k, v in layouts.items()
                                              if "linear_fc1" not in k})
                out["unknown_layout_error"] = None
            except ValueError as e:
                out["unknown_layout_error"] = str(e)
            for r in RECIPES:
                out[r] = {"loss1": tp1[r][0], "loss2": tp2[r][0], "grads1": tp1[r][1],
                          "grads2": tp2[r][1], "names": tp2[r][3]}
    finally:
        parallel_state.destroy_model_parallel()
    if rank == 0:
        torch.save(out, path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_tp") / "results.pt"
    spawn(_worker, str(path), world_size=2)
    return torch.load(path, weights_only=False)


def test_llama_tiny_shapes(results):
    ref = results["ref"]
    h, heads, groups, hd, ffn = 128, 4, 2, 32, 384
    assert ref["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (
        (heads + 2 * groups) * hd, h)  # GQA: narrower than 3 * h
    assert ref["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * ffn, h)  # [gate; up]
    assert not any(k.endswith(".bias") for k in ref)  # no biases, RMSNorm has none
    assert "embedding.position_embeddings.weight" not in ref  # rotary positions
    assert results["layouts"]["decoder.layers.0.mlp.linear_fc1.weight"] == (0, 2)


def test_merged_tp2_shards_equal_the_tp1_model(results):
    merged, ref = results["merged"], results["ref"]
    assert merged.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(merged[k], v), k
    # the trap: concatenating the fc1 shards gives [gate_0; up_0; gate_1; up_1]
    assert not torch.equal(results["naive_fc1"], ref["decoder.layers.0.mlp.linear_fc1.weight"])


def test_a_layout_the_model_does_not_describe_is_refused(results):
    e = results["unknown_layout_error"]
    assert e is not None and "linear_fc1" in e and "tensor-parallel layout" in e


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_baseline_tp2_equals_tp1(results):
    r = results["baseline"]
    worst = max(_rel(r["grads2"][k], g) for k, g in r["grads1"].items())
    print(f"baseline: loss TP=1 {r['loss1']:.8f} TP=2 {r['loss2']:.8f}; worst relative "
          f"gradient difference {worst:.2g}")
    assert r["loss2"] == pytest.approx(r["loss1"], rel=1e-6)
    assert 7.0 < r["loss1"] < 8.5  # ~ln(2048) = 7.62 at init
    assert r["grads1"].keys() == r["grads2"].keys()
    for k, g in r["grads1"].items():
        assert _rel(r["grads2"][k], g) < 1e-5, k


def test_w8a8g8_tp2_equals_tp1(results):
    r = results["w8a8g8"]
    worst = max(_rel(r["grads2"][k], g) for k, g in r["grads1"].items())
    print(f"w8a8g8: loss TP=1 {r['loss1']:.8f} TP=2 {r['loss2']:.8f}; worst relative "
          f"gradient difference {worst:.2g}")
    assert sorted(n.rsplit(".", 1)[-1] for n in r["names"]) == sorted(
        ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"] * 2 + ["output_layer"])
    # one ulp can move a value across an 8-bit rounding boundary: a few code flips at most
    assert r["loss2"] == pytest.approx(r["loss1"], abs=1e-4)
    assert r["loss1"] != results["baseline"]["loss1"]
    for k, g in r["grads1"].items():
        assert _rel(r["grads2"][k], g) < 1e-3, k


def test_group_format_must_divide_the_gate_and_up_halves(results):
    e = results["group_error"]
    assert e is not None and "shard width 192" in e and "gated fc1" in e
