"""The configuration schema: one dataclass per section, with defaults and a docstring per key,
and the architecture presets. :mod:`dsq.config` layers YAML files and overrides over it and
validates the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CORPUS = PACKAGE_DIR / "data" / "corpus" / "shakespeare"


# ----------------------------------------------------------------------------- presets
# Architecture presets. Fields set explicitly in YAML or overrides win over the preset.
PRESETS = {
    # fits a CPU unit test: ~0.6M parameters
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=4, ffn_hidden_size=512,
                 seq_len=128, vocab_size=2048, tie_embeddings=False),
    # ~9M parameters: CPU studies
    "small": dict(num_layers=6, hidden_size=256, num_heads=8, ffn_hidden_size=1024,
                  seq_len=256, vocab_size=8192, tie_embeddings=False),
    # the study's model (GPT-2 small, 124M with the GPT-2 vocabulary)
    "gpt2-small": dict(num_layers=12, hidden_size=768, num_heads=12, ffn_hidden_size=3072,
                       seq_len=1024, vocab_size=50304, tie_embeddings=True),
    "gpt2-medium": dict(num_layers=24, hidden_size=1024, num_heads=16, ffn_hidden_size=4096,
                        seq_len=1024, vocab_size=50304, tie_embeddings=True),
}


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """One of tiny | small | gpt2-small | gpt2-medium; fills every field left unset (null)."""
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    seq_len: Optional[int] = None
    """Tokens per training sequence (also the number of learned positions)."""
    vocab_size: Optional[int] = None
    """Size of the sentencepiece vocabulary trained by ``dsq prepare``."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding with the LM head (GPT-2 does)."""
    dropout: float = 0.0
    """Hidden and attention dropout."""
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size; data-parallel size is world_size / tp."""
    timeout_s: int = 600
    """Collective timeout: a rank stuck this long (a hung peer) fails the job instead of hanging."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    """ZeRO stage 0, 1 or 2."""
    precision: str = "fp32"
    """fp32 | bf16 (bf16 weights and activations, fp32 master weights and optimizer states)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | qadamw (quantized optimizer states, see dsq.optim)."""
    lr: float = 6e-4
    min_lr: float = 0.0
    """Cosine decay ends here."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    """Applied to weights of linear layers and embeddings, never to biases and norms."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    m_bits: int = 8
    """qadamw: bits of the first moment (signed), 4 or 8; 32 keeps m in fp32."""
    v_bits: int = 8
    """qadamw: bits of the second moment (unsigned), 8 (4 allowed, with a warning); 32 keeps v
    in fp32. At most one of m_bits and v_bits may be 32."""
    block_size: Any = 256
    """qadamw: elements per scale block, "tensor" for one scale per parameter, or "row" for one
    per row of a weight (the study's per-channel state scales)."""
    quantize: str = "linear"
    """qadamw: which parameters keep quantized states: linear | linear+embedding | all."""
    v_domain: str = "linear"
    """qadamw: quantize v linearly (the study) or its square root (sqrt: finer for small v)."""
    v_signed: bool = False
    """qadamw: quantize v with the signed symmetric quantizer, as the study's code does (half the
    levels, small v flushed to 0): it diverges; kept to show why dsq's v is unsigned."""
    kernel: str = "auto"
    """qadamw update kernel: auto (native where a C compiler exists, else reference) | native
    (C/OpenMP, CPU) | reference (PyTorch, any device) | compile (torch.compile); ``cpp`` and
    ``eager`` are the old names of native and reference. ``$DSQ_OPTIM_KERNEL`` overrides it."""


