"""The configuration schema: one dataclass per section, with defaults and a docstring per key
(the model presets and architectures: :mod:`dsq.config.presets`). :mod:`dsq.config` layers YAML
files and overrides over it and validates the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional, Sequence

from dsq.native.kernel_choice import ALIASES as _KERNEL_ALIASES
from dsq.native.kernel_choice import NAMES as _KERNEL_NAMES
from dsq.config.presets import ARCHS, PRESETS  # noqa: F401  (part of this module's interface)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = PACKAGE_DIR / "data" / "corpus" / "shakespeare"


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the fix."""


def check(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


def choice(default: str, choices: Sequence[str], aliases: Sequence[str] = ()):
    """A string field that takes one of ``choices`` (or an old name in ``aliases``); the
    section's :func:`check_choices` refuses anything else, naming the key and the choices."""
    return field(default=default, metadata={"choices": tuple(choices), "aliases": tuple(aliases)})


def _words(names: Sequence) -> str:
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_choices(section: str, obj) -> None:
    """Every :func:`choice` field of the dataclass ``obj`` holds one of its values."""
    for f in fields(obj):
        allowed = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if allowed and value not in allowed + f.metadata.get("aliases", ()):
            raise ConfigError(f"{section}.{f.name}={value!r} is unknown: use {_words(allowed)}")


_KERNEL = dict(choices=_KERNEL_NAMES, aliases=tuple(_KERNEL_ALIASES))


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """A size (dsq/config/presets.py): tiny | small | gpt2-small | gpt2-medium | llama-tiny |
    llama-small | llama-150m | llama-1b; fills every field left unset (null)."""
    arch: Optional[str] = field(default=None, metadata={"choices": tuple(ARCHS)})
    """gpt2 | llama: fills the switches norm, mlp, positions and bias left unset (null);
    null: the preset's."""
    norm: Optional[str] = field(default=None, metadata={"choices": ("layernorm", "rmsnorm")})
    """layernorm | rmsnorm."""
    mlp: Optional[str] = field(default=None, metadata={"choices": ("gelu", "swiglu")})
    """gelu (fc1 -> GELU -> fc2) | swiglu (silu(gate) * up -> fc2; gate and up are
    ffn_hidden_size wide each, fused in fc1)."""
    positions: Optional[str] = field(default=None, metadata={"choices": ("learned", "rope")})
    """learned (absolute position embeddings, seq_len of them) | rope (rotary, as megatron)."""
    rope_base: float = 10000.0
    """Base period of the rotary frequencies (positions: rope)."""
    num_query_groups: Optional[int] = None
    """Key/value heads of grouped-query attention (dividing num_heads); null: num_heads."""
    bias: Optional[bool] = None
    """Biases on the linears (never on the LM head)."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm / RMSNorm."""
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

    def validate(self) -> None:
        check(self.preset in PRESETS,
              f"model.preset={self.preset!r} is unknown: use {_words(sorted(PRESETS))}")
        check_choices("model", self)
        for k in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "seq_len",
                  "vocab_size"):
            check(getattr(self, k) > 0, f"model.{k}={getattr(self, k)} must be positive")
        check(self.hidden_size % self.num_heads == 0,
              f"model.num_heads={self.num_heads} does not divide model.hidden_size="
              f"{self.hidden_size}: choose heads that divide the hidden size")
        g = self.num_query_groups
        check(g is None or (g > 0 and self.num_heads % g == 0),
              f"model.num_query_groups={g} does not divide model.num_heads={self.num_heads}: "
              f"choose key/value groups that divide the heads (null: one per head)")
        check(self.positions != "rope" or (self.hidden_size // self.num_heads) % 2 == 0,
              f"model.positions=rope needs an even head dimension; hidden_size/num_heads = "
              f"{self.hidden_size // self.num_heads}: change model.num_heads")
        check(self.rope_base > 1, f"model.rope_base={self.rope_base} must be > 1")
        check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        check(self.vocab_size >= 64, f"model.vocab_size={self.vocab_size} is too small: use at "
              f"least 64")
        check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size; data-parallel size is world_size / tp."""
    timeout_s: int = 600
    """Collective timeout: a rank stuck this long (a hung peer) fails the job instead of hanging."""

    def validate(self) -> None:
        check(self.tp >= 1, f"parallel.tp={self.tp} must be >= 1")
        check(self.timeout_s >= 10, f"parallel.timeout_s={self.timeout_s} must be >= 10 seconds")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    """ZeRO stage 0, 1 or 2."""
    precision: str = choice("fp32", ("fp32", "bf16"))
    """fp32 | bf16 (bf16 weights and activations, fp32 master weights and optimizer states)."""

    def validate(self) -> None:
        check(self.zero_stage in (0, 1, 2),
              f"deepspeed.zero_stage={self.zero_stage} is not supported: use 0, 1 or 2")
        check_choices("deepspeed", self)
        check(not (self.precision == "bf16" and self.zero_stage == 0),
              "deepspeed.precision=bf16 needs deepspeed.zero_stage=1 or 2 (DeepSpeed keeps fp32 "
              "master weights and optimizer states only there): set deepspeed.zero_stage=1")


@dataclass
class OptimConfig:
    name: str = choice("adamw", ("adamw", "qadamw"))
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
    quantize: str = choice("linear", ("linear", "linear+embedding", "all"))
    """qadamw: which parameters keep quantized states: linear | linear+embedding | all."""
    v_domain: str = choice("linear", ("linear", "sqrt"))
    """qadamw: quantize v linearly (the study) or its square root (sqrt: finer for small v)."""
    v_signed: bool = False
    """qadamw: quantize v with the signed symmetric quantizer, as the study's code does (half the
    levels, small v flushed to 0): it diverges; kept to show why dsq's v is unsigned."""
    kernel: str = field(default="auto", metadata=_KERNEL)
    """qadamw update kernel: auto | native | reference | compile (dsq.native.kernel_choice; ``cpp`` and
    ``eager`` are old names of native and reference). ``$DSQ_OPTIM_KERNEL`` wins over it."""

    def validate(self) -> None:
        check_choices("optim", self)
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr,
              f"optim.lr={self.lr} must be > 0 and optim.min_lr in [0, lr]")
        check(0 <= self.warmup_steps, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        check(0 < self.beta1 < 1 and 0 < self.beta2 < 1,
              "optim.beta1 and optim.beta2 must be in (0, 1)")
        check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0")
        if self.name != "qadamw":
            return
        for k in ("m_bits", "v_bits"):
            check(getattr(self, k) in (4, 8, 32),
                  f"optim.{k}={getattr(self, k)} is not supported: use 8 or 4, or 32 to keep "
                  f"{k[0]} in fp32")
        check(not (self.m_bits == 32 and self.v_bits == 32),
              "optim.m_bits=32 and optim.v_bits=32 quantize neither moment: use optim.name=adamw "
              "for fp32 AdamW")
        from dsq.optim.layout import check_block

        try:
            check_block(self.block_size)
        except ValueError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("optim.") else f"optim.{msg}") from None
        check(not (self.v_domain == "sqrt" and self.v_bits == 32),
              "optim.v_domain=sqrt applies to a quantized v: with optim.v_bits=32 set "
              "optim.v_domain=linear")
        check(not self.v_signed or (self.v_bits != 32 and self.v_domain == "linear"),
              "optim.v_signed=true applies to a linearly quantized v: set optim.v_bits to 8 or 4 "
              "and optim.v_domain=linear")


