"""The building blocks of the configuration schema: the error a user can fix, and choice fields
that name their allowed values."""

from __future__ import annotations

from dataclasses import field, fields
from typing import Sequence

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


def words(names: Sequence) -> str:
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_choices(section: str, obj) -> None:
    """Every :func:`choice` field of the dataclass ``obj`` holds one of its values."""
    for f in fields(obj):
        allowed = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if allowed and value not in allowed + f.metadata.get("aliases", ()):
            raise ConfigError(f"{section}.{f.name}={value!r} is unknown: use {words(allowed)}")
