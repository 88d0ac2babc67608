"""Process-level settings: the kernels this process runs (:func:`resolve_kernels`), the host
memory allocator, torch threads per rank, library logging, and where native extensions are
built.

Threads (:func:`set_threads_per_rank`, ``dsq train``): cores / ranks per node unless
``OMP_NUM_THREADS`` is set. Logging (:func:`quiet_libraries`): DeepSpeed's, MLflow's and
alembic's INFO lines are hidden unless ``DSQ_LOG_LEVEL`` (or ``--verbose``) asks for them.

Extensions: DeepSpeed compiles its CPU communication op on first use through PyTorch's
extension builder, under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), with
a ``lock`` file held while it builds. :func:`use_env_extensions_dir` (every ``dsq`` command)
points that at ``<venv>/torch_extensions`` unless the user set it, so environments that share a
home directory do not rebuild each other's op, and ``launch/setup.sh`` builds it there once. A
build killed half-way leaves its ``lock`` behind and every later build would wait on it forever:
:func:`clear_stale_build_locks` (run before the process group starts) removes a lock that is
older than a build takes and that no live process is building under, and says so.

The allocator settings are applied by ``dsq train``, ``dsq eval`` and ``dsq bench`` before the
first large allocation.

A training step allocates and frees tens of megabytes of activations, codes and gradients. With
glibc's defaults, tensors above a moving mmap threshold are fresh ``mmap``s that page-fault in
4 KiB pages on first touch and are unmapped again on free, and freed heap tops are returned to
the kernel: a noticeable share of a CPU step (docs/performance.md), by how much depends on
what ran before. dsq therefore

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from dsq.log import warn
from dsq.native import kernel_choice
from dsq.native.kernel_choice import Kernel

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
    log = log or warn
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


# ----------------------------------------------------------------------------- threads
def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask: SLURM's, taskset's, or all)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ranks_per_node(env=None) -> int:
    """Ranks sharing this node: ``LOCAL_WORLD_SIZE`` (torchrun), ``DSQ_NPROC_PER_NODE``,
    SLURM's tasks per node, else the world size (one node), else 1."""
    e = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "DSQ_NPROC_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        v = e.get(key, "").split("(")[0]
        if v.isdigit() and int(v) > 0:
            return int(v)
    v = e.get("WORLD_SIZE", "1")
    return int(v) if v.isdigit() and int(v) > 0 else 1


def set_threads_per_rank() -> int:
    """Torch intra-op threads = cores / ranks per node (at least 1), so N ranks on one node do
    not each start a thread per core and oversubscribe it. An explicit ``OMP_NUM_THREADS``
    wins (and is what torch already uses). Returns the thread count in effect."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    n = max(1, cores_available() // ranks_per_node())
    os.environ["OMP_NUM_THREADS"] = str(n)  # for processes this one starts (compile workers)
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- logging
def log_level() -> int:
    """dsq's level for library logging: ``DSQ_LOG_LEVEL`` (a name or number), WARNING by
    default; ``--verbose`` sets it to INFO."""
    import logging

    v = os.environ.get("DSQ_LOG_LEVEL", "WARNING").strip().upper()
    if v.isdigit():
        return int(v)
    level = logging.getLevelName(v)  # the number of a known name, else a string
    return level if isinstance(level, int) else logging.WARNING


class _KnownDeepSpeedWarnings:
    """Drops DeepSpeed warnings about choices dsq makes deliberately."""

    KNOWN = ("You are using ZeRO with an untested optimizer",)

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not any(k in msg for k in self.KNOWN)


def quiet_libraries() -> None:
    """Hide the INFO lines of DeepSpeed, MLflow (database set-up, system metrics) and alembic
    unless ``DSQ_LOG_LEVEL`` is INFO or lower; also the shm op's build message on CPU ranks."""
    import logging

    level = log_level()
    verbose = level <= logging.INFO
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(max(level, logging.DEBUG)))
    for name in ("mlflow", "alembic", "DeepSpeed", "deepspeed", "datasets"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        # dsq hands DeepSpeed QAdamW on purpose (zero_allow_untested_optimizer): not a warning
        ds_logger = logging.getLogger("DeepSpeed")
        if not any(isinstance(f, _KnownDeepSpeedWarnings) for f in ds_logger.filters):
            ds_logger.addFilter(_KnownDeepSpeedWarnings())
        if not _cuda_present():  # DeepSpeed's "unable to detect" warning becomes an INFO line
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import contextlib
            import importlib
            import io

            # the module itself: ``deepspeed.comm.torch`` as an attribute is PyTorch
            ds_torch = importlib.import_module("deepspeed.comm.torch")

            build = ds_torch.build_shm_op
            if not getattr(build, "_dsq_quiet", False):
                def quiet_build():
                    with contextlib.redirect_stdout(io.StringIO()):
                        return build()

                quiet_build._dsq_quiet = True
                ds_torch.build_shm_op = quiet_build
        except Exception:  # another DeepSpeed layout: its message stays
            pass


# ----------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class KernelChoice:
    quant: Kernel = Kernel.AUTO
    optim: Kernel = Kernel.AUTO
    env: Dict[str, str] = field(default_factory=dict)
    """The overriding environment variables that were set (name -> value)."""


def resolve_kernels(cfg, environ: Optional[Mapping[str, str]] = None) -> KernelChoice:
    """The kernels of a run: ``$DSQ_*_KERNEL`` when set, else ``quant.kernel`` / ``optim.kernel``.
    ValueError names the variable or key of an unknown name."""
    environ = os.environ if environ is None else environ
    chosen = {}
    for family, var in kernel_choice.ENV.items():
        value = environ.get(var, "").strip()
        chosen[family] = (kernel_choice.parse(value, var) if value
                          else kernel_choice.parse(getattr(cfg, family).kernel, f"{family}.kernel"))
    env = {k: environ[k] for k in kernel_choice.OVERRIDES if environ.get(k, "").strip()}
    if chosen["optim"] is Kernel.NATIVE and fp8_states(cfg.optim):
        raise ValueError(f"{kernel_choice.ENV['optim']}=native does not handle fp8 moments "
                         f"(optim.m_format / optim.v_format): set it to auto or reference")
    return KernelChoice(chosen["quant"], chosen["optim"], env)


def fp8_states(optim) -> bool:
    """Whether QAdamW keeps a moment in fp8 (those run on the reference kernel)."""
    return optim.name == "qadamw" and any(
        str(getattr(optim, f"{k}_format", None)).startswith("fp8") for k in ("m", "v"))


def apply_kernels(choice: KernelChoice) -> None:
    """Make ``choice.quant`` the quantization kernel of this process (the optimizer's goes to
    :func:`dsq.optim.build_optimizer`)."""
    from dsq.quant import fused

    fused.set_kernel(kernel_choice.impl(choice.quant))


def describe_kernels(choice: KernelChoice, qadamw: bool, fp8: bool = False) -> Dict[str, str]:
    """What runs, as MLflow params: ``kernels.quant`` (and ``kernels.optim`` for QAdamW), the
    implementation with its instruction set where native, and ``env.NAME`` for each override;
    ``fp8``: QAdamW has fp8 moments (they run on the reference kernel)."""
    out = {f"env.{k}": v for k, v in choice.env.items()}
    out["kernels.quant"] = _quant_running()
    if qadamw:
        out["kernels.optim"] = ("reference" if fp8 and choice.optim is not Kernel.COMPILE
                                else _optim_running(choice.optim))
    return out


def kernels_line(params: Dict[str, str]) -> str:
    """The start-up line of :func:`describe_kernels`'s params."""
    parts = [f"quantization {params['kernels.quant']}"]
    if "kernels.optim" in params:
        parts.append(f"optimizer {params['kernels.optim']}")
    env = [f"{k[4:]}={v}" for k, v in params.items() if k.startswith("env.")]
    return "kernels: " + ", ".join(parts) + (f" (set by {', '.join(env)})" if env else "")


def _running_name(name: str, isa: str) -> str:
    return {"cpp": f"native/{isa}", "eager": "reference"}.get(name, name)


def _quant_running() -> str:
    import torch

    from dsq.quant import cpu_kernels, fused

    if torch.cuda.is_available():
        name = ("compile" if fused.kernel() in ("auto", "compile") and fused.has_triton()
                else "eager")
    else:
        name = fused._impl(torch.empty(0, 0))
    return _running_name(name, cpu_kernels.isa() if name == "cpp" else "")


def _optim_running(kernel: Kernel) -> str:
    import torch

    from dsq.optim import kernels as K

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k = K.get_kernel(kernel_choice.impl(kernel), dev)
    return _running_name(k.name, K.isa() if k.name == "cpp" else "")


def _cuda_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
