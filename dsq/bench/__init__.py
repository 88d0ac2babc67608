"""``dsq bench optim|linear|train|prepare|quant``: side-by-side benchmarks that print a table (and --json)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import platform
import sys
import warnings
from typing import Dict, Iterator, List, Tuple

BENCHES = {
    "optim": "dsq.bench.optim",
    "linear": "dsq.bench.linear",
    "train": "dsq.bench.train",
    "prepare": "dsq.bench.prepare",
    "quant": "dsq.bench.quant",
}


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """Import an optional library to compare against (torchao, bitsandbytes) without the
    warnings and log lines it prints about kernels it cannot load on this machine."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx_vnni", "avx512_vnni",
                "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
"""The ``/proc/cpuinfo`` flags that decide which kernels run (named in the benchmarks)."""


def cpu_info() -> Dict:
    """The CPU and the variant each of dsq's CPU kernels runs as on it (for tables and JSON):
    ``model``, ``arch``, ``flags`` (of :data:`VECTOR_FLAGS`), ``bf16_hardware``,
    ``int8_units``, ``quant_kernels`` and ``qadamw_kernel`` (avx512 | avx2 | portable |
    reference), ``int8_gemm`` (which integer GEMM runs, and why), ``int8_pays`` and
    ``int8_why`` (:func:`dsq.quant.cpu_gemm.int8_outlook`)."""
    from dsq import native
    from dsq.optim import kernels as optim_kernels
    from dsq.quant import cpu_gemm, cpu_kernels

    pays, why = cpu_gemm.int8_outlook()
    return {"model": native.cpu_model(), "arch": platform.machine(),
            "flags": [f for f in VECTOR_FLAGS if f in native.cpu_flags()],
            "bf16_hardware": native.has_native_bf16(), "int8_units": native.int8_units(),
            "quant_kernels": cpu_kernels.isa(), "qadamw_kernel": optim_kernels.isa(),
            "int8_gemm": cpu_gemm.status(), "int8_pays": pays, "int8_why": why}


def add_common_args(p) -> None:
    """``--threads``, ``--json`` and ``--device``, as every benchmark takes them."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when a GPU is visible, else cpu")


def setup(ns) -> Tuple[str, str]:
    """Apply ``--threads`` and resolve ``--device``: ``(device, where it runs, in words)``."""
    import torch

    from dsq.bench.linear import resolve_device

    device = resolve_device(ns.device)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"{torch.get_num_threads()} threads")
    return device, where


def cpu_line(info: Dict) -> str:
    """``CPU: <model> (<arch>; <flags>); bf16 GEMMs in hardware|emulated; int8 dot products``."""
    bf16 = "in hardware" if info["bf16_hardware"] else "emulated (no avx512_bf16/amx_bf16)"
    return (f"CPU: {info['model']} ({info['arch']}; {' '.join(info['flags']) or 'no AVX2'}); "
            f"bf16 GEMMs {bf16}; int8 dot products: {info['int8_units'] or 'none (no VNNI/AMX)'}")


def main(argv: List[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: dsq bench {{{'|'.join(BENCHES)}}} [options]\n\n"
              f"  optim    optimizer step: fp32 AdamW vs quantized states\n"
              f"  linear   one linear layer forward + backward, per recipe and compute mode\n"
              f"  train    training steps of a config, per recipe, side by side\n"
              f"  prepare  dsq prepare on a generated corpus: 1 worker vs all cores, beside "
              f"sentencepiece\n"
              f"  quant    quantize + dequantize per format (fp8, MX, NVFP4) and shape\n\n"
              f"dsq bench NAME --help shows the options of each.")
        sys.exit(0)
    if not argv or argv[0] not in BENCHES:
        what = f"unknown benchmark {argv[0]!r}" if argv else "no benchmark named"
        print(f"dsq: error: {what}: give one of {', '.join(BENCHES)} (dsq bench --help)",
              file=sys.stderr)
        sys.exit(2)
    importlib.import_module(BENCHES[argv[0]]).main(argv[1:])
