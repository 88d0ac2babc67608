"""Model presets (sizes) and architectures (the switches an ``arch`` stands for).

Precedence within ``model``: a key set in YAML or on the command line wins over the
architecture, which wins over the preset: ``model.preset=llama-tiny model.mlp=gelu`` is a
llama-tiny with a GELU MLP. :func:`fill_model` applies both to a ``ModelConfig`` whose unset keys
are None; it imports nothing from the schema, so the schema may import this module.
"""

from __future__ import annotations

# The switches of each architecture (keys of ModelConfig).
ARCHS = {
    # GPT-2: LayerNorm, GELU MLP, learned absolute positions, biases on every linear
    "gpt2": dict(norm="layernorm", mlp="gelu", positions="learned", bias=True),
    # Llama: RMSNorm, gated SiLU MLP (SwiGLU), rotary positions, no biases
    "llama": dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False),
}

PRESETS = {
    # fits a CPU unit test: ~0.9M parameters
    "tiny": dict(arch="gpt2", num_layers=2, hidden_size=128, num_heads=4, ffn_hidden_size=512,
                 seq_len=128, vocab_size=2048, tie_embeddings=False),
    # ~9M parameters: CPU studies
    "small": dict(arch="gpt2", num_layers=6, hidden_size=256, num_heads=8, ffn_hidden_size=1024,
                  seq_len=256, vocab_size=8192, tie_embeddings=False),
    # the study's model (GPT-2 small, 124M with the GPT-2 vocabulary)
    "gpt2-small": dict(arch="gpt2", num_layers=12, hidden_size=768, num_heads=12,
                       ffn_hidden_size=3072, seq_len=1024, vocab_size=50304, tie_embeddings=True),
    "gpt2-medium": dict(arch="gpt2", num_layers=24, hidden_size=1024, num_heads=16,
                        ffn_hidden_size=4096, seq_len=1024, vocab_size=50304,
                        tie_embeddings=True),
    # Llama-style. The SwiGLU width (ffn_hidden_size, of the gate and of the up projection
    # each) is 3x hidden where tiny/small have 4x: three matrices instead of two give the same
    # MLP size. Two query heads per key/value head (grouped-query attention).
    # ~0.9M parameters, as tiny: CPU tests
    "llama-tiny": dict(arch="llama", num_layers=2, hidden_size=128, num_heads=4,
                       num_query_groups=2, ffn_hidden_size=384, seq_len=128, vocab_size=2048,
                       tie_embeddings=False),
    # ~8.6M parameters, as small: CPU studies
    "llama-small": dict(arch="llama", num_layers=6, hidden_size=256, num_heads=8,
                        num_query_groups=4, ffn_hidden_size=768, seq_len=256, vocab_size=8192,
                        tie_embeddings=False),
    # ~150M parameters
    "llama-150m": dict(arch="llama", num_layers=16, hidden_size=768, num_heads=12,
                       num_query_groups=4, ffn_hidden_size=2048, seq_len=1024, vocab_size=32000,
                       tie_embeddings=False),
    # ~1.1B parameters: TinyLlama's shape (hidden 2048, 22 layers, 32 heads, 4 KV groups)
    "llama-1b": dict(arch="llama", num_layers=22, hidden_size=2048, num_heads=32,
                     num_query_groups=4, ffn_hidden_size=5632, seq_len=2048, vocab_size=32000,
                     tie_embeddings=False),
}


def fill_model(m) -> None:
    """Fill ``m``'s unset (None) keys from its preset, then the switches from its ``arch``.
    Unknown names are left for ``ModelConfig.validate`` to report."""
    for k, v in PRESETS.get(m.preset, {}).items():
        if getattr(m, k) is None:
            setattr(m, k, v)
    for k, v in ARCHS.get(m.arch, {}).items():
        if getattr(m, k) is None:
            setattr(m, k, v)
