"""Export a dsq checkpoint as a Hugging Face ``transformers`` GPT-2 or Llama model directory.

``export(path, out_dir, weights=...)`` writes ``config.json``, ``model.safetensors``,
``generation_config.json``, the tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, and the original ``tokenizer.model``) and ``dsq_export.json`` (what
was exported from where). The directory is built under a temporary name next to ``out_dir``
and renamed into place at the end: a failed export leaves nothing behind, and an existing
``out_dir`` is never overwritten.

Why GPT-2: dsq's GPT is megatron-core's pre-LayerNorm decoder with learned absolute positions,
LayerNorm (eps from the model config, 1e-5), biases on every linear but the LM head,
multi-head attention scaled by 1/sqrt(head_dim), a GELU MLP (the exact, erf GELU: megatron's
``F.gelu``, written ``activation_function: "gelu"``, not GPT-2's tanh ``gelu_new``), a final
LayerNorm and a bias-free LM head, tied or not to the input embedding. That is
``GPT2LMHeadModel`` exactly; :func:`check_representable` refuses (naming the setting) a model
that differs (gated MLP, RMSNorm, grouped-query attention, rotary positions, ...).

Why Llama: a model with ``positions: rope`` (``model.arch: llama``) is megatron-core's
pre-RMSNorm decoder with rotary positions (not interleaved: dimension i pairs with i + d/2, as
Hugging Face's ``rotate_half``), grouped-query attention, a gated SiLU MLP (fc1 holds [gate; up])
and an untied or tied LM head: ``LlamaForCausalLM`` (``rope_theta``, ``num_key_value_heads``,
``rms_norm_eps``, ``head_dim``; biases, where the model has them, as ``attention_bias`` and
``mlp_bias``). :func:`check_llama` refuses a model that differs. megatron's fused QKV holds, per
key/value group, the group's query heads, then its key and its value head; they are cut into
``q_proj``, ``k_proj`` and ``v_proj`` (query head ``j`` belongs to group ``j // (heads /
groups)`` in both). The export chooses the class from the positions: learned -> GPT-2, rope ->
Llama.

Weight layout: the checkpoint's tensor-parallel shards are merged first
(:func:`dsq.run.load.merged_state_dict`); megatron's fused QKV weight ``[heads*3*head_dim,
hidden]`` holds, per head, that head's q, k, v rows one after the other, GPT-2's ``c_attn``
is a ``Conv1D`` (``y = x W + b``, weight ``[in, out]``) whose outputs are all q, then all k,
then all v; the other linears are transposed into ``Conv1D``'s ``[in, out]``.

Quantization: ``weights="quantized"`` (the default) writes each quantized linear's weight as
the run's quantizer sees it in the forward pass (quantized, then dequantized to fp32), so the
exported model computes what dsq trained and evaluated; ``"trained"`` writes the full-precision
master weights (to continue training in high precision, or compare). A tied LM head whose
weight is quantized while the input embedding is not is written untied. Activation
quantization cannot be expressed in a ``transformers`` model: the export warns (the exported
model runs activations in full precision, so its loss differs from ``dsq eval``). Stochastic
weight rounding has no single quantized value, so ``weights="quantized"`` refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

from dsq import log

WEIGHTS = ("quantized", "trained")
INSTALL_HINT = ("dsq export needs transformers and safetensors: pip install 'dsq[export]' "
                "(or pip install transformers safetensors)")


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why and what to do."""


def require_transformers() -> None:
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ExportError(INSTALL_HINT) from None


def check_representable(model) -> None:
    """Raise :class:`ExportError` naming the first setting GPT-2 cannot represent."""
    c = model.config
    checks = [
        (getattr(c, "normalization", "LayerNorm") == "LayerNorm",
         f"normalization={getattr(c, 'normalization', None)!r} (GPT-2 has LayerNorm)"),
        (c.activation_func is torch.nn.functional.gelu and not c.gated_linear_unit,
         "the MLP is not a plain exact-GELU MLP (GPT-2: fc -> GELU -> proj)"),
        (c.add_bias_linear, "linears without biases (GPT-2 has biases)"),
        (c.num_query_groups in (None, c.num_attention_heads),
         f"grouped-query attention ({c.num_query_groups} groups; GPT-2 has one per head)"),
        (c.kv_channels * c.num_attention_heads == c.hidden_size,
         "a head dimension other than hidden_size / num_heads"),
        (not getattr(c, "qk_layernorm", False), "query/key LayerNorm"),
        (not getattr(c, "layernorm_zero_centered_gamma", False), "zero-centered LayerNorm gamma"),
        (not getattr(c, "apply_residual_connection_post_layernorm", False),
         "residual connections after the LayerNorm"),
        (getattr(model, "position_embedding_type", "learned_absolute") == "learned_absolute",
         f"{getattr(model, 'position_embedding_type', None)} positions (GPT-2 learns absolute "
         f"positions)"),
        (getattr(c, "softmax_scale", None) is None, "a custom attention softmax scale"),
    ]
    for ok, what in checks:
        if not ok:
            raise ExportError(f"cannot export this model as GPT-2: it has {what}")


