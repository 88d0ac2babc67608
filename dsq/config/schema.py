"""The configuration schema: one dataclass per section, with defaults and a docstring per key
(the optimizer, quantization and training sections here; the others in
:mod:`dsq.config.sections`; the model presets and architectures in :mod:`dsq.config.presets`).
:mod:`dsq.config` layers YAML files and overrides over it and validates the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from dsq.native.kernel_choice import ALIASES as _KERNEL_ALIASES
from dsq.native.kernel_choice import NAMES as _KERNEL_NAMES
from dsq.config.base import ConfigError, check, check_choices, choice  # noqa: F401
from dsq.config.presets import ARCHS, PRESETS  # noqa: F401  (part of this module's interface)
from dsq.config.sections import (  # noqa: F401  (part of this module's interface)
    DEFAULT_CORPUS,
    PACKAGE_DIR,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    ParallelConfig,
    TrackingConfig,
)


_KERNEL = dict(choices=_KERNEL_NAMES, aliases=tuple(_KERNEL_ALIASES))

@dataclass
class OptimConfig:
    name: str = choice("adamw", ("adamw", "qadamw"))
    """adamw | qadamw (quantized optimizer states, see dsq.optim)."""
    lr: float = 6e-4
    min_lr: float = 0.0
    """The decay of the cosine, wsd and linear schedules ends here."""
    warmup_steps: int = 100
    """Linear warmup from lr / warmup_steps to lr (every schedule)."""
    schedule: str = choice("cosine", ("cosine", "wsd", "linear", "constant"))
    """After the warmup: cosine (to min_lr at train.steps) | wsd (warmup-stable-decay: lr until
    the last decay_fraction of train.steps, then linear to min_lr) | linear (to min_lr) |
    constant (dsq/train/schedule.py)."""
    decay_fraction: float = 0.2
    """wsd: the fraction of train.steps over which the learning rate decays at the end."""
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
    m_format: Optional[str] = None
    """qadamw: m's format by name, null to follow m_bits: int8 | int4 | fp32 | fp8e4m3 |
    fp8e5m2 (fp8: one float8 byte per element, same blocks and scales; reference kernel). It
    sets m_bits; an m_bits other than the default 8 must agree with it."""
    v_format: Optional[str] = None
    """qadamw: v's format by name, as m_format (fp8: a positive v never stores 0, see
    docs/optimizer.md)."""
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
        check(0 < self.decay_fraction <= 1,
              f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")
        check(0 < self.beta1 < 1 and 0 < self.beta2 < 1,
              "optim.beta1 and optim.beta2 must be in (0, 1)")
        check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0")
        if self.name != "qadamw":
            return
        from dsq.optim.formats import FP8, format_bits, resolve_format

        for k in ("m", "v"):  # the format wins over the default bits, and sets them
            name = getattr(self, f"{k}_format")
            if name is None:
                continue
            try:
                name = resolve_format(getattr(self, f"{k}_bits"), name, f"optim.{k}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            setattr(self, f"{k}_bits", format_bits(name))
        fp8 = any(getattr(self, f"{k}_format") in FP8 for k in ("m", "v"))
        check(not (fp8 and self.kernel in ("native", "cpp")),
              "optim.kernel=native does not handle fp8 moments (optim.m_format / "
              "optim.v_format): set optim.kernel=auto or reference")
        check(not (self.v_signed and self.v_format in FP8),
              "optim.v_signed=true applies to an integer v: drop it or set optim.v_format to "
              "int8 or int4")
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
    """Weight format, e.g. "int8:channel", "fp8e4m3:channel", "mxfp8", "nvfp4:2d", or a mapping
    {bits, granularity, ...}; null = off (docs/quantization.md)."""
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
    compute: str = choice("simulate", ("simulate", "int8", "fp8"))
    """simulate: quantize-dequantize, floating-point GEMMs (the study's method); int8: integer
    GEMMs with int32 accumulation where the formats allow it; fp8: torch._scaled_mm FP8 GEMMs on
    CUDA GPUs of compute capability 8.9+ for FP8 tensor/row formats (simulated elsewhere)."""
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
    async_ckpt: Optional[bool] = None
    """Write checkpoints on the cadence in a background thread: training waits only while the
    state is copied to CPU memory (dsq/run/async_ckpt.py); the last one is written before the
    run ends, and a failed write fails the run at the next save or the end. Default (null): on
    when training runs on GPUs (the write uses host CPU the training leaves idle), off on
    CPUs (where the write competes with training for the cores)."""
    log_every: int = 10
    """Steps between MLflow metric logs, and between progress lines when stderr is not a
    terminal (SLURM logs, which also get the first and last step; a terminal shows a progress
    bar)."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device, for the MFU in the progress line, MLflow and summary.json;
    null: the bf16 dense peak of a known GPU (dsq/train/throughput.py), none on CPUs (no MFU)."""
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
        check(self.peak_flops is None or self.peak_flops > 0,
              f"train.peak_flops={self.peak_flops} must be > 0 (FLOP/s of one device) or null")
        check(self.eval_samples >= 1, f"train.eval_samples={self.eval_samples} must be >= 1")
        check(self.keep_ckpts >= 1, f"train.keep_ckpts={self.keep_ckpts} must be >= 1")


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
                    self.data, self.train, self.tracking):
            sec.validate()
        m, p, t = self.model, self.parallel, self.train
        for key, n in (("model.num_heads", m.num_heads), ("model.ffn_hidden_size",
                                                         m.ffn_hidden_size),
                       ("model.num_query_groups", m.num_query_groups or m.num_heads),
                       ("model.vocab_size", m.vocab_size)):
            check(n % p.tp == 0, f"parallel.tp={p.tp} does not divide {key}={n}: choose a tp "
                  f"that divides it")
        if p.tp > 1:
            self._check_blocks_in_shards()
        if world_size is not None:
            check(world_size % p.tp == 0,
                  f"parallel.tp={p.tp} does not divide the world size {world_size}: "
                  f"launch a multiple of tp processes or change parallel.tp")
            dp = world_size // p.tp
            check(t.global_batch % (t.micro_batch * dp) == 0,
                  f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch x "
                  f"data-parallel size = {t.micro_batch} x {dp}: change train.global_batch or "
                  f"train.micro_batch")

    def _check_blocks_in_shards(self) -> None:
        """Blocks of floating-point formats never straddle a tensor-parallel shard: the
        per-rank widths of the dimensions each operand's blocks lie along must be multiples of
        the block (weights: in of proj/fc2 and, for their column copies, out of qkv/fc1/lm_head;
        activations: in of proj/fc2; gradients: out of qkv/fc1/lm_head)."""
        from dsq.quant import QuantFormat

        m, tp, q = self.model, self.parallel.tp, self.quant
        heads, groups = m.num_heads, m.num_query_groups or m.num_heads
        ins = {"proj in": m.hidden_size, "fc2 in": m.ffn_hidden_size}
        outs = {"qkv out": (heads + 2 * groups) * (m.hidden_size // heads),
                "fc1 out": m.ffn_hidden_size}
        if q.lm_head:
            outs["lm_head out"] = m.vocab_size
        dims = {"weight": {**ins, **outs}, "activation": ins, "grad": outs}
        for key, where in dims.items():
            fmt = QuantFormat.parse(getattr(q, key))
            n = getattr(fmt, "block_size", None) if fmt is not None and fmt.is_float else None
            bad = {k: v // tp for k, v in where.items() if n and (v // tp) % n}
            check(not bad, f"quant.{key}={fmt}: its {n}-element blocks would straddle the "
                  f"tensor-parallel shards at parallel.tp={tp} ("
                  + ", ".join(f"{k} {w} per rank" for k, w in bad.items())
                  + "): choose a block that divides them, or a smaller parallel.tp")
