"""A megatron-core GPT assembled from a dsq spec provider.

The provider follows megatron-core's ``BackendSpecProvider`` protocol: it names the
column/row-parallel linears (dsq's quantizable subclasses), the layer norm, and the core
attention (:class:`dsq.models.attention.SDPAttention`, which needs no CUDA). Tensor
parallelism comes from megatron-core's ``parallel_state``; weights are initialised on the
CPU from the torch default generator (``use_cpu_initialization``), so the same seed gives
the same full weights at every tensor-parallel size.

The architecture switches of ``model`` (``dsq.config.presets``) map onto megatron-core's:
``norm: rmsnorm`` -> ``normalization="RMSNorm"`` (``torch.nn.RMSNorm``), ``mlp: swiglu`` ->
``gated_linear_unit`` with ``F.silu`` (fc1 holds [gate; up], built with ``partition_stride=2``:
each TP rank holds [gate_r; up_r], see :func:`dsq.run.load.merged_state_dict`), ``bias`` ->
``add_bias_linear``, ``num_query_groups``, ``positions: rope`` -> megatron's rotary embedding
(:class:`RotaryEmbedding`, made device-agnostic) applied by its attention.

Activation recompute (``train.recompute``, :mod:`dsq.models.recompute`) is megatron's
``TransformerConfig`` switches where its engine runs (CUDA), otherwise dsq's layer spec: the
recomputing layer class (``full``) or attention (``selective``).
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Apex/Transformer Engine not installed" notices
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding as _MegatronRotary,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from dsq.models.attention import SDPAttention
from dsq.models.loss import vocab_parallel_cross_entropy
from dsq.models.recompute import Recompute, RecomputedTransformerLayer

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
        raise NotImplementedError("dsq uses TransformerConfig.activation_func (GELU or SiLU)")


def layer_spec(provider: Optional[DsqSpecProvider] = None,
               recompute: Optional[Recompute] = None) -> ModuleSpec:
    """A pre-LayerNorm GPT layer: LN -> QKV -> attention -> proj, LN -> fc1 -> GELU -> fc2;
    ``recompute`` on the torch engine picks the recomputing layer or attention."""
    b = provider or DsqSpecProvider()
    r = recompute or Recompute()
    norm = b.layer_norm()
    attention = b.core_attention()
    if r.torch_selective:
        attention = ModuleSpec(module=attention, params={"recompute": True})
    return ModuleSpec(
        module=RecomputedTransformerLayer if r.torch_full else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=b.column_parallel_linear(),
                    core_attention=attention,
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


def _arch(m) -> dict:
    """The architecture switches of a model section (an object without them, as an older
    caller's namespace, is a GPT-2)."""
    return dict(norm=getattr(m, "norm", None) or "layernorm",
                mlp=getattr(m, "mlp", None) or "gelu",
                positions=getattr(m, "positions", None) or "learned",
                bias=True if getattr(m, "bias", None) is None else bool(m.bias),
                groups=getattr(m, "num_query_groups", None) or m.num_heads,
                eps=getattr(m, "norm_eps", 1e-5), rope_base=getattr(m, "rope_base", 10000.0))


def block_spec(num_layers: int, provider: Optional[DsqSpecProvider] = None,
               recompute: Optional[Recompute] = None) -> TransformerBlockSubmodules:
    """``num_layers`` of :func:`layer_spec` and the final norm, from the provider too (megatron
    would otherwise pick Transformer Engine's or apex's norm where installed; apex's has no
    RMSNorm)."""
    b = provider or DsqSpecProvider()
    return TransformerBlockSubmodules(layer_specs=[layer_spec(b, recompute)] * num_layers,
                                      layer_norm=b.layer_norm())


def transformer_config(model_cfg, precision: str = "fp32",
                       recompute: Optional[Recompute] = None) -> TransformerConfig:
    m = model_cfg
    a = _arch(m)
    bf16 = precision == "bf16"
    swiglu = a["mlp"] == "swiglu"
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=a["groups"],
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm" if a["norm"] == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=a["eps"],
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=a["bias"],
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
        **(recompute or Recompute()).switches(),
    )


def _tp_size() -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


class RotaryEmbedding(_MegatronRotary):
    """megatron-core's rotary embedding on any device.

    megatron's keeps ``inv_freq`` as a plain attribute and moves it to
    ``torch.cuda.current_device()`` at the first forward (which fails without CUDA), and caches
    its output per sequence length (stale after the model moves). Here ``inv_freq`` follows the
    module's device (``model.to(device)``) and stays fp32 whatever the module's dtype; the
    frequencies are computed at each forward (an outer product of ``seq x head_dim/2``), by
    megatron's own ``get_freqs_non_repeated``, in its layout (not interleaved: ``[f, f]``).
    """

    def _apply(self, fn, recurse=True):
        moved = fn(self.inv_freq)  # .to(device) / .cuda() move it; a dtype cast is undone
        self.inv_freq = self.inv_freq.to(device=moved.device, dtype=torch.float32)
        return super()._apply(fn, recurse)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            raise NotImplementedError("dsq's rotary embedding is not interleaved")
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [s, 1, 1, head_dim]

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None) -> torch.Tensor:
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("dsq does not support context parallelism")
        return self.get_emb(max_seq_len, offset)


class DsqGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` with dsq's chunked vocab-parallel cross entropy
    (:mod:`dsq.models.loss`: no fp32 copy of the logits; the same loss to fp32 rounding) and
    its device-agnostic :class:`RotaryEmbedding`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.position_embedding_type == "rope":
            old = self.rotary_pos_emb
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=self.config.kv_channels, rotary_percent=self.rotary_percent,
                rotary_interleaved=self.config.rotary_interleaved,
                seq_len_interpolation_factor=old.seq_len_interpolation_factor,
                rotary_base=self.rotary_base, use_cpu_initialization=True,
                cp_group=old.cp_group)

    def compute_language_model_loss(self, labels, logits):
        pgs = getattr(self, "pg_collection", None)
        group = getattr(pgs, "tp", None)
        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], as the logits
        # the logits exist only for this loss: their storage takes the gradient
        loss = vocab_parallel_cross_entropy(logits, labels, group, overwrite_logits=True)
        return loss.transpose(0, 1).contiguous()


def build_gpt(model_cfg, precision: str = "fp32", seed: Optional[int] = None,
              recompute=None) -> GPTModel:
    """Build the GPT of ``model_cfg`` on this rank's tensor-parallel shard.

    With ``seed`` set, the default generator is seeded first, so every rank (and every
    tensor-parallel size) draws the same full weights before taking its shard. ``recompute``:
    a ``train.recompute`` mode or a :class:`~dsq.models.recompute.Recompute` (None: none).
    """
    recompute = Recompute.of(recompute)
    if seed is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            # megatron's tensor-parallel CUDA RNG streams (dropout inside TP regions, sequence
            # parallelism) must exist before a forward forks them, as in Megatron-LM
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(seed)
    with warnings.catch_warnings():  # selective recompute's notice about TE's fused attention
        warnings.filterwarnings("ignore", message="If you are using transformer_engine")
        config = transformer_config(model_cfg, precision, recompute)
    rope = _arch(model_cfg)["positions"] == "rope"
    return DsqGPTModel(
        config=config,
        transformer_layer_spec=block_spec(model_cfg.num_layers, recompute=recompute),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.seq_len,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(model_cfg.tie_embeddings),
        position_embedding_type="rope" if rope else "learned_absolute",
        rotary_base=_arch(model_cfg)["rope_base"],
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
