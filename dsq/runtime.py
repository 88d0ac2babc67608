"""Process-level settings: the host memory allocator, and where native extensions are built.

**Extensions.** DeepSpeed compiles its CPU communication op on first use through PyTorch's
extension builder, under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), with
a ``lock`` file held while it builds. :func:`use_env_extensions_dir` (every ``dsq`` command)
points that at ``<venv>/torch_extensions`` unless the user set it, so environments that share a
home directory do not rebuild each other's op, and ``launch/setup.sh`` builds it there once. A
build killed half-way leaves its ``lock`` behind and every later build would wait on it forever:
:func:`clear_stale_build_locks` (run before the process group starts) removes a lock that is
older than a build takes and that no live process is building under, and says so.

**Allocator.** Applied by ``dsq train``, ``dsq eval`` and ``dsq bench`` before the first large
allocation.

A training step allocates and frees tens of megabytes of activations, codes and gradients. With
glibc's defaults, tensors above a moving mmap threshold are fresh ``mmap``s that page-fault in
4 KiB pages on first touch and are unmapped again on free, and freed heap tops are returned to
the kernel: on the 2-core development CPU that costs 10-40% of a step of simulated quantization
and a few ms per int8 linear layer, by how much depends on what ran before. dsq therefore

* sets ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's CPU allocator then asks for transparent huge pages
  for tensors of 2 MiB and more: one fault per 2 MiB instead of 512), and
* fixes glibc's mmap threshold at 32 MiB and keeps freed memory for reuse (``mallopt``:
  ``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD`` 1 GiB, ``M_TOP_PAD`` 64 MiB), in at most two
  arenas (``M_ARENA_MAX``: each allocating thread, communication threads included, would
  otherwise keep an arena of freed memory of its own).

Every recipe of a run or benchmark gets the same settings. ``DSQ_MALLOC_TUNING=0`` leaves the
allocator alone (e.g. when jemalloc or tcmalloc is preloaded); an explicitly set
``THP_MEM_ALLOC_ENABLE`` or ``MALLOC_*_`` environment variable wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_done = False


def tune_allocator() -> bool:
    """Apply the settings above once per process; returns whether glibc's were applied."""
    global _done
    if _done or os.environ.get("DSQ_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no",
                                                                             "off"):
        return False
    _done = True
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = True
    for param, env, value in ((_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 32 << 20),
                              (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 1 << 30),
                              (_M_TOP_PAD, "MALLOC_TOP_PAD_", 64 << 20),
                              (_M_ARENA_MAX, "MALLOC_ARENA_MAX", 2)):
        if env not in os.environ:
            ok = bool(mallopt(param, value)) and ok
    return ok


# ----------------------------------------------------------------------------- extensions
STALE_LOCK_S = 300.0
"""A build lock older than this (no build of dsq's takes that long) with no process building
under its directory is stale."""


def use_env_extensions_dir() -> Optional[str]:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``<venv>/torch_extensions`` when running in a virtual
    environment whose folder is writable and the user has not set it; returns the directory in
    effect (None: PyTorch's default)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    if sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return None
    path = str(Path(sys.prefix) / "torch_extensions")
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    return path


def _extension_roots() -> List[Path]:
    roots = [Path(os.environ["TORCH_EXTENSIONS_DIR"])] if os.environ.get(
        "TORCH_EXTENSIONS_DIR") else []
    roots.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) /
                 "torch_extensions")
    return roots


def _busy(build_dir: Path) -> bool:
    """Whether a live process works in ``build_dir`` (ninja and the compiler run there)."""
    target = str(build_dir.resolve())
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd").startswith(target):
                return True
            if target.encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def clear_stale_build_locks(roots: Optional[List[Path]] = None, stale_s: float = STALE_LOCK_S,
                            log=None) -> List[Path]:
    """Remove the build ``lock`` files of PyTorch extensions (DeepSpeed's ops) left by killed
    builds: older than ``stale_s`` seconds and with no process building in their directory.
    Returns the removed paths (each reported through ``log``, default stderr)."""
    log = log or (lambda m: print(f"dsq: warning: {m}", file=sys.stderr, flush=True))
    removed = []
    now = time.time()
    for root in roots if roots is not None else _extension_roots():
        if not root.is_dir():
            continue
        for lock in list(root.glob("lock")) + list(root.glob("*/lock")) + list(
                root.glob("*/*/lock")):
            try:
                age = now - lock.stat().st_mtime
            except OSError:
                continue
            if age < stale_s or _busy(lock.parent):
                continue
            try:
                lock.unlink()
            except OSError:
                continue
            removed.append(lock)
            log(f"removed the stale build lock {lock} ({age / 60:.0f} min old, no build running"
                f" there): a build of {lock.parent.name} was killed half-way; it is rebuilt now")
    return removed
