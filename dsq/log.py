"""dsq's user-facing warnings: one ``dsq: warning: ...`` line on stderr."""

from __future__ import annotations

import argparse
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


class ArgParser(argparse.ArgumentParser):
    """``argparse`` with dsq's form of a usage error: one ``dsq: error:`` line naming the
    command and where its options are listed, exit 2 (argparse prints its usage and a
    ``PROG: error:`` line)."""

    def error(self, message: str):
        print(f"dsq: error: {self.prog}: {message} (the options: {self.prog} --help)",
              file=sys.stderr, flush=True)
        sys.exit(2)
