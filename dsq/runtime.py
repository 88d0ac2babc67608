"""Process-level settings of the host memory allocator, applied by ``dsq train``, ``dsq eval``
and ``dsq bench`` before the first large allocation.

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
