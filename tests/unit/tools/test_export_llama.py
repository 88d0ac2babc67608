"""A llama-tiny dsq model written as ``LlamaForCausalLM`` tensors and config: ``transformers``
computes the same logits (1e-5 relative) with the head untied or tied, with biases, and with
quantized weights; the config carries the rotary base, key/value heads and RMSNorm epsilon.
(The export command end to end, with TP=2 checkpoints merged, is in tests/e2e/test_export.py.)
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the Hub


def _model(*overrides, quant=None):
    from dsq.config import QuantConfig, load_config
    from dsq.models.gpt import build_gpt
    from dsq.models.quant_layers import apply_quantization

    cfg = load_config([], ["model.preset=llama-tiny", "model.seq_len=32", *overrides])
    model = build_gpt(cfg.model, "fp32", seed=0)
    with torch.no_grad():  # norms and biases away from their init (ones, zeros): mapped right
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    if quant:
        apply_quantization(model, QuantConfig(**quant))
    return model.eval(), cfg


@pytest.mark.parametrize("case", ["untied", "tied", "bias", "w4-quantized"])
def test_transformers_logits_equal_dsq(dist_one, case):
    from transformers import LlamaForCausalLM

    from dsq.tools.export import check_llama, llama_config, llama_state_dict

    overrides = {"tied": ["model.tie_embeddings=true"], "bias": ["model.bias=true"]}
    quant = dict(weight="int4:channel", lm_head=True) if case == "w4-quantized" else None
    model, cfg = _model(*overrides.get(case, []), quant=quant)
    check_llama(model)
    tensors = llama_state_dict(model, "quantized")
    tied = "lm_head.weight" not in tensors
    assert tied == (case == "tied")
    hf = LlamaForCausalLM(llama_config(cfg, model, tied, eos_id=1)).eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set())
    ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len),
                        generator=torch.Generator().manual_seed(1))
    pos = torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        ref = model(ids, pos, None).float()
        got = hf(ids).logits.float()
    rel = float((got - ref).abs().max() / ref.abs().max())
    print(f"{case}: max relative logit difference {rel:.3g}")
    assert rel <= 1e-5
    assert ref.std() > 0.1
    if quant:  # the exported weights are the quantized ones: the trained ones differ
        assert not torch.equal(tensors["model.layers.0.mlp.gate_proj.weight"],
                               llama_state_dict(model, "trained")[
                                   "model.layers.0.mlp.gate_proj.weight"])


def test_config_json_names_the_llama_settings(dist_one, tmp_path):
    import json

    from dsq.tools.export import llama_config

    model, cfg = _model("model.rope_base=500000", "model.norm_eps=1e-6")
    llama_config(cfg, model, False, eos_id=1).save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    theta = c.get("rope_theta") or c["rope_parameters"]["rope_theta"]
    assert (theta, c["num_key_value_heads"], c["num_attention_heads"], c["rms_norm_eps"],
            c["tie_word_embeddings"], c["intermediate_size"], c["head_dim"]) == (
        500000.0, 2, 4, 1e-6, False, 384, 32)
    assert c["architectures"] == ["LlamaForCausalLM"] and c["hidden_act"] == "silu"


def test_gpt2_models_are_refused_as_llama(dist_one):
    from dsq.tools.export import ExportError, check_llama

    model, _ = _model("model.arch=gpt2", "model.norm=layernorm", "model.mlp=gelu",
                      "model.positions=learned")
    with pytest.raises(ExportError, match="normalization='LayerNorm'"):
        check_llama(model)
