"""dsq's one loader of native code: the C/C++ sources under ``dsq/csrc`` built once per
instruction set into shared libraries, cached, loaded with ctypes; the CPU's instruction sets
and which variant of a kernel runs on it.

Each native library is one :class:`Library` (``quant``: :mod:`dsq.quant.cpu_kernels`,
``amx_gemm``: :mod:`dsq.quant.cpu_gemm`, ``qadamw``: :mod:`dsq.optim.kernels`):
:meth:`Library.load` builds the CPU's variant on first use, once per process, and returns the
ctypes library or None (then one line says why and what runs instead, once); the binding
modules check device, dtype, contiguity and sizes before every call into it.

Variants (:data:`ISAS`, best first). A kernel's vector code is guarded by the compiler's macros
(``__AVX512F__``, ``__AVX2__`` ...) and each variant is compiled with explicit flags for exactly
the instruction set it uses (:data:`ISA_FLAGS`; never ``-march=native``, which would let an
AVX-512 machine build an "AVX2" variant with AVX-512 in it):

``avx512``    AVX-512 F/BW/VL (+ AVX2, FMA); Intel Skylake-SP and later Xeons, AMD Zen 4 and later
``avx2``      AVX2 + FMA; Intel Haswell and later, AMD Zen 1-3
``portable``  the same C without vector intrinsics, for the compiler's default target (x86-64
              without AVX2, ARM ...)
``reference`` no native code: the PyTorch (eager) reference kernels

:func:`select_isa` picks the best variant whose instruction sets the CPU has
(``/proc/cpuinfo`` flags); ``$DSQ_ISA`` may lower the choice (e.g. ``DSQ_ISA=avx2`` on an
AVX-512 machine; a variant the CPU cannot run is refused with one line and the best one used).
Every variant is built with ``-ffp-contract=off`` and evaluates the same IEEE operations per
element as the reference, so all of them give bit-identical results (tested variant by
variant).

A library is compiled on first use with warnings on (:data:`WARN_FLAGS`; the sources compile
without any) and cached under ``$DSQ_CACHE_DIR`` (default ``~/.cache/dsq``) as
``NAME-ISA_DIGEST.so``, the digest covering every source file (the shared header
``dsq_common.h`` included), flags, libraries, compiler and its version, and ``key``; what the
compiler printed on success is kept beside it (``NAME-ISA_DIGEST.warnings``, see
:func:`compile_library`); the binary depends on nothing else (no ``-march=native``),
so nodes of different CPU models that share a home directory share it. The file is renamed into
place atomically, so ranks that build at the same time do not see a half-written library. A
failed build raises :class:`BuildError` after writing the compiler's full output to
``$DSQ_CACHE_DIR/logs/NAME-ISA_DIGEST.log``; callers report it as one line (:func:`warn`) that
names the kernel, the variant, the fallback and that log.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dsq.log import warn_once

CSRC = Path(__file__).with_name("csrc")
"""The native sources: ``quant.c``, ``qadamw.c``, ``amx_gemm.cpp`` and their ``dsq_common.h``."""

WARN_FLAGS = ("-Wall", "-Wextra")
"""Warnings every build turns on (the sources compile without any, tested per variant)."""

C_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
"""Base flags of the C kernels: exact IEEE arithmetic (no contraction into fused multiply-adds);
a variant adds :data:`ISA_FLAGS`."""

ISAS = ("avx512", "avx2", "portable")
"""Native variants, best first (``reference``, no native code, comes after them)."""

REFERENCE = "reference"

ISA_NEEDS: dict[str, tuple[str, ...]] = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx2", "fma"),
    "avx2": ("avx2", "fma"),
    "portable": (),
}
"""``/proc/cpuinfo`` flags a variant needs."""

ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl"),
    "avx2": ("-mavx2", "-mfma"),
    "portable": (),
}
"""Compiler flags of a variant: the instruction sets its source uses, nothing implied."""

AMX_NEEDS = ("amx_tile", "amx_int8", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
"""``/proc/cpuinfo`` flags of the AMX GEMM driver (:mod:`dsq.quant.cpu_gemm`): oneDNN's int8
micro-kernel runs on AMX tiles, dsq's epilogue is AVX-512 code (every AMX CPU has these)."""

AMX_FLAGS = ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
             "-mavx512bf16")
