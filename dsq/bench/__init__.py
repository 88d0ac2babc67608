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
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: dsq bench {{{'|'.join(BENCHES)}}} [options]\n\n"
              f"  optim    optimizer step: fp32 AdamW vs quantized states\n"
              f"  linear   one linear layer forward + backward, per recipe and compute mode\n"
              f"  train    training steps of a config, per recipe, side by side\n\n"
              f"dsq bench NAME --help shows the options of each.")
        sys.exit(0)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: dsq bench {{{'|'.join(BENCHES)}}} [options]   (--help for each)",
              file=sys.stderr)
        sys.exit(2)
    importlib.import_module(BENCHES[argv[0]]).main(argv[1:])
