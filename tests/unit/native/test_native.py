"""dsq.native's sources and loader: every native source compiles without a warning under
``-Wall -Wextra`` in each variant this CPU can run, the cache digest covers the shared header,
and the sources ship with the package."""

from __future__ import annotations

import pytest

from dsq import native
from dsq.optim import kernels as optim_kernels
from dsq.quant import cpu_gemm, cpu_kernels

C_LIBRARIES = {"quant": cpu_kernels.LIBRARY, "qadamw": optim_kernels.LIBRARY}


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("name", sorted(C_LIBRARIES))
def test_c_kernels_compile_without_warnings(name, isa):
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    built = C_LIBRARIES[name].compile(isa)
    assert built.path.is_file()
    assert built.output == "", f"{name} ({isa}) compiler output:\n{built.output}"


@pytest.mark.skipif(not native._X86, reason="the AMX driver is x86 code")
def test_amx_driver_compiles_without_warnings():
    built = cpu_gemm.LIBRARY.compile("amx")
    assert built.output == "", built.output


def test_warnings_are_kept_and_the_header_is_in_the_digest(tmp_path, monkeypatch):
    """A build's compiler output comes back (and again from the cache); a changed header is a
    new build."""
    monkeypatch.setattr(native, "CSRC", tmp_path / "csrc")
    (tmp_path / "csrc").mkdir()
    monkeypatch.setenv("DSQ_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "csrc" / "h.h").write_text("#define K 1\n")
    (tmp_path / "csrc" / "w.c").write_text('#include "h.h"\nint f(int unused) { return K; }\n')
    first = native.compile_library("w", ("w.c", "h.h"), isa="portable")
    assert "-Wunused-parameter" in first.output
    again = native.compile_library("w", ("w.c", "h.h"), isa="portable")
    assert again.path == first.path and again.output == first.output
    (tmp_path / "csrc" / "h.h").write_text("#define K 2\n")
    assert native.compile_library("w", ("w.c", "h.h"), isa="portable").path != first.path


def test_sources_ship_with_the_package():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["dsq"]
    for lib in (*C_LIBRARIES.values(), cpu_gemm.LIBRARY):
        for src in lib.sources:
            path = (native.CSRC / src).relative_to(root / "dsq")
            assert (native.CSRC / src).is_file()
            assert any(path.match(p) for p in patterns), (path, patterns)


def test_a_broken_build_fails_the_tests_with_the_compilers_reason(tmp_path, monkeypatch):
    """A failed build is a fault the kernel tests fail on (tests/native_utils.py) with the
    compiler's first error line; the build cache cannot hide it (its digest names the compiler,
    so a library built earlier by another compiler is not reused); only a machine without a
    compiler skips, and not under CI."""
    from dsq import log as dsq_log
    from tests import native_utils

    monkeypatch.setattr(native, "CSRC", tmp_path / "csrc")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "ok.c").write_text("const char *dsq_isa(void) { return \"portable\"; }\n")
    monkeypatch.setenv("DSQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_CHOSEN", {})
    monkeypatch.setattr(native, "_VARIANTS", {})
    monkeypatch.setattr(dsq_log, "_seen", set())
    monkeypatch.setenv("DSQ_ISA", "portable")
    lib = native.Library("ok", ("ok.c",), what="test kernel", fallback="eager")
    assert native_utils.native_or_fail(lib) is not None  # built by the real compiler, cached
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'In file included from ok.c:1:' >&2\n"
                  "echo 'ok.c:1:10: fatal error: missing.h: No such file or directory' >&2\n"
                  "echo 'compilation terminated.' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(native.BuildError) as e:
        native.compile_library("ok", ("ok.c",), isa="portable")
    assert e.value.detail == "ok.c:1:10: fatal error: missing.h: No such file or directory"
    monkeypatch.setenv("CC", "/bin/false")
    for ci in ("true", ""):
        monkeypatch.setattr(native, "_CHOSEN", {})  # as a new process: nothing loaded yet
        monkeypatch.setattr(native, "_VARIANTS", {})
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception) as e:
            native_utils.native_or_fail(lib)
        assert str(e.value).startswith("test kernel (portable) failed to build: false failed: "
                                       "exit status 1, no output (full output: ")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_compiler", lambda cxx: None)  # a machine without one
    monkeypatch.setattr(native, "_CHOSEN", {})
    with pytest.raises(pytest.skip.Exception, match="no C compiler"):
        native_utils.native_or_fail(lib)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no C compiler"):
        native_utils.native_or_fail(lib)
