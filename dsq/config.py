"""Typed configuration: dataclasses are the schema (:mod:`dsq.schema`), YAML files and ``a.b=c``
overrides are data.

Precedence (later wins): dataclass defaults < model preset < YAML files in the order given <
command-line ``key.sub=value`` overrides. Unknown keys, wrong types and inconsistent values
raise :class:`ConfigError` naming the key and the fix, before any process group starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, fields
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dsq.schema import (  # noqa: F401  (the schema is part of this module's interface)
    DEFAULT_CORPUS,
    PACKAGE_DIR,
    PRESETS,
    Config,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    QuantConfig,
    TrackingConfig,
    TrainConfig,
)


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the fix."""


# ----------------------------------------------------------------------------- loading
def _short(e: OmegaConfBaseException) -> str:
    return str(e).splitlines()[0]


def _schema_fields() -> dict:
    """``{"section.key": dataclass field}`` of every config key (``field.type`` resolved)."""
    import typing

    out = {}
    for sec_name, sec_type in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(sec_type)
        for f in fields(sec_type):
            out[f"{sec_name}.{f.name}"] = _Field(f, hints[f.name])
    return out


class _Field:
    """A dataclass field with its annotation resolved (``from __future__ import annotations``)."""

    def __init__(self, f, tp):
        self.name, self.default, self.type = f.name, f.default, tp


def _is_list(tp) -> bool:
    return getattr(tp, "__origin__", None) in (list, List)


def _type_and_example(key: str):
    """(expected type in words, an example override) of a key, for error messages."""
    f = _schema_fields().get(key)
    if f is None:
        return None, None
    tp = f.type
    if _is_list(tp):
        return "a list of strings (or one string)", f"{key}=/path/to/texts or {key}=[a,b]"
    if getattr(tp, "__origin__", None) is not None:  # Optional[X]
        tp = next(a for a in tp.__args__ if a is not type(None))
    default = f.default if f.default is not MISSING else None
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        example = default if default is not None else {int: 1024, float: 0.5, bool: "true",
                                                      str: "name"}[tp]
        if isinstance(example, bool):
            example = str(example).lower()
        return names[tp], f"{key}={example}"
    return None, None


def _wrap_scalars(layer, origin: str):
    """One plain value for a list-valued key (``data.train=/path``) becomes a one-item list."""
    for key, f in _schema_fields().items():
        if not _is_list(f.type):
            continue
        sec, name = key.split(".")
        node = layer.get(sec) if OmegaConf.is_dict(layer) else None
        if not OmegaConf.is_dict(node) or name not in node:
            continue
        value = node[name]
        if OmegaConf.is_dict(value):
            raise ConfigError(f"{origin}: {key}={OmegaConf.to_container(value)!r} is not a list "
                              f"of strings (or one string): give e.g. {key}=/path/to/texts or "
                              f"{key}=[a,b]")
        if value is not None and not OmegaConf.is_list(value):
            node[name] = [value]
    return layer


def _merge_error(origin: str, e: OmegaConfBaseException, layer) -> ConfigError:
    """OmegaConf's error rewritten to name the key, the expected type and an example."""
    from omegaconf.errors import ConfigKeyError

    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError) or key not in _schema_fields():
        return ConfigError(f"{origin}: key '{key}' is not a config key: fix its name (see the "
                           f"fields of dsq/schema.py, or `dsq config` for every key)")
    expected, example = _type_and_example(key)
    try:
        got = OmegaConf.select(layer, key)
    except OmegaConfBaseException:
        got = None
    got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
    if expected is None:
        return ConfigError(f"{origin}: key '{key}': {_short(e)}. Fix the value (see the fields "
                           f"of dsq/schema.py).")
    return ConfigError(f"{origin}: {key}={got!r} is not {expected}: give e.g. {example}")


def load_config(paths: Sequence[str] = (), overrides: Sequence[str] = (),
                world_size: Optional[int] = None) -> Config:
    """Layer YAML files and ``a.b=c`` overrides over the schema, fill the preset, validate.

    A list-valued key (``data.train``, ``data.val``, ``quant.layers``, ``quant.exclude``) also
    takes one plain value, in YAML and on the command line: ``data.train=/path`` is
    ``data.train=[/path]``.
    """
    schema = OmegaConf.structured(Config)
    layers = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"config file {p!r} does not exist: give the path of a YAML file "
                              f"(see configs/)")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as e:  # yaml syntax errors
            raise ConfigError(f"config file {p!r} is not valid YAML: {str(e).splitlines()[0]}")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key.sub=value "
                              f"(e.g. train.steps=100)")
    if overrides:
        try:
            layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad override: {_short(e)}")
    merged = schema
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, _wrap_scalars(layer, origin))
        except OmegaConfBaseException as e:
            raise _merge_error(origin, e, layer) from None
    cfg: Config = OmegaConf.to_object(merged)
    _fill_preset(cfg)
    if cfg.tracking.recipe is None:
        cfg.tracking.recipe = "+".join(filter(None, map(recipe_name, paths))) or "baseline"
    validate(cfg, world_size)
    return cfg


