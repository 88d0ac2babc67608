"""Tests of dsq's native kernels: get a library or say why not, without hiding a broken build.

:func:`native_or_fail` returns a :class:`dsq.native.Library`'s loaded library. Where it is not
loaded, a test is skipped only for what the machine lacks or the user chose (``DSQ_ISA=reference``,
no AMX, no C compiler outside CI); a build that failed, or a library that cannot serve, fails the
test with the compiler's one-line reason and the log of its full output. Under ``CI=true`` (as
set by CI services and ``.ci/run``) a missing compiler fails too: CI machines must build the
kernels.
"""

from __future__ import annotations

import os

import pytest

from dsq import native


def in_ci() -> bool:
    """Whether this runs under CI (``CI`` set to anything but ``""``, ``0``, ``false``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def failure_line(library: native.Library) -> str | None:
    """The one line that says why ``library`` failed to build or load here, or None when it
    loaded, or is absent for what the machine lacks or the user chose."""
    c = library.choice()
    e = c.failure
    if c.lib is not None or e is None:
        return None
    if isinstance(e, native.BuildError):
        where = f" (full output: {e.log})" if e.log else ""
        return f"{library.what} ({e.isa}) failed to build: {e.reason}: {e.detail}{where}"
    return f"{library.what} cannot serve: {c.reason}"


def native_or_fail(library: native.Library):
    """``library`` loaded (a ctypes library); otherwise fail or skip the test (see above)."""
    c = library.choice()
    if c.lib is not None:
        return c.lib
    line = failure_line(library)
    e = c.failure
    lacks = line is None or (isinstance(e, native.BuildError) and e.log is None)
    if lacks and not in_ci():
        pytest.skip(line or f"{library.what}: {c.reason}")
    if line is None:  # under CI: only a choice of the user's (DSQ_ISA) or a missing AMX unit
        pytest.skip(f"{library.what}: {c.reason}")
    pytest.fail(line, pytrace=False)
