"""dsq's user-facing warnings: one ``dsq: warning: ...`` line on stderr."""

from __future__ import annotations

import sys
from typing import Set

_seen: Set[str] = set()


def warn(msg: str) -> None:
    """Print ``dsq: warning: msg`` on stderr (one line, flushed)."""
    print(f"dsq: warning: {msg}", file=sys.stderr, flush=True)


def warn_once(msg: str) -> None:
    """:func:`warn`, once per process and message."""
    if msg not in _seen:
        _seen.add(msg)
        warn(msg)