def recipe_name(path) -> str | None:
    """A recipe file's name: its path under the last ``recipes`` folder without the suffix
    (``configs/recipes/w8a8g8.yaml`` -> ``w8a8g8``, ``.../recipes/study/w8a8g8.yaml`` ->
    ``study/w8a8g8``); None for a file outside a ``recipes`` folder."""
    parts = Path(path).with_suffix("").parts
    if "recipes" not in parts[:-1]:
        return None
    i = len(parts) - 1 - parts[::-1].index("recipes")
    return "/".join(parts[i + 1:])


def _fill_preset(cfg: Config) -> None:
    m = cfg.model
    if m.preset not in PRESETS:
        raise ConfigError(f"model.preset={m.preset!r} is unknown: use one of {sorted(PRESETS)}")
    for k, v in PRESETS[m.preset].items():
        if getattr(m, k) is None:
            setattr(m, k, v)


KERNEL_CHOICES = ("auto", "native", "reference", "compile", "cpp", "eager")
"""``quant.kernel`` / ``optim.kernel``; ``cpp`` and ``eager`` are old names of native and
reference."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-field checks. ``world_size`` (when known) checks the parallel layout too."""
    m, t, p, ds, o, q = cfg.model, cfg.train, cfg.parallel, cfg.deepspeed, cfg.optim, cfg.quant
    for k in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "seq_len", "vocab_size"):
        _check(getattr(m, k) > 0, f"model.{k}={getattr(m, k)} must be positive")
    _check(m.hidden_size % m.num_heads == 0,
           f"model.num_heads={m.num_heads} does not divide model.hidden_size={m.hidden_size}: "
           f"choose heads that divide the hidden size")
    _check(m.vocab_size >= 64, f"model.vocab_size={m.vocab_size} is too small: use at least 64")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    _check(p.tp >= 1, f"parallel.tp={p.tp} must be >= 1")
    _check(p.timeout_s >= 10, f"parallel.timeout_s={p.timeout_s} must be >= 10 seconds")
    _check(m.num_heads % p.tp == 0,
           f"parallel.tp={p.tp} does not divide model.num_heads={m.num_heads}: "
           f"choose a tp that divides the number of heads")
    _check(m.ffn_hidden_size % p.tp == 0,
           f"parallel.tp={p.tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
    _check(ds.zero_stage in (0, 1, 2),
           f"deepspeed.zero_stage={ds.zero_stage} is not supported: use 0, 1 or 2")
    _check(ds.precision in ("fp32", "bf16"),
           f"deepspeed.precision={ds.precision!r} is not supported: use fp32 or bf16")
    _check(not (ds.precision == "bf16" and ds.zero_stage == 0),
           "deepspeed.precision=bf16 needs deepspeed.zero_stage=1 or 2 (DeepSpeed keeps fp32 "
           "master weights and optimizer states only there): set deepspeed.zero_stage=1")
    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _check(t.micro_batch >= 1, f"train.micro_batch={t.micro_batch} must be >= 1")
    _check(t.global_batch % t.micro_batch == 0,
           f"train.global_batch={t.global_batch} is not a multiple of "
           f"train.micro_batch={t.micro_batch}: make it micro_batch x data-parallel size x "
           f"accumulation steps")
    _check(t.eval_every >= 0 and t.ckpt_every >= 0 and t.log_every >= 1,
           "train.eval_every and train.ckpt_every must be >= 0 (0 = only at the end), "
           "train.log_every >= 1")
    _check(t.spike_factor == 0 or t.spike_factor > 1,
           f"train.spike_factor={t.spike_factor} must be > 1 (or 0 to disable the spike guard)")
    _check(t.spike_window >= 2, f"train.spike_window={t.spike_window} must be >= 2")
    _check(t.eval_samples >= 1, f"train.eval_samples={t.eval_samples} must be >= 1")
    _check(m.vocab_size % p.tp == 0,
           f"parallel.tp={p.tp} does not divide model.vocab_size={m.vocab_size}: "
           f"choose a vocab size that is a multiple of tp")
    _check(t.reshard in ("off", "auto"), f"train.reshard={t.reshard!r}: use off or auto")
    _check(t.keep_ckpts >= 1, f"train.keep_ckpts={t.keep_ckpts} must be >= 1")
    _check(o.name in ("adamw", "qadamw"), f"optim.name={o.name!r} is unknown: use adamw or qadamw")
    _check(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"optim.lr={o.lr} must be > 0 and optim.min_lr "
           f"in [0, lr]")
    _check(0 <= o.warmup_steps, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(0 < o.beta1 < 1 and 0 < o.beta2 < 1, "optim.beta1 and optim.beta2 must be in (0, 1)")
    if o.name == "qadamw":
        _check(o.m_bits in (4, 8, 32),
               f"optim.m_bits={o.m_bits} is not supported: use 8 or 4, or 32 to keep m in fp32")
        _check(o.v_bits in (4, 8, 32),
               f"optim.v_bits={o.v_bits} is not supported: use 8 or 4, or 32 to keep v in fp32")
        _check(not (o.m_bits == 32 and o.v_bits == 32),
               "optim.m_bits=32 and optim.v_bits=32 quantize neither moment: use optim.name=adamw "
               "for fp32 AdamW")
        _check(o.block_size in ("tensor", "row") or (
            isinstance(o.block_size, int) and o.block_size >= 2 and o.block_size % 2 == 0),
               f"optim.block_size={o.block_size!r}: use an even number of elements, \"tensor\" "
               f"or \"row\"")
        _check(o.quantize in ("linear", "linear+embedding", "all"),
               f"optim.quantize={o.quantize!r}: use linear, linear+embedding or all")
        _check(o.v_domain in ("linear", "sqrt"), f"optim.v_domain={o.v_domain!r}: use linear or sqrt")
        _check(not (o.v_domain == "sqrt" and o.v_bits == 32),
               "optim.v_domain=sqrt applies to a quantized v: with optim.v_bits=32 set "
               "optim.v_domain=linear")
        _check(o.kernel in KERNEL_CHOICES,
               f"optim.kernel={o.kernel!r}: use auto, native, reference or compile")
        _check(not o.v_signed or (o.v_bits != 32 and o.v_domain == "linear"),
               "optim.v_signed=true applies to a linearly quantized v: set optim.v_bits to 8 or 4 "
               "and optim.v_domain=linear")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0")
    _check(q.grad_gemms in ("weight", "input", "both"),
           f"quant.grad_gemms={q.grad_gemms!r} is unknown: use weight, input or both")
    _check(q.compute in ("simulate", "int8"),
           f"quant.compute={q.compute!r} is unknown: use simulate or int8")
    _check(q.kernel in KERNEL_CHOICES,
           f"quant.kernel={q.kernel!r}: use auto, native, reference or compile")
    _check(q.backward_operands in ("quantized", "full"),
           f"quant.backward_operands={q.backward_operands!r} is unknown: use quantized or full")
    _check(bool(cfg.data.train), "data.train is empty: give at least one file or folder")
    d = cfg.data
    _check(0.0 <= d.val_fraction < 0.5, f"data.val_fraction={d.val_fraction} must be in [0, 0.5)")
    _check(not (d.val_fraction > 0 and d.val),
           "data.val and data.val_fraction are both set: give data.val: [] to hold out "
           "data.val_fraction of the training documents, or data.val_fraction=0")
    _check(bool(d.val) or d.val_fraction > 0,
           "data.val is empty: give at least one file or folder, or a data.val_fraction > 0")
    if world_size is not None:
        _check(world_size % p.tp == 0,
               f"parallel.tp={p.tp} does not divide the world size {world_size}: "
               f"launch a multiple of tp processes or change parallel.tp")
        dp = world_size // p.tp
        _check(t.global_batch % (t.micro_batch * dp) == 0,
               f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch x "
               f"data-parallel size = {t.micro_batch} x {dp}: change train.global_batch or "
               f"train.micro_batch")
    _validate_extensions(cfg)


def _validate_extensions(cfg: Config) -> None:
    """Formats of the quantization section (each operand's format and granularity)."""
    from dsq.quant import LinearQuant, QuantFormat

    for name in ("weight", "activation", "grad"):
        try:
            QuantFormat.parse(getattr(cfg.quant, name))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"quant.{name}: {e}")
    try:
        LinearQuant.from_config(cfg.quant)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"quant: {e}")


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _writable_dir_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a directory dsq writes to, or None. Creates nothing that stays:
    the nearest existing ancestor must be a directory in which a file can be created."""
    p = Path(os.path.abspath(os.path.expanduser(path)))
    if p.exists() and not p.is_dir():
        return f"{p} exists and is not a directory"
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        return f"{anc} is a file, not a directory"
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=anc, prefix=".dsq-write-check-"):
            pass
    except OSError as e:
        return f"{anc} is not writable ({e.strerror or type(e).__name__})"
    return None


def check_paths(cfg: Config, data: bool = True) -> None:
    """``train.out_dir`` (and ``data.cache_dir``) can be written, checked before data preparation
    and before any rank starts; :class:`ConfigError` names the key and the fix."""
    keys = [("train.out_dir", cfg.train.out_dir)]
    if data:
        keys.append(("data.cache_dir", cfg.data.cache_dir))
    for key, value in keys:
        problem = _writable_dir_problem(value)
        if problem:
            raise ConfigError(f"{key}={value!r} cannot be written: {problem}: set {key} to a "
                              f"directory you can write to")