def check_llama(model) -> None:
    """Raise :class:`ExportError` naming the first setting ``LlamaForCausalLM`` cannot
    represent."""
    c = model.config
    checks = [
        (getattr(c, "normalization", "LayerNorm") == "RMSNorm",
         f"normalization={getattr(c, 'normalization', None)!r} (Llama has RMSNorm)"),
        (c.gated_linear_unit and c.activation_func is torch.nn.functional.silu,
         "an MLP that is not SwiGLU (Llama: down(silu(gate) * up))"),
        (not getattr(c, "rotary_interleaved", False), "interleaved rotary positions"),
        (getattr(model, "rotary_percent", 1.0) == 1.0, "rotary positions on part of each head"),
        (not getattr(c, "qk_layernorm", False), "query/key normalization"),
        (not getattr(c, "layernorm_zero_centered_gamma", False), "zero-centered norm gamma"),
        (not getattr(c, "apply_residual_connection_post_layernorm", False),
         "residual connections after the norm"),
        (getattr(c, "softmax_scale", None) is None, "a custom attention softmax scale"),
    ]
    for ok, what in checks:
        if not ok:
            raise ExportError(f"cannot export this model as Llama: it has {what}")


def _split_qkv(w: torch.Tensor, heads: int, groups: int):
    """megatron fused QKV ``[groups * (heads/groups + 2) * hd, ...]`` (per group: its query
    heads, its key, its value) -> ``(q [heads*hd], k [groups*hd], v [groups*hd])`` on dim 0."""
    rep = heads // groups
    rest = w.shape[1:]
    g = w.reshape(groups, rep + 2, -1, *rest)
    hd = g.shape[2]
    return (g[:, :rep].reshape(heads * hd, *rest), g[:, rep].reshape(groups * hd, *rest),
            g[:, rep + 1].reshape(groups * hd, *rest))


def llama_state_dict(model, weights: str = "quantized") -> Dict[str, torch.Tensor]:
    """LlamaForCausalLM tensors (fp32, contiguous) of a TP=1 dsq model with rotary positions."""
    c = model.config
    heads, groups = c.num_attention_heads, c.num_query_groups or c.num_attention_heads
    sd = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    q = quantized_weights(model) if weights == "quantized" else {}

    def w(module: str) -> torch.Tensor:
        return q.get(module, sd[f"{module}.weight"]).float()

    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    for i in range(c.num_layers):
        p, h = f"decoder.layers.{i}", f"model.layers.{i}"
        qkv, fc1 = f"{p}.self_attention.linear_qkv", f"{p}.mlp.linear_fc1"
        gate, up = w(fc1).chunk(2, 0)
        qw, kw, vw = _split_qkv(w(qkv), heads, groups)
        out.update({
            f"{h}.input_layernorm.weight": sd[f"{p}.input_layernorm.weight"],
            f"{h}.post_attention_layernorm.weight": sd[f"{p}.pre_mlp_layernorm.weight"],
            f"{h}.self_attn.q_proj.weight": qw, f"{h}.self_attn.k_proj.weight": kw,
            f"{h}.self_attn.v_proj.weight": vw,
            f"{h}.self_attn.o_proj.weight": w(f"{p}.self_attention.linear_proj"),
            f"{h}.mlp.gate_proj.weight": gate, f"{h}.mlp.up_proj.weight": up,
            f"{h}.mlp.down_proj.weight": w(f"{p}.mlp.linear_fc2"),
        })
        if c.add_bias_linear:
            qb, kb, vb = _split_qkv(sd[f"{qkv}.bias"], heads, groups)
            gb, ub = sd[f"{fc1}.bias"].chunk(2, 0)
            out.update({
                f"{h}.self_attn.q_proj.bias": qb, f"{h}.self_attn.k_proj.bias": kb,
                f"{h}.self_attn.v_proj.bias": vb,
                f"{h}.self_attn.o_proj.bias": sd[f"{p}.self_attention.linear_proj.bias"],
                f"{h}.mlp.gate_proj.bias": gb, f"{h}.mlp.up_proj.bias": ub,
                f"{h}.mlp.down_proj.bias": sd[f"{p}.mlp.linear_fc2.bias"]})
    if "output_layer" in q:
        out["lm_head.weight"] = q["output_layer"]  # untied even when trained tied
    elif not model.share_embeddings_and_output_weights:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def llama_config(cfg, model, tied: bool, eos_id: int):
    from transformers import LlamaConfig

    c = model.config
    return LlamaConfig(
        vocab_size=cfg.model.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_query_groups or c.num_attention_heads, head_dim=c.kv_channels,
        hidden_act="silu", max_position_embeddings=cfg.model.seq_len,
        rms_norm_eps=c.layernorm_epsilon, rope_theta=float(model.rotary_base),
        attention_bias=bool(c.add_bias_linear), mlp_bias=bool(c.add_bias_linear),
        attention_dropout=0.0, initializer_range=cfg.model.init_std, tie_word_embeddings=tied,
        bos_token_id=eos_id, eos_token_id=eos_id, architectures=["LlamaForCausalLM"],
    )


