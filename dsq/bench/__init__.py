"""``dsq bench optim|linear|train``: side-by-side benchmarks that print a table (and --json)."""

from __future__ import annotations

import importlib
import sys
from typing import List

BENCHES = {
    "optim": "dsq.bench.optim",
    "linear": "dsq.bench.linear",
    "train": "dsq.bench.train",
}


def main(argv: List[str]) -> None:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: dsq bench {{{'|'.join(BENCHES)}}} [options]   (--help for each)",
              file=sys.stderr)
        sys.exit(2)
    importlib.import_module(BENCHES[argv[0]]).main(argv[1:])
