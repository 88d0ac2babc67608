"""Quantized megatron-core linears: bit-identity when off, TP=2 == TP=1 when on.

All megatron work happens in one 2-process gloo run (the module fixture ``results``): every
rank builds each layer twice, once on a single-rank group (TP=1, full weight) and once on the
TP=2 group (the same full weight's shard), runs forward and backward on the same data, gathers
the shards and compares. Rank 0 saves the measured errors; the tests below assert on them.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from dsq.config import QuantConfig
from dsq.quant import LinearQuant, quantized_linear
from tests.dist_utils import gather as _gather, megatron_tp_groups, spawn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from dsq.models.quant_layers import (
        QuantColumnParallelLinear,
        QuantRowParallelLinear,
        apply_quantization,
        collect_sqnr,
        set_sqnr_capture,
    )

pytestmark = pytest.mark.slow  # one 2-process gloo run for the module

S, B, IN, OUT = 4, 3, 64, 96  # shard widths at TP=2: 32 (row in), 48 (column out)
CASES = {
    "tensor": LinearQuant("int8:tensor", "int8:tensor", "int8:tensor", "both"),
    "channel-token": LinearQuant("int8:channel", "int8:token", "int8:token", "both"),
    "asym4": LinearQuant("int4:channel:asym", "int4:token:asym", "int8:token:asym", "both"),
    "tensor-asym": LinearQuant("int8:tensor:asym", "int8:tensor:asym", "int4:tensor:asym"),
    "group": LinearQuant("int8:group16", "int8:group16", "int4:group16:asym", "input"),
}
# floating-point formats, on a wider layer (shard widths 128 and 256: whole blocks of 128)
FLOAT_CASES = {
    "fp8-row": LinearQuant("fp8e4m3:channel", "fp8e4m3:token", "fp8e5m2:token", "both"),
    "fp8-tensor": LinearQuant("fp8e4m3:tensor", "fp8e4m3:tensor", "fp8e5m2:tensor", "both"),
    "fp8-block128": LinearQuant("fp8e4m3:block128", "fp8e4m3:block128", "fp8e4m3:block128",
                                "both"),
    "mxfp8": LinearQuant("mxfp8", "mxfp8", "mxfp8", "both"),
    "nvfp4": LinearQuant("nvfp4:2d", "nvfp4", "nvfp4", "both"),
}
FLOAT_IN, FLOAT_OUT = 256, 512
KINDS = ("column", "row")
TP_TOL = 1e-5  # fp32 re-association of 32- and 48-term partial sums: ~1e-7 relative


# ----------------------------------------------------------------------------- worker
def _data(kind, IN=IN, OUT=OUT):
    g = torch.Generator().manual_seed(0 if kind == "column" else 1)
    return {"w": torch.randn(OUT, IN, generator=g) * 0.05, "b": torch.randn(OUT, generator=g),
            "x": torch.randn(S, B, IN, generator=g), "gy": torch.randn(S, B, OUT, generator=g)}


def _layer(cls, kind, group, data, config):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    n, r = group.size(), group.rank()
    OUT, IN = data["w"].shape
    init = torch.nn.init.zeros_
    with torch.no_grad():
        if issubclass(cls, ColumnParallelLinear):
            layer = cls(IN, OUT, config=config, init_method=init, bias=True, gather_output=False,
                        tp_group=group)
            layer.weight.copy_(data["w"].chunk(n, 0)[r])
            layer.bias.copy_(data["b"].chunk(n, 0)[r])
        else:
            layer = cls(IN, OUT, config=config, init_method=init, bias=True,
                        input_is_parallel=True, skip_bias_add=False, tp_group=group)
            layer.weight.copy_(data["w"].chunk(n, 1)[r])
            layer.bias.copy_(data["b"])
    return layer


def _run(layer, kind, group, data):
    """Forward + backward; returns full (y, dx, dw, db), shards gathered."""
    n, r = group.size(), group.rank()
    if kind == "column":
        x = data["x"].clone().requires_grad_()
        y, _ = layer(x)
        y.backward(data["gy"].chunk(n, -1)[r])
        return (_gather(y, group, -1), x.grad, _gather(layer.weight.grad, group, 0),
                _gather(layer.bias.grad, group, 0))
    x = data["x"].chunk(n, -1)[r].clone().requires_grad_()
    y, _ = layer(x)
    y.backward(data["gy"])
    return (y.detach(), _gather(x.grad, group, -1), _gather(layer.weight.grad, group, 1),
            layer.bias.grad)


def _rel(got, want):
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))


def _worker(rank, world, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.transformer_config import TransformerConfig
    solo, tp2 = megatron_tp_groups(rank, world)
    config = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=2,
                               use_cpu_initialization=True, perform_initialization=True,
                               gradient_accumulation_fusion=False)
    out = {}
    try:
        for kind in KINDS:
            data = _data(kind)
            base, quant = ((ColumnParallelLinear, QuantColumnParallelLinear) if kind == "column"
                           else (RowParallelLinear, QuantRowParallelLinear))
            for tp, group in ((1, solo), (2, tp2)):
                want = _run(_layer(base, kind, group, data, config), kind, group, data)
                got = _run(_layer(quant, kind, group, data, config), kind, group, data)
                out[f"{kind}/none/tp{tp}"] = all(torch.equal(a, b) for a, b in zip(got, want))
            wide = _data(kind, FLOAT_IN, FLOAT_OUT)
            for name, qc in (*CASES.items(), *FLOAT_CASES.items()):
                if name in FLOAT_CASES:
                    data = wide
                res = {}
                for tp, group in ((1, solo), (2, tp2)):
                    layer = _layer(quant, kind, group, data, config)
                    layer.qconfig = qc
                    set_sqnr_capture(torch.nn.ModuleDict({"linear_fc1": layer}), True)
                    res[tp] = _run(layer, kind, group, data)
                    res[f"sqnr{tp}"] = collect_sqnr(torch.nn.ModuleDict({"linear_fc1": layer}))
                broken = _layer(quant, kind, tp2, data, config)
                broken.qconfig = qc
                broken._reducer = lambda *a: None  # TP statistics left per shard: wrong
                res["broken"] = _run(broken, kind, tp2, data)
                # TP=1 against the bare autograd Function (+ bias): the layer adds nothing
                x, w = data["x"].clone().requires_grad_(), data["w"].clone().requires_grad_()
                y = quantized_linear(x, w, qc) + data["b"]
                y.backward(data["gy"])
                formula = (y.detach(), x.grad, w.grad, data["gy"].sum((0, 1)))
                out[f"{kind}/{name}"] = {
                    "tp_err": _rel(res[2], res[1]), "broken_err": _rel(res["broken"], res[1]),
                    "formula_err": _rel(res[1], formula), "sqnr1": res["sqnr1"],
                    "sqnr2": res["sqnr2"]}
        out["errors"] = _errors(tp2, config)
        out["gpt"] = _gpt()
    finally:
        parallel_state.destroy_model_parallel()
    if rank == 0:
        torch.save(out, path)


def _errors(tp2, config):
    """Messages of the unsupported settings, at TP=2."""
    import dataclasses

    msgs = {}
    data = _data("row")
    layer = _layer(QuantRowParallelLinear, "row", tp2, data, config)
    layer.qconfig = LinearQuant(activation="int8:group64")  # shard width 32
    try:
        _run(layer, "row", tp2, data)
    except ValueError as e:
        msgs["group"] = str(e)
    layer = _layer(QuantColumnParallelLinear, "column", tp2, _data("column"), config)
    layer.qconfig = LinearQuant("mxfp8", None, None)  # W's column copy: 48-row shards
    try:
        _run(layer, "column", tp2, _data("column"))
    except ValueError as e:
        msgs["float_block"] = str(e)
    sp = dataclasses.replace(config, sequence_parallel=True, tensor_model_parallel_size=2)
    layer = _layer(QuantColumnParallelLinear, "column", tp2, _data("column"), sp)
    layer.qconfig = CASES["tensor"]
    try:
        layer(torch.randn(S, B, IN))
    except NotImplementedError as e:
        msgs["sequence_parallel"] = str(e)
    return msgs


def _gpt():
    """apply_quantization and SQNR collection on a tiny megatron GPT at TP=2."""
    from dsq.models.gpt import build_gpt

    cfg = SimpleNamespace(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=128,
                          seq_len=16, vocab_size=128, tie_embeddings=False, dropout=0.0,
                          init_std=0.02)
    res = {}
    model = build_gpt(cfg, "fp32", seed=0)
    res["off"] = apply_quantization(model, QuantConfig(weight="int8:channel"))
    res["off_head"] = (type(model.output_layer).__name__,
                       getattr(model.output_layer, "qconfig", None) is None)
    res["none"] = apply_quantization(build_gpt(cfg, "fp32", seed=0), QuantConfig())

    model = build_gpt(cfg, "fp32", seed=0)
    q = QuantConfig(weight="int8:channel", activation="int8:token", grad="int8:token",
                    lm_head=True, exclude=["*layers.1.mlp.linear_fc2"])
    res["names"] = apply_quantization(model, q)
    res["head"] = type(model.output_layer).__name__
    res["excluded_qconfig"] = model.decoder.layers[1].mlp.linear_fc2.qconfig
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator()
                        .manual_seed(0))
    pos = torch.arange(cfg.seq_len).expand(2, -1)
    set_sqnr_capture(model, True)
    loss = model(ids, pos, None, labels=ids.roll(-1, 1)).float().mean()
    loss.backward()
    res["loss"] = float(loss)
    res["sqnr"] = collect_sqnr(model)
    res["sqnr_after_clear"] = collect_sqnr(model)
    set_sqnr_capture(model, False)
    model(ids, pos, None, labels=ids).float().mean().backward()
    res["sqnr_off"] = collect_sqnr(model)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "results.pt"
    spawn(_worker, str(path), world_size=2)
    return torch.load(path, weights_only=False)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_unquantized_is_bit_identical_to_megatron(results, kind, tp):
    assert results[f"{kind}/none/tp{tp}"] is True


@pytest.mark.parametrize("case", [*CASES, *FLOAT_CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_tp2_equals_tp1(results, kind, case):
    r = results[f"{kind}/{case}"]
    assert r["formula_err"] < 1e-6, r  # TP=1 layer == quantized_linear + bias
    assert r["tp_err"] < TP_TOL, r
    # the same SQNR whether the operands are whole or sharded
    assert r["sqnr1"].keys() == r["sqnr2"].keys() == {"fc1/weight", "fc1/activation", "fc1/grad"}
    for k, v in r["sqnr1"].items():
        assert r["sqnr2"][k] == pytest.approx(v, abs=1e-3), k


@pytest.mark.parametrize("case", [c for c in CASES if c != "group"] + ["fp8-row", "fp8-tensor",
                                                                       "nvfp4"])
@pytest.mark.parametrize("kind", KINDS)
def test_tp2_without_stat_reduction_would_fail(results, kind, case):
    # every non-group case has a statistic spanning a sharded dimension in both layer kinds
    assert results[f"{kind}/{case}"]["broken_err"] > 100 * TP_TOL


def test_unsupported_settings_raise(results):
    e = results["errors"]
    assert "group size must divide the per-rank shard width 32" in e["group"]
    assert ("weight format mxfp8: its 32-element blocks would straddle the tensor-parallel "
            "shards of width 48" in e["float_block"])
    assert "sequence parallelism is not supported" in e["sequence_parallel"]


def test_apply_quantization_selects_layers(results):
    g = results["gpt"]
    linears = sorted(f"decoder.layers.{i}.{m}" for i in range(2) for m in (
        "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
        "mlp.linear_fc2"))
    assert sorted(g["off"]) == linears  # lm_head false: the head stays megatron's
    assert g["off_head"] == ("ColumnParallelLinear", True)
    assert g["none"] == []
    assert sorted(g["names"]) == sorted(
        set(linears) - {"decoder.layers.1.mlp.linear_fc2"} | {"output_layer"})
    assert g["head"] == "QuantColumnParallelLinear"
    assert g["excluded_qconfig"] is None
    assert 4.0 < g["loss"] < 5.5  # ~ln(128) = 4.85 at init


def test_collect_sqnr(results):
    g = results["gpt"]
    sq = g["sqnr"]
    assert set(sq) == {f"{k}/{op}" for k in ("qkv", "proj", "fc1", "fc2", "lm_head")
                       for op in ("weight", "activation", "grad")}
    for k, v in sq.items():
        assert 30 < v < 50, (k, v)  # 8-bit formats: ~40 dB
    assert g["sqnr_after_clear"] == {} and g["sqnr_off"] == {}


def test_apply_nothing_without_formats():
    assert apply_quantization(torch.nn.Linear(2, 2), QuantConfig(layers=["*"])) == []