"""Compiler flags of the AMX GEMM driver's own code (its AVX-512 epilogue)."""

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cache_dir() -> Path:
    return Path(os.environ.get("DSQ_CACHE_DIR", Path.home() / ".cache" / "dsq"))


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as fh:
            for ln in fh:
                key, _, val = ln.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(val.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``AMD EPYC 9454``."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    return _cpuinfo()[1]


def supported_isas(flags: Iterable[str] | None = None) -> list[str]:
    """The native variants a CPU with ``flags`` (default: this one's) can run, best first."""
    f = cpu_flags() if flags is None else frozenset(flags)
    x86 = _X86 if flags is None else True
    return [i for i in ISAS if (x86 or not ISA_FLAGS[i]) and set(ISA_NEEDS[i]) <= f]


def select_isa(flags: Iterable[str] | None = None, request: str | None = None) -> str:
    """The variant to run on a CPU with ``flags`` (default: this one's): the best it supports,
    or ``request`` (default ``$DSQ_ISA``) when that is one it supports or ``reference``."""
    ok = supported_isas(flags)
    if request is None:
        request = os.environ.get("DSQ_ISA", "").strip().lower()
    if request in ("", "auto"):
        return ok[0] if ok else REFERENCE
    if request == REFERENCE or request in ok:
        return request
    best = ok[0] if ok else REFERENCE
    why = ("is not one of " + ", ".join((*ISAS, REFERENCE)) if request not in ISAS
           else f"needs {', '.join(ISA_NEEDS[request])}, which this CPU lacks")
    warn(f"DSQ_ISA={request} {why}: using {best}")
    return best


def int8_units(flags: Iterable[str] | None = None) -> str | None:
    """The CPU's int8 dot-product hardware (``amx_int8``, ``avx512_vnni``, ``avx_vnni``), or
    None where int8 products are widened by plain AVX2/AVX-512 arithmetic."""
    f = cpu_flags() if flags is None else frozenset(flags)
    for name in ("amx_int8", "avx512_vnni", "avx_vnni"):
        if name in f:
            return name
    return None


def has_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether bf16 GEMMs run on bf16 hardware (AVX512-BF16 or AMX-BF16); without it PyTorch
    emulates them through fp32 and fp32 is the faster float baseline."""
    f = cpu_flags() if flags is None else frozenset(flags)
    return bool({"avx512_bf16", "amx_bf16"} & f)


warn = warn_once
"""``dsq: warning: msg`` on stderr, once per process and message."""


class BuildError(RuntimeError):
    """A kernel that did not compile; ``log`` holds the compiler's full output (or None when
    there is no compiler), ``detail`` the compiler's one-line reason (its first ``error`` line,
    else its first line, else its exit status; :func:`compiler_reason`)."""

    def __init__(self, name: str, isa: str, reason: str, log: Path | None, detail: str = ""):
        super().__init__(reason)
        self.name, self.isa, self.reason, self.log = name, isa, reason, log
        self.detail = detail or reason

    def line(self, kernel: str, fallback: str) -> str:
        """The one line that reports it."""
        where = f"; compiler output in {self.log}" if self.log else ""
        return f"{kernel} ({self.isa}) not built ({self.reason}): using {fallback}{where}"


def compiler_reason(output: str, status: int) -> str:
    """The compiler's one-line reason for a failed build: the first line of ``output`` that
    says ``error``, else its first non-empty line, else ``exit status N, no output``."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
    return line[:300] if line else f"exit status {status}, no output"


def _compiler(cxx: bool) -> str | None:
    if cxx:
        return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@functools.lru_cache(maxsize=4)
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.split("\n", 1)[0]
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass(frozen=True)
class Built:
    """A compiled library: its path and what the compiler printed building it (warnings;
    ``""`` when it printed nothing)."""

    path: Path
    output: str


