"""launch/gpu_check.sh on a machine without a GPU: the plan, the wheel set for the GPU image
(downloaded from the package registry, as CI installs dsq itself), and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "launch" / "gpu_check.sh"


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_prints_the_plan_without_a_gpu():
    res = _run("--dry-run")
    assert res.returncode == 0, res.stderr
    steps = [line for line in res.stdout.splitlines() if line.strip()[:2] in
             ("1.", "2.", "3.", "4.", "5.")]
    assert [s.split(":")[0].split(". ")[1] for s in steps] == [
        "install", "pytest", "bench linear", "bench optim", "bench train"]
    limits = [int(s.rsplit("(", 1)[1].rstrip("s)")) for s in steps]
    assert sum(limits) <= 8 * 60


def test_refuses_an_incomplete_wheel_folder_and_a_cpu_machine(tmp_path):
    res = _run("--dry-run", "--wheels", str(tmp_path))
    assert res.returncode == 2 and "lacks wheels for: deepspeed==" in res.stderr
    res = _run("--wheels", str(tmp_path))
    assert res.returncode == 2 and res.stderr.count("error") == 1


@pytest.mark.slow
def test_download_gives_the_gpu_wheel_set_within_60_mib(tmp_path):
    wheels = tmp_path / "wheels"
    res = _run("--download", str(wheels))
    assert res.returncode == 0, res.stdout + res.stderr
    files = sorted(wheels.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    assert total <= 60 * 2**20 and total > 2**20
    names = {f.name.split("-")[0].lower() for f in files}
    assert {"deepspeed", "megatron_core", "omegaconf", "datasets", "pydantic"} <= names
    for f in files:  # CPython 3.12 on x86-64 Linux, or pure Python
        tag = f.name[:-4].split("-")[-3:]
        assert tag[0] in ("py3", "py312", "cp312") and (
            tag[2] == "any" or "manylinux" in tag[2] and "x86_64" in tag[2]), f.name
        with zipfile.ZipFile(f) as z:
            assert any(n.endswith("METADATA") for n in z.namelist())
    again = _run("--dry-run", "--wheels", str(wheels))
    assert again.returncode == 0 and f"{len(files)} in {wheels}" in again.stdout
    (wheels / "extra-1.0-py3-none-any.whl").write_bytes(b"x")
    extra = _run("--dry-run", "--wheels", str(wheels))
    assert extra.returncode == 2 and "remove the others" in extra.stderr
