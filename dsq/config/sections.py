"""The configuration sections that describe the model, the parallel layout, DeepSpeed, the data
and run tracking, with defaults and a docstring per key (re-exported by
:mod:`dsq.config.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from dsq.config.base import words, check, check_choices, choice  # noqa: F401
from dsq.config.presets import ARCHS, PRESETS  # noqa: F401

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = PACKAGE_DIR / "data" / "corpus" / "shakespeare"


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
              f"model.preset={self.preset!r} is unknown: use {words(sorted(PRESETS))}")
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
    overlap_comm: Optional[bool] = None
    """ZeRO 1/2: reduce gradient buckets during backward, overlapping the communication with
    the compute (a second reduce bucket of memory); null: on GPUs, off on CPUs (no streams to
    overlap on). The same losses either way."""
    reduce_bucket_size: int = 500_000_000
    """ZeRO 1/2: gradient elements reduced per collective (DeepSpeed's default; each bucket
    takes this many elements of memory, two with overlap_comm)."""
    allgather_bucket_size: int = 500_000_000
    """ZeRO 1/2: updated parameter elements gathered per collective after each step (even)."""

    def overlap(self, cuda: bool) -> bool:
        """Whether DeepSpeed overlaps the gradient reduction on a machine with (``cuda``) or
        without GPUs: ``overlap_comm``, or when null, ZeRO 1/2 on GPUs."""
        if self.zero_stage == 0:
            return False
        return cuda if self.overlap_comm is None else bool(self.overlap_comm)

    def validate(self) -> None:
        check(self.reduce_bucket_size > 0 and self.allgather_bucket_size > 0
              and self.allgather_bucket_size % 2 == 0,
              f"deepspeed.reduce_bucket_size={self.reduce_bucket_size} and "
              f"deepspeed.allgather_bucket_size={self.allgather_bucket_size} must be > 0 (the "
              f"allgather one even): DeepSpeed's default is 500000000 for both")
        check(self.zero_stage in (0, 1, 2),
              f"deepspeed.zero_stage={self.zero_stage} is not supported: use 0, 1 or 2")
        check_choices("deepspeed", self)
        check(not (self.precision == "bf16" and self.zero_stage == 0),
              "deepspeed.precision=bf16 needs deepspeed.zero_stage=1 or 2 (DeepSpeed keeps fp32 "
              "master weights and optimizer states only there): set deepspeed.zero_stage=1")


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
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///runs/mlflow.db"
    """MLflow tracking URI: sqlite:///path.db, http://host:port, or file:/path (MLflow's file
    store, which MLflow 3.13+ writes only with MLFLOW_ALLOW_FILE_STORE=true)."""
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

    def validate(self) -> None:
        check(not self.enabled or not file_store_refused(self.uri),
              f"tracking.uri={self.uri} is MLflow's file store, which the installed mlflow "
              f"refuses (maintenance mode since 3.13): use a database, e.g. "
              f"tracking.uri=sqlite:///runs/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true to "
              f"keep writing the file store")


SCHEME_ONLY_URIS = ("databricks", "databricks-uc", "uc")
"""Tracking URIs that name a service without ``scheme://``; any other string without a scheme
is a local path (MLflow's file store)."""


def is_bare_path(uri: str) -> bool:
    """Whether MLflow reads ``uri`` as a local path: no scheme and not a service name."""
    return "://" not in uri and ":" not in uri and uri not in SCHEME_ONLY_URIS


FILE_STORE_GUARD = "3.13.0rc0"
"""The first mlflow that refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true."""


def file_store_refused(uri: str) -> bool:
    """Whether the installed mlflow will refuse ``uri`` as a tracking store: a ``file:`` URI or
    a bare path, with mlflow 3.13+ and without ``MLFLOW_ALLOW_FILE_STORE=true|1``."""
    import os
    from importlib import metadata

    if not (uri.startswith("file:") or is_bare_path(uri)):
        return False
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1"):
        return False
    try:
        from packaging.version import Version

        return Version(metadata.version("mlflow")) >= Version(FILE_STORE_GUARD)
    except Exception:  # no mlflow (tracking then fails on its own) or an unparsable version
        return False