@dataclass
class QuantConfig:
    weight: Any = None
    """Weight format, e.g. "int8:channel", or a mapping {bits, granularity, ...}; null = off."""
    activation: Any = None
    """Activation (linear-input) format, e.g. "int8:token"; null = off."""
    grad: Any = None
    """Output-gradient format, e.g. "int8:token"; null = off."""
    grad_gemms: str = choice("weight", ("weight", "input", "both"))
    """Backward GEMMs that see the quantized gradient: weight | input | both."""
    lm_head: bool = False
    """Quantize the LM head too (the study does)."""
    layers: List[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns over module names selecting quantized linears."""
    exclude: List[str] = field(default_factory=list)
    """fnmatch patterns over module names excluded from quantization."""
    check_finite: bool = False
    """Stop with an error naming the operand when a quantizer sees inf/nan (one sync each)."""
    compute: str = choice("simulate", ("simulate", "int8"))
    """simulate: quantize-dequantize, floating-point GEMMs (the study's method); int8: integer
    GEMMs with int32 accumulation where the formats allow it."""
    kernel: str = field(default="auto", metadata=_KERNEL)
    """Quantization and rescale kernels of compute: int8: auto | native | reference | compile
    (dsq.native.kernel_choice). ``$DSQ_QUANT_KERNEL`` wins over it."""
    backward_operands: str = choice("quantized", ("quantized", "full"))
    """quantized: backward GEMMs use the quantized W and X (the gradient of the quantized
    forward); full: W and X in full precision, as the study's code does (keeps X for backward
    in its own dtype; with compute: int8 the backward GEMMs then run in floating point)."""

    def validate(self) -> None:
        """Choices, and every operand's format and the recipe they make (dsq.quant)."""
        check_choices("quant", self)
        from dsq.quant import LinearQuant, QuantFormat

        for name in ("weight", "activation", "grad"):
            try:
                QuantFormat.parse(getattr(self, name))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"quant.{name}: {e}") from None
        try:
            LinearQuant.from_config(self)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"quant: {e}") from None