@dataclass
class QuantConfig:
    weight: Any = None
    """Weight format, e.g. "int8:channel", or a mapping {bits, granularity, ...}; null = off."""
    activation: Any = None
    """Activation (linear-input) format, e.g. "int8:token"; null = off."""
    grad: Any = None
    """Output-gradient format, e.g. "int8:token"; null = off."""
    grad_gemms: str = "weight"
    """Backward GEMMs that see the quantized gradient: weight | input | both."""
    lm_head: bool = False
    """Quantize the LM head too (the study does)."""
    layers: List[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns over module names selecting quantized linears."""
    exclude: List[str] = field(default_factory=list)
    """fnmatch patterns over module names excluded from quantization."""
    check_finite: bool = False
    """Stop with an error naming the operand when a quantizer sees inf/nan (one sync each)."""
    compute: str = "simulate"
    """simulate: quantize-dequantize, floating-point GEMMs (the study's method); int8: integer
    GEMMs with int32 accumulation where the formats allow it."""
    kernel: str = "auto"
    """Quantization and rescale kernels of compute: int8: auto (native on CPU, Triton through
    torch.compile on CUDA where installed, else reference) | native (C/OpenMP, CPU) | reference
    (PyTorch, any device) | compile (torch.compile). ``$DSQ_QUANT_KERNEL`` overrides it."""
    backward_operands: str = "quantized"
    """quantized: backward GEMMs use the quantized W and X (the gradient of the quantized
    forward); full: W and X in full precision, as the study's code does (keeps X for backward
    in its own dtype; with compute: int8 the backward GEMMs then run in floating point)."""


@dataclass
class DataConfig:
    train: List[str] = field(default_factory=lambda: [str(DEFAULT_CORPUS / "train")])
    """Text files or folders, .jsonl/.json or .parquet files, or a Hub dataset name."""
    val: List[str] = field(default_factory=lambda: [str(DEFAULT_CORPUS / "val")])
    """Validation text, as ``train``; empty (``[]``) with ``val_fraction`` > 0."""
    val_fraction: float = 0.0
    """Hold out this fraction of the training documents (a seeded random split, the same on
    every machine) as the validation set, for corpora without one (OpenWebText); needs
    ``data.val: []``."""
    text_field: str = "text"
    """Column holding the text in JSON lines / Parquet / Hub data."""
    tokenizer: Optional[str] = None
    """Existing sentencepiece .model to use; null trains one on the training data."""
    cache_dir: str = "runs/data_cache"
    """Where prepared (tokenized, packed) data is written, keyed by a hash of its inputs."""


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch: int = 8
    """Sequences per rank per forward/backward."""
    global_batch: int = 16
    """Sequences per optimizer step over all data-parallel ranks (with accumulation)."""
    eval_every: int = 50
    eval_samples: int = 64
    """Validation sequences per estimate (a fixed, evenly spread subset; all if fewer)."""
    ckpt_every: int = 100
    keep_ckpts: int = 2
    """Complete checkpoints kept on disk (older ones are deleted)."""
    log_every: int = 1
    """Steps between MLflow metric logs, and between progress lines when stderr is not a
    terminal (SLURM logs; a terminal shows a progress bar)."""
    spike_factor: float = 1.25
    """Loss-spike guard: a step whose training loss exceeds this factor x the median of the
    previous train.spike_window steps prints a warning and logs train/loss_spike (the ratio)
    to MLflow; summary.json lists the steps under loss_spikes. 0 disables."""
    spike_window: int = 20
    """Steps whose median loss the spike guard compares with."""
    out_dir: str = "runs/tiny"
    seed: int = 1234
    progress: bool = True
    """Show a progress bar on rank 0."""
    reshard: str = "off"
    """Resuming a ZeRO checkpoint written by another data-parallel size: off (stop and say how
    to convert it) | auto (convert it in place first, the original kept beside it)."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///runs/mlflow.db"
    """MLflow tracking URI: sqlite:///path.db, file:/path, or http://host:port."""
    experiment: str = "dsq"
    run_name: Optional[str] = None
    """MLflow run name; defaults to the name of train.out_dir."""
    recipe: Optional[str] = None
    """Recipe tag for comparisons; defaults to the names of the configs/recipes/ files given
    (joined with +), or "baseline" when none is."""
    close_timeout_s: float = 60.0
    """At the end of a run, wait at most this long for MLflow to take queued metrics."""
    system_metrics: bool = True
    """Log CPU/GPU/memory utilisation as MLflow system metrics."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
