"""Small C/C++ sources built once per machine into shared libraries, cached, loaded with ctypes.

Used by dsq's CPU kernels (:mod:`dsq.quant.cpu_kernels`, :mod:`dsq.quant.cpu_gemm`,
:mod:`dsq.optim.kernels`). A library is compiled with the system compiler on first use and
cached under ``$DSQ_CACHE_DIR`` (default ``~/.cache/dsq``), keyed by its source, compiler,
flags and the CPU (sources are built with ``-march=native`` and home directories are often
shared by different nodes). The file is renamed into place atomically, so ranks that build at
the same time do not see a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

C_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
           "-shared", "-fPIC")
"""Flags of the C kernels: exact IEEE arithmetic (no contraction into fused multiply-adds)."""


def cache_dir() -> Path:
    return Path(os.environ.get("DSQ_CACHE_DIR", Path.home() / ".cache" / "dsq"))


def cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return "".join(sorted({ln for ln in fh if ln.startswith(("model name", "flags"))}))
    except OSError:
        import platform

        return platform.machine() + platform.processor()


def _compiler(cxx: bool) -> str:
    if cxx:
        found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    else:
        found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not found:
        raise RuntimeError(f"no {'C++ compiler (g++/c++)' if cxx else 'C compiler (gcc/cc)'} "
                           f"on PATH")
    return found


def build(name: str, source: str, *, cxx: bool = False, flags: Sequence[str] = C_FLAGS,
          libs: Sequence[str] = ("-lm",), key: str = "") -> ctypes.CDLL:
    """Compile ``source`` (C, or C++ with ``cxx``) once and load it; ``key`` adds what else the
    binary depends on (e.g. the PyTorch version it links against). Raises RuntimeError with the
    compiler's message when it fails."""
    compiler = _compiler(cxx)
    digest = hashlib.sha256("\0".join([source, *flags, *libs, compiler, cpu_id(), key])
                            .encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}_{digest}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / f"{name}.{'cpp' if cxx else 'c'}"
            src.write_text(source)
            so = Path(tmp) / f"{name}.so"
            res = subprocess.run([compiler, *flags, str(src), "-o", str(so), *libs],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {res.stderr[-2000:]}")
            os.replace(so, out)  # atomic: concurrent ranks may build at the same time
    return ctypes.CDLL(str(out))
