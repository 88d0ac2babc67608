"""dsq.native.kernel_choice: one set of kernel names, one precedence rule (environment > config >
auto) for the quantization and optimizer kernels alike, and what runs as MLflow params."""

from pathlib import Path

import pytest

from dsq import runtime
from dsq.config import ConfigError, load_config
from dsq.native import kernel_choice
from dsq.native.kernel_choice import Kernel

ROOT = Path(__file__).resolve().parents[3]


def _cfg(*overrides):
    return load_config([str(ROOT / "configs/tiny.yaml"),
                        str(ROOT / "configs/recipes/optim/m8v8.yaml")], list(overrides))


@pytest.mark.parametrize("name,kernel", [("auto", Kernel.AUTO), ("native", Kernel.NATIVE),
                                         ("reference", Kernel.REFERENCE),
                                         ("compile", Kernel.COMPILE), ("cpp", Kernel.NATIVE),
                                         ("eager", Kernel.REFERENCE), (" Native ", Kernel.NATIVE)])
def test_names_and_old_aliases_parse(name, kernel):
    assert kernel_choice.parse(name) is kernel


def test_unknown_name_names_where_it_came_from():
    with pytest.raises(ValueError, match=r"DSQ_OPTIM_KERNEL='fast': use auto, native, "
                                         r"reference or compile"):
        runtime.resolve_kernels(_cfg(), {"DSQ_OPTIM_KERNEL": "fast"})
    with pytest.raises(ConfigError, match=r"quant.kernel='fast' is unknown: use auto, native, "
                                          r"reference or compile"):
        _cfg("quant.kernel=fast")


@pytest.mark.parametrize("family", ["quant", "optim"])
def test_one_precedence_rule_for_both_families(family):
    """The variable wins over the key, whatever the key says (also over a non-auto key), and
    takes the config's names."""
    var = kernel_choice.ENV[family]
    cfg = _cfg(f"{family}.kernel=reference")
    assert getattr(runtime.resolve_kernels(cfg, {}), family) is Kernel.REFERENCE
    got = runtime.resolve_kernels(cfg, {var: "native"})
    assert getattr(got, family) is Kernel.NATIVE and got.env == {var: "native"}
    other = "optim" if family == "quant" else "quant"
    assert getattr(got, other) is Kernel.AUTO
    assert getattr(runtime.resolve_kernels(_cfg(), {var: "eager"}), family) is Kernel.REFERENCE


def test_apply_and_describe_report_what_runs(monkeypatch):
    from dsq.optim import kernels as K
    from dsq.quant import cpu_kernels, fused

    for k in kernel_choice.OVERRIDES:
        monkeypatch.delenv(k, raising=False)
    try:
        choice = runtime.resolve_kernels(_cfg("quant.kernel=reference", "optim.kernel=reference"))
        runtime.apply_kernels(choice)
        assert fused.kernel() == "eager"
        got = runtime.describe_kernels(choice, qadamw=True)
        assert got == {"kernels.quant": "reference", "kernels.optim": "reference"}
        assert runtime.kernels_line(got) == ("kernels: quantization reference, optimizer "
                                                   "reference")
        env = {"DSQ_QUANT_KERNEL": "native", "DSQ_OPTIM_KERNEL": "native"}
        choice = runtime.resolve_kernels(_cfg("quant.kernel=reference", "optim.kernel=reference"),
                                       env)
        runtime.apply_kernels(choice)
        assert fused.kernel() == "cpp"
        got = runtime.describe_kernels(choice, qadamw=True)
        assert got == {"env.DSQ_QUANT_KERNEL": "native", "env.DSQ_OPTIM_KERNEL": "native",
                       "kernels.quant": f"native/{cpu_kernels.isa()}",
                       "kernels.optim": f"native/{K.isa()}"}
        assert runtime.kernels_line(got).endswith(
            "(set by DSQ_QUANT_KERNEL=native, DSQ_OPTIM_KERNEL=native)")
    finally:
        fused.set_kernel(None)


@pytest.mark.parametrize("value", ["native", "cpp", "reference"])
def test_environment_names_reach_the_kernels(monkeypatch, value):
    """DSQ_QUANT_KERNEL / DSQ_OPTIM_KERNEL read by the kernel modules themselves (a library
    user who builds QAdamW or quantizes without a config) take the same names."""
    import torch

    from dsq.optim import QAdamW
    from dsq.optim import kernels as K
    from dsq.quant import fused

    monkeypatch.setenv("DSQ_QUANT_KERNEL", value)
    monkeypatch.setenv("DSQ_OPTIM_KERNEL", value)
    try:
        fused.set_kernel(None)
        assert fused.kernel() == kernel_choice.impl(value)
        name = K.get_kernel("auto", torch.device("cpu")).name
        assert name == kernel_choice.impl(value)
        opt = QAdamW([torch.nn.Parameter(torch.zeros(4))], kernel=value)
        assert opt.kernel == kernel_choice.impl(value)
    finally:
        fused.set_kernel(None)