def _qkv_to_c_attn(w: torch.Tensor, heads: int) -> torch.Tensor:
    """megatron fused QKV (per head [q; k; v]) -> GPT-2 [q_all; k_all; v_all] along dim 0."""
    rest = w.shape[1:]
    hd = w.shape[0] // (3 * heads)
    return w.reshape(heads, 3, hd, *rest).transpose(0, 1).reshape(3 * heads * hd, *rest)


def quantized_weights(model) -> Dict[str, torch.Tensor]:
    """``{module name: fake-quantized weight}`` of every linear with a weight format."""
    from dsq.models.quant_layers import _quant_layers
    from dsq.quant import fake_quantize

    out = {}
    for name, m in _quant_layers(model):
        fmt = m.qconfig.weight if m.qconfig is not None else None
        if fmt is None:
            continue
        if fmt.rounding == "stochastic":
            raise ExportError(f"{name}: the weight format {fmt} rounds stochastically, so its "
                              f"quantized weight is different at every step; export with "
                              f"--weights trained")
        w = m.weight if m.weight is not None else model.shared_embedding_or_output_weight()
        out[name] = fake_quantize(w.detach().float(), fmt)
    return out


def gpt2_state_dict(model, weights: str = "quantized") -> Dict[str, torch.Tensor]:
    """GPT2LMHeadModel tensors (fp32, contiguous) of a TP=1 dsq GPT."""
    c = model.config
    heads = c.num_attention_heads
    sd = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    q = quantized_weights(model) if weights == "quantized" else {}

    def w(module: str) -> torch.Tensor:
        return q.get(module, sd[f"{module}.weight"]).float()

    out = {"transformer.wte.weight": sd["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": sd["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": sd["decoder.final_layernorm.weight"],
           "transformer.ln_f.bias": sd["decoder.final_layernorm.bias"]}
    for i in range(c.num_layers):
        p, h = f"decoder.layers.{i}", f"transformer.h.{i}"
        qkv = f"{p}.self_attention.linear_qkv"
        out.update({
            f"{h}.ln_1.weight": sd[f"{p}.input_layernorm.weight"],
            f"{h}.ln_1.bias": sd[f"{p}.input_layernorm.bias"],
            f"{h}.attn.c_attn.weight": _qkv_to_c_attn(w(qkv), heads).t(),
            f"{h}.attn.c_attn.bias": _qkv_to_c_attn(sd[f"{qkv}.bias"], heads),
            f"{h}.attn.c_proj.weight": w(f"{p}.self_attention.linear_proj").t(),
            f"{h}.attn.c_proj.bias": sd[f"{p}.self_attention.linear_proj.bias"],
            f"{h}.ln_2.weight": sd[f"{p}.pre_mlp_layernorm.weight"],
            f"{h}.ln_2.bias": sd[f"{p}.pre_mlp_layernorm.bias"],
            f"{h}.mlp.c_fc.weight": w(f"{p}.mlp.linear_fc1").t(),
            f"{h}.mlp.c_fc.bias": sd[f"{p}.mlp.linear_fc1.bias"],
            f"{h}.mlp.c_proj.weight": w(f"{p}.mlp.linear_fc2").t(),
            f"{h}.mlp.c_proj.bias": sd[f"{p}.mlp.linear_fc2.bias"],
        })
    if "output_layer" in q:
        out["lm_head.weight"] = q["output_layer"]  # untied even when trained tied
    elif not model.share_embeddings_and_output_weights:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def gpt2_config(cfg, model, tied: bool, eos_id: int):
    from transformers import GPT2Config

    c = model.config
    return GPT2Config(
        vocab_size=cfg.model.vocab_size, n_positions=cfg.model.seq_len, n_embd=c.hidden_size,
        n_layer=c.num_layers, n_head=c.num_attention_heads, n_inner=c.ffn_hidden_size,
        activation_function="gelu", layer_norm_epsilon=c.layernorm_epsilon,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=cfg.model.init_std,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, tie_word_embeddings=tied,
        bos_token_id=eos_id, eos_token_id=eos_id, architectures=["GPT2LMHeadModel"],
    )


def export(path: str, out_dir: str, weights: str = "quantized",
           warn=log.warn) -> Dict:
    """Export the checkpoint at ``path`` into the new directory ``out_dir``; returns the
    contents of ``dsq_export.json``. Raises :class:`ExportError` (or
    :class:`dsq.run.load.CheckpointError`) with one message on any problem."""
    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    out = Path(out_dir)
    if out.exists():
        raise ExportError(f"{out_dir} already exists: give a new directory")
    from dsq.parallel import shutdown
    from dsq.run.load import load_model, load_tokenizer, pinned
    from dsq.tools import hf_tokenizer

    with pinned(path) as tag_dir:  # pruning cannot remove it while it is read
        require_transformers()
        sp = load_tokenizer(tag_dir)
        try:
            tok, special = hf_tokenizer.build((tag_dir / "tokenizer.model").read_bytes())
        except hf_tokenizer.TokenizerExportError as e:
            raise ExportError(f"cannot export the tokenizer: {e}") from None
        notes: List[str] = []
        try:
            model, cfg, tag_dir = load_model(str(tag_dir), quantize=True)
            llama = getattr(model, "position_embedding_type", None) == "rope"
            (check_llama if llama else check_representable)(model)
            qc = cfg.quant
            if qc.activation is not None:
                notes.append(f"activation quantization ({qc.activation}) cannot be exported: the "
                             f"exported model runs activations in full precision, so its outputs "
                             f"and loss differ from dsq eval/generate")
            if weights == "quantized" and qc.weight is None:
                weights_written = "trained"  # nothing is weight-quantized: the same tensors
            else:
                weights_written = weights
            if weights == "trained" and qc.weight is not None:
                notes.append(f"--weights trained: the full-precision master weights, not the "
                             f"{qc.weight} weights the run computed with")
            with torch.no_grad():
                tensors = (llama_state_dict if llama else gpt2_state_dict)(model, weights_written)
            tied = "lm_head.weight" not in tensors
            if bool(cfg.model.tie_embeddings) and not tied:
                notes.append("the LM head is written untied: its quantized weight differs from the "
                             "input embedding's")
            hf_config = (llama_config if llama else gpt2_config)(cfg, model, tied, sp.eos_id())
        finally:
            shutdown()
        for n in notes:
            warn(n)

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            from safetensors.torch import save_file

            hf_config.save_pretrained(tmp)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            from transformers import GenerationConfig

            GenerationConfig(bos_token_id=sp.eos_id(), eos_token_id=sp.eos_id(),
                             pad_token_id=sp.eos_id(), do_sample=True, temperature=1.0, top_k=50,
                             max_length=cfg.model.seq_len).save_pretrained(tmp)
            tok.save(str(tmp / "tokenizer.json"))
            shutil.copyfile(tag_dir / "tokenizer.model", tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                hf_tokenizer.tokenizer_config(special, cfg.model.seq_len), indent=2))
            (tmp / "special_tokens_map.json").write_text(hf_tokenizer.special_tokens_map(special))
            info = {"checkpoint": str(tag_dir),
                    "architecture": "LlamaForCausalLM" if llama else "GPT2LMHeadModel",
                    "weights": weights_written, "tied_embeddings": tied,
                    "quant": {"weight": str(qc.weight) if qc.weight else None,
                              "activation": str(qc.activation) if qc.activation else None,
                              "grad": str(qc.grad) if qc.grad else None},
                    "notes": notes}
            (tmp / "dsq_export.json").write_text(json.dumps(info, indent=2))
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return info