@dataclass
class DataConfig:
    train: List[str] = field(default_factory=lambda: [str(DEFAULT_CORPUS / "train")])
    """Text files or folders (.txt, .txt.xz), .jsonl/.json or .parquet files, ``dsq:NAME`` (a
    corpus shipped with dsq: dsq:shakespeare_full/train), or a Hub dataset, OWNER/NAME or
    OWNER/NAME:CONFIG (docs/data-sources.md)."""
    val: List[str] = field(default_factory=lambda: [str(DEFAULT_CORPUS / "val")])
    """Validation text, as ``train``; empty (``[]``) with ``val_fraction`` > 0."""
    val_fraction: float = 0.0
    """Hold out this fraction of the training documents (a seeded hash of each document's
    index: the same split on every machine, about this fraction) as the validation set, for corpora without one (OpenWebText); needs
    ``data.val: []``."""
    text_field: str = "text"
    """Column holding the text in JSON lines / Parquet / Hub data."""
    tokenizer: Optional[str] = None
    """Existing sentencepiece .model to use; null trains one on the training data."""
    cache_dir: str = "runs/data_cache"
    """Where prepared (tokenized, packed) data is written, keyed by a hash of its inputs."""
    workers: int = 0
    """Tokenizer processes of ``dsq prepare`` (0: the cores of the node; --workers N)."""
    tokenizer_sample_bytes: int = 1_000_000_000
    """The tokenizer trains on a seeded sample of at most this much of the training data."""
    prepare_limit_bytes: int = 256_000_000
    """``dsq train`` prepares unprepared data itself up to this size of sources; above it (or
    for a Hub dataset) it stops and says to run ``dsq prepare`` as its own job. 0: no limit."""

    def validate(self) -> None:
        check(bool(self.train), "data.train is empty: give at least one file or folder")
        check(min(self.workers, self.tokenizer_sample_bytes, self.prepare_limit_bytes) >= 0,
              "data.workers, data.tokenizer_sample_bytes and data.prepare_limit_bytes must be "
              ">= 0")
        check(0.0 <= self.val_fraction < 0.5,
              f"data.val_fraction={self.val_fraction} must be in [0, 0.5)")
        check(not (self.val_fraction > 0 and self.val),
              "data.val and data.val_fraction are both set: give data.val: [] to hold out "
              "data.val_fraction of the training documents, or data.val_fraction=0")
        check(bool(self.val) or self.val_fraction > 0,
              "data.val is empty: give at least one file or folder, or a data.val_fraction > 0")


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
    max_skipped_steps: int = 10
    """Stop the run (exit 1) after this many steps in a row with a non-finite loss or gradient
    norm or an update DeepSpeed skipped, before any checkpoint of them (dsq/train/health.py)."""
    out_dir: str = "runs/tiny"
    seed: int = 1234
    progress: bool = True
    """Show a progress bar on rank 0."""
    recompute: str = choice("none", ("none", "selective", "full"))
    """Activation recompute: none | selective (each layer's core attention) | full (each layer
    keeps only its input); the same losses and gradients, less memory, more compute."""
    reshard: str = choice("off", ("off", "auto"))
    """Resuming a ZeRO checkpoint written by another data-parallel size: off (stop and say how
    to convert it) | auto (convert it in place first, the original kept beside it)."""

    def validate(self) -> None:
        check_choices("train", self)
        check(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        check(self.micro_batch >= 1, f"train.micro_batch={self.micro_batch} must be >= 1")
        check(self.global_batch % self.micro_batch == 0,
              f"train.global_batch={self.global_batch} is not a multiple of "
              f"train.micro_batch={self.micro_batch}: make it micro_batch x data-parallel size "
              f"x accumulation steps")
        check(self.eval_every >= 0 and self.ckpt_every >= 0 and self.log_every >= 1,
              "train.eval_every and train.ckpt_every must be >= 0 (0 = only at the end), "
              "train.log_every >= 1")
        check(self.spike_factor == 0 or self.spike_factor > 1,
              f"train.spike_factor={self.spike_factor} must be > 1 (or 0 to disable the spike "
              f"guard)")
        check(self.spike_window >= 2 and self.max_skipped_steps >= 1, "train.spike_window must "
              "be >= 2 and train.max_skipped_steps >= 1")
        check(self.eval_samples >= 1, f"train.eval_samples={self.eval_samples} must be >= 1")
        check(self.keep_ckpts >= 1, f"train.keep_ckpts={self.keep_ckpts} must be >= 1")


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

    def validate(self, world_size: Optional[int] = None) -> None:
        """Every section's checks, then those across sections; ``world_size`` (when known)
        checks the parallel layout too. Side-effect free: no process group, file or data."""
        for sec in (self.model, self.parallel, self.deepspeed, self.optim, self.quant,
                    self.data, self.train):
            sec.validate()
        m, p, t = self.model, self.parallel, self.train
        for key, n in (("model.num_heads", m.num_heads), ("model.ffn_hidden_size",
                                                         m.ffn_hidden_size),
                       ("model.num_query_groups", m.num_query_groups or m.num_heads),
                       ("model.vocab_size", m.vocab_size)):
            check(n % p.tp == 0, f"parallel.tp={p.tp} does not divide {key}={n}: choose a tp "
                  f"that divides it")
        if world_size is not None:
            check(world_size % p.tp == 0,
                  f"parallel.tp={p.tp} does not divide the world size {world_size}: "
                  f"launch a multiple of tp processes or change parallel.tp")
            dp = world_size // p.tp
            check(t.global_batch % (t.micro_batch * dp) == 0,
                  f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch x "
                  f"data-parallel size = {t.micro_batch} x {dp}: change train.global_batch or "
                  f"train.micro_batch")
