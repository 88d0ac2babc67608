"""A megatron-core GPT assembled from a dsq spec provider.

The provider follows megatron-core's ``BackendSpecProvider`` protocol: it names the
column/row-parallel linears (dsq's quantizable subclasses), the layer norm, and the core
attention (:class:`dsq.models.attention.SDPAttention`, which needs no CUDA). Tensor
parallelism comes from megatron-core's ``parallel_state``; weights are initialised on the
CPU from the torch default generator (``use_cpu_initialization``), so the same seed gives
the same full weights at every tensor-parallel size.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Apex/Transformer Engine not installed" notices
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from dsq.models.attention import SDPAttention
from dsq.models.loss import vocab_parallel_cross_entropy

from dsq.models.quant_layers import QuantColumnParallelLinear, QuantRowParallelLinear


class DsqSpecProvider:
    """megatron-core ``BackendSpecProvider`` for dsq: quantizable linears, torch norm, SDPA."""

    def column_parallel_linear(self) -> type:
        return QuantColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return QuantRowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return False

    def column_parallel_layer_norm_linear(self) -> Optional[type]:
        return None

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return WrappedTorchNorm

    def core_attention(self) -> type:
        return SDPAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool
                            ) -> Tuple[type, None]:
        raise NotImplementedError("dsq builds dense GPTs only")

    def activation_func(self) -> type:
        raise NotImplementedError("dsq uses megatron's default GELU")


def layer_spec(provider: Optional[DsqSpecProvider] = None) -> ModuleSpec:
    """A pre-LayerNorm GPT layer: LN -> QKV -> attention -> proj, LN -> fc1 -> GELU -> fc2."""
    b = provider or DsqSpecProvider()
    norm = b.layer_norm()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=b.column_parallel_linear(),
                    core_attention=b.core_attention(),
                    linear_proj=b.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(backend=b),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def transformer_config(model_cfg, precision: str = "fp32") -> TransformerConfig:
    m = model_cfg
    bf16 = precision == "bf16"
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        init_method_std=m.init_std,
        tensor_model_parallel_size=_tp_size(),
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,  # DeepSpeed needs param.grad filled
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def _tp_size() -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


class DsqGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` with dsq's chunked vocab-parallel cross entropy
    (:mod:`dsq.models.loss`: no fp32 copy of the logits; the same loss to fp32 rounding)."""

    def compute_language_model_loss(self, labels, logits):
        pgs = getattr(self, "pg_collection", None)
        group = getattr(pgs, "tp", None)
        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], as the logits
        # the logits exist only for this loss: their storage takes the gradient
        loss = vocab_parallel_cross_entropy(logits, labels, group, overwrite_logits=True)
        return loss.transpose(0, 1).contiguous()


def build_gpt(model_cfg, precision: str = "fp32", seed: Optional[int] = None) -> GPTModel:
    """Build the GPT of ``model_cfg`` on this rank's tensor-parallel shard.

    With ``seed`` set, the default generator is seeded first, so every rank (and every
    tensor-parallel size) draws the same full weights before taking its shard.
    """
    if seed is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            # megatron's tensor-parallel CUDA RNG streams (dropout inside TP regions, sequence
            # parallelism) must exist before a forward forks them, as in Megatron-LM
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = transformer_config(model_cfg, precision)
    return DsqGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.seq_len,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(model_cfg.tie_embeddings),
        position_embedding_type="learned_absolute",
    )


def count_params(model: torch.nn.Module, tp_size: int = 1) -> int:
    """Parameters of the full (unsharded) model, from one tensor-parallel rank's shard."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "tensor_model_parallel", False):
            n *= tp_size
        total += n
    return total