def compile_library(name: str, sources: Sequence[str], *, isa: str, cxx: bool = False,
                    flags: Sequence[str] = C_FLAGS, libs: Sequence[str] = ("-lm",),
                    key: str = "") -> Built:
    """Compile ``sources`` (file names under :data:`CSRC`; the first is the translation unit,
    the others the headers it includes) as C, or C++ with ``cxx``, for variant ``isa``
    (``flags`` plus :data:`WARN_FLAGS` and :data:`ISA_FLAGS`, or :data:`AMX_FLAGS` for
    ``amx``), once: a cached build is reused. ``key`` adds what else the binary depends on
    (e.g. the PyTorch version it links against). Raises :class:`BuildError`."""
    compiler = _compiler(cxx)
    if not compiler:
        what = "C++ compiler (g++/c++)" if cxx else "C compiler (gcc/cc)"
        raise BuildError(name, isa, f"no {what} on PATH", None)
    all_flags = [*flags, *WARN_FLAGS, *(AMX_FLAGS if isa == "amx" else ISA_FLAGS[isa])]
    texts = [f"{s}\0{(CSRC / s).read_text()}" for s in sources]
    digest = hashlib.sha256("\0".join([*texts, *all_flags, *libs, compiler,
                                       _compiler_version(compiler), isa, key])
                            .encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{isa}_{digest}.so"
    said = out.with_suffix(".warnings")
    if out.is_file():
        return Built(out, said.read_text() if said.is_file() else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / f"{name}.so"
        cmd = [compiler, *all_flags, f"-I{CSRC}", str(CSRC / sources[0]), "-o", str(so), *libs]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            rc, text = res.returncode, res.stdout + res.stderr
        except OSError as e:
            rc, text = -1, str(e)
        if rc != 0:
            log = cache_dir() / "logs" / f"{name}-{isa}_{digest}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"$ {' '.join(cmd)}\nexit status {rc}\n\n{text}")
            raise BuildError(name, isa, f"{Path(compiler).name} failed", log,
                             compiler_reason(text, rc))
        if text:
            said.write_text(text)
        os.replace(so, out)  # atomic: concurrent ranks may build at the same time
    return Built(out, text)


def build(name: str, sources: Sequence[str], *, isa: str, cxx: bool = False,
          flags: Sequence[str] = C_FLAGS, libs: Sequence[str] = ("-lm",),
          key: str = "") -> ctypes.CDLL:
    """:func:`compile_library`, loaded. Raises :class:`BuildError`."""
    return ctypes.CDLL(str(compile_library(name, sources, isa=isa, cxx=cxx, flags=flags,
                                           libs=libs, key=key).path))


@dataclass(frozen=True)
class Choice:
    """What a :class:`Library` runs as in this process: ``lib`` (None: its fallback runs),
    the variant ``isa`` (``reference`` when ``lib`` is None), ``reason`` (why it is None) and
    ``failure`` (the :class:`BuildError`, or the error of a library that cannot serve, when
    that is why: a fault rather than a fact of the machine or a choice such as
    ``DSQ_ISA=reference``)."""

    lib: ctypes.CDLL | None
    isa: str
    reason: str | None = None
    failure: Exception | None = None


_VARIANTS: dict[tuple[str, str], ctypes.CDLL] = {}  # (name, isa) -> built and set up
_CHOSEN: dict[str, Choice] = {}                     # name -> this process's choice
_LOCK = threading.RLock()


@dataclass(frozen=True)
class Library:
    """A native library of dsq and how to load it.

    ``sources``: file names under :data:`CSRC` (translation unit first, then its headers).
    ``what`` / ``fallback`` name it and what runs without it in the one line a failure prints.
    ``setup(lib, isa)`` declares the ctypes signatures and checks the loaded library (raises
    RuntimeError when it cannot serve); a per-CPU variant's ``dsq_isa()`` must name it.
    ``options()`` returns the keyword arguments of :func:`compile_library` beyond the defaults
    (flags, libs, key; may raise RuntimeError).
    ``isa``: a fixed variant (``amx``), else this CPU's (:func:`select_isa`). ``unavailable()``:
    why it is not built here, as a fact rather than a fault (nothing printed), or None."""

    name: str
    sources: tuple[str, ...]
    what: str
    fallback: str
    setup: Callable[[ctypes.CDLL, str], None] | None = None
    cxx: bool = False
    options: Callable[[], dict] | None = None
    isa: str | None = None
    unavailable: Callable[[], str | None] | None = None

    def _options(self) -> dict:
        return {"cxx": self.cxx, **(self.options() if self.options else {})}

    def compile(self, isa: str) -> Built:
        """Compile variant ``isa`` (cached), without loading it; raises :class:`BuildError`."""
        return compile_library(self.name, self.sources, isa=isa, **self._options())

    def variant(self, isa: str) -> ctypes.CDLL:
        """Variant ``isa``, built, loaded and set up once per process; raises
        :class:`BuildError` or RuntimeError. Only call on a CPU that supports ``isa``."""
        with _LOCK:
            lib = _VARIANTS.get((self.name, isa))
            if lib is None:
                lib = build(self.name, self.sources, isa=isa, **self._options())
                if self.isa is None:  # a per-CPU variant names what it was compiled as
                    lib.dsq_isa.restype = ctypes.c_char_p
                    got = lib.dsq_isa().decode()
                    if got != isa:
                        raise RuntimeError(f"the {isa} build of {self.what} compiled the {got} "
                                           f"code")
                if self.setup is not None:
                    self.setup(lib, isa)
                _VARIANTS[(self.name, isa)] = lib
            return lib

    def choice(self) -> Choice:
        """This process's :class:`Choice`, made on first use: builds the variant, or reports
        in one line (once) why the fallback runs."""
        c = _CHOSEN.get(self.name)
        if c is not None:
            return c
        with _LOCK:
            if self.name not in _CHOSEN:
                _CHOSEN[self.name] = self._choose()
            return _CHOSEN[self.name]

    def load(self) -> ctypes.CDLL | None:
        """The library of this CPU's variant, or None (see :meth:`choice`)."""
        return self.choice().lib

    def _choose(self) -> Choice:
        why = self.unavailable() if self.unavailable else None
        if why:
            return Choice(None, REFERENCE, why)
        isa = self.isa or select_isa()
        if isa == REFERENCE:
            return Choice(None, REFERENCE, "DSQ_ISA=reference")
        try:
            return Choice(self.variant(isa), isa)
        except BuildError as e:
            warn(e.line(self.what, self.fallback))
            return Choice(None, REFERENCE, e.reason, e)
        except Exception as e:  # noqa: BLE001  (no headers, a library that cannot serve)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            warn(f"{self.what} ({isa}) unavailable ({reason}): using {self.fallback}")
            return Choice(None, REFERENCE, reason, e)
