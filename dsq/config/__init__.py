"""Typed configuration: dataclasses are the schema (:mod:`dsq.config.schema`), YAML files and ``a.b=c``
overrides are data.

Precedence (later wins): dataclass defaults < model preset and the switches of the model's
``arch`` (:mod:`dsq.config.presets`) < YAML files in the order given < command-line
``key.sub=value`` overrides. Unknown keys, wrong types and inconsistent values
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

from dsq.config.schema import (  # noqa: F401  (the schema is part of this module's interface)
    DEFAULT_CORPUS,
    PACKAGE_DIR,
    PRESETS,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    QuantConfig,
    TrackingConfig,
    TrainConfig,
)
from dsq.config.presets import ARCHS, fill_model  # noqa: F401


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
            raise ConfigError(_yaml_error(p, e)) from None
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
    fill_model(m)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """:meth:`Config.validate`: every section's checks and those across sections."""
    cfg.validate(world_size)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _yaml_error(path: str, e: Exception) -> str:
    """One line for a YAML file PyYAML could not parse: where (line and column, 1-based, as
    PyYAML reports them), what, and the fix."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}"
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    where = (f" ({ctx} at line {cmark.line + 1}, column {cmark.column + 1})"
             if ctx and cmark is not None else "")
    return (f"config file {path!r} is not valid YAML at line {mark.line + 1}, column "
            f"{mark.column + 1}: {problem}{where}: fix the syntax there (indent with spaces, "
            f"close every bracket and quote, one 'key: value' per line)")


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
