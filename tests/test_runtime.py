"""dsq.runtime: the host allocator settings of dsq train/eval/bench (and their opt-out), and
the kernels a run selects and records."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = ("import os; from dsq.runtime import tune_allocator; "
         "print(tune_allocator(), tune_allocator(), os.environ.get('THP_MEM_ALLOC_ENABLE'))")


def _probe(**env) -> str:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DSQ_MALLOC_TUNING", "THP_MEM_ALLOC_ENABLE")}
    res = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env},
                         capture_output=True, text=True, check=True)
    return res.stdout.strip()


def test_applied_once_and_thp_set():
    assert _probe() == "True False 1"  # glibc tuned on the first call, not again


def test_opt_out_and_explicit_settings_win():
    assert _probe(DSQ_MALLOC_TUNING="0") == "False False None"
    assert _probe(THP_MEM_ALLOC_ENABLE="0") == "True False 0"


def test_kernel_keys_select_the_kernels_and_the_environment_overrides_them(monkeypatch):
    """quant.kernel / optim.kernel choose the implementation; DSQ_* variables override them and
    are recorded with what runs."""
    from dsq.config import load_config
    from dsq.quant import fused
    from dsq.runtime import configure_kernels

    for k in ("DSQ_QUANT_KERNEL", "DSQ_OPTIM_KERNEL", "DSQ_AMX_GEMM", "DSQ_ISA"):
        monkeypatch.delenv(k, raising=False)
    try:
        root = Path(__file__).resolve().parents[1]
        cfg = load_config([str(root / "configs/tiny.yaml"),
                           str(root / "configs/recipes/optim/m8v8.yaml")],
                          ["quant.kernel=reference", "optim.kernel=reference"])
        got = configure_kernels(cfg)
        assert fused.kernel() == "eager"
        assert got == {"kernels.quant": "reference", "kernels.optim": "reference"}
        monkeypatch.setenv("DSQ_QUANT_KERNEL", "cpp")
        fused.set_kernel(None)
        got = configure_kernels(cfg)  # the environment wins, and is logged
        assert fused.kernel() == "cpp" and got["env.DSQ_QUANT_KERNEL"] == "cpp"
        assert got["kernels.quant"].startswith("native/")
    finally:
        fused.set_kernel(None)
    bad = [str(Path(__file__).resolve().parents[1] / "configs/tiny.yaml")], ["quant.kernel=fast"]
    from dsq.config import ConfigError

    with pytest.raises(ConfigError, match="quant.kernel='fast': use auto, native, reference or "
                                          "compile"):
        load_config(*bad)
