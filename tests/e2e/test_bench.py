"""Smoke tests of ``dsq bench linear`` and ``dsq bench train`` (schemas, never timings)."""

import json

import pytest

from tests.conftest import dsq


def test_bench_linear_json_rows(tmp_path):
    out = tmp_path / "linear.json"
    res = dsq("bench", "linear", "--tokens", "32", "--shapes", "16x24,24x8", "--repeats", "1",
              "--warmup", "0", "--no-compile", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    names = {r["name"] for r in rows}
    assert {"fp32 nn.Linear", "bf16 nn.Linear", "dsq simulate", "dsq int8"} <= names
    assert {r["shape"] for r in rows} == {"32x16->24", "32x24->8"}
    for r in rows:
        assert isinstance(r["name"], str) and isinstance(r["shape"], str)
        assert isinstance(r["ms"], float) and r["ms"] > 0
        assert isinstance(r["speedup_vs_bf16"], float) and r["speedup_vs_bf16"] > 0
        assert r["saved_MiB"] >= 0
    by = {(r["name"], r["shape"]): r for r in rows}
    # int8 codes saved for backward instead of bf16 activations
    assert by[("dsq int8", "32x16->24")]["saved_MiB"] < by[("bf16 nn.Linear", "32x16->24")][
        "saved_MiB"]
    # the study's full-precision backward operands keep bf16 X (32 x 16 x 2 bytes) and the
    # weight itself (a parameter: not counted) where the default keeps the int8 codes and
    # scales of X (32 x 16 + 32 x 4 bytes) and of W (24 x 16 + 24 x 4)
    full = by[("dsq simulate, full backward", "32x16->24")]["saved_MiB"] * 2**20
    quant = by[("dsq simulate", "32x16->24")]["saved_MiB"] * 2**20
    assert full - quant == pytest.approx(32 * 16 * 2 - (32 * 16 + 32 * 4) - (24 * 16 + 24 * 4),
                                         abs=0.5)
    assert by[("bf16 nn.Linear", "32x16->24")]["speedup_vs_bf16"] == 1.0
    assert "| dsq int8 " in res.stdout  # the table
    # headed by the CPU and the instruction set of each kernel, in the table and the JSON
    from dsq import native
    from dsq.quant import cpu_kernels

    cpu = json.loads(out.read_text())["cpu"]
    assert cpu["model"] == native.cpu_model() and cpu["quant_kernels"] == cpu_kernels.isa()
    assert res.stdout.startswith(f"CPU: {native.cpu_model()} (")
    assert f"dsq kernels: quantization and rescale C/{cpu['quant_kernels']}, integer GEMMs " \
        in res.stdout
    assert by[("dsq int8", "32x16->24")]["kernels"] == f"C/{cpu['quant_kernels']} + " + (
        "dsq AMX driver" if "AMX driver" in cpu["int8_gemm"] else "torch._int_mm")
    for r in rows:  # against the fastest float row of the shape
        base = by[(r["baseline"], r["shape"])]
        assert base["ms"] == min(by[(f"{d} nn.Linear", r["shape"])]["ms"] for d in ("fp32", "bf16"))
        assert r["speedup_vs_baseline"] == pytest.approx(base["ms"] / r["ms"])
    assert "error" not in res.stderr.lower()  # no compiler output


def test_bench_optim_names_cpu_and_kernel(tmp_path):
    from dsq.optim import kernels as K

    out = tmp_path / "optim.json"
    res = dsq("bench", "optim", "--params", "1e5", "--repeat", "1", "--warmup", "0", "--only",
              "torch_adamw_fused", "dsq_8bit", "--json", str(out))
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["dsq_8bit"]["kernel"] == f"C/{K.isa()}"
    assert rows["torch_adamw_fused"]["kernel"] == "PyTorch / library"
    lines = res.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and lines[1] == f"dsq QAdamW kernel: C/{K.isa()}"
    assert rows["dsq_8bit"]["state_bytes_per_param"] == pytest.approx(2.0, abs=0.05)
    assert "error" not in res.stderr.lower()


def test_bench_train_recipes_resolve():
    from dsq.bench.train import RECIPES_DIR, resolve

    files, over, env = resolve("w8a8g8-both+qadamw+int8", "bf16", "compile")
    assert files == [str(RECIPES_DIR / "w8a8g8-both.yaml")]
    assert over == ["optim.name=qadamw", "quant.compute=int8", "deepspeed.precision=bf16"]
    assert env == {"DSQ_QUANT_KERNEL": "compile"}
    files, over, env = resolve("fp32", "bf16", "compile")
    assert files == [str(RECIPES_DIR / "baseline.yaml")] and over == ["deepspeed.precision=fp32"]
    assert env == {} and resolve("w8a8+int8", "bf16")[2] == {}
    with pytest.raises(ValueError, match="neither fp32, bf16 nor one of"):
        resolve("w9a9", "bf16")
    with pytest.raises(ValueError, match="unknown modifier 'int4'"):
        resolve("w8a8+int4", "bf16")


def test_bench_train_compare_and_table():
    from dsq.bench.train import compare, format_table

    rows = [{"recipe": r, "tokens_per_s": t, "peak_rss_bytes": [2**20, 2**21], "val_loss": v,
             "error": None} for r, t, v in (("fp32", 100.0, 5.0), ("bf16", 200.0, 5.0),
                                            ("w8a8+qadamw", 150.0, 5.0),
                                            ("w8a8+qadamw+int8", 300.0, 5.05))]
    rows.append({"recipe": "x+qadamw", "tokens_per_s": None, "peak_rss_bytes": None,
                 "val_loss": None, "error": "exit 1: boom"})
    compare(rows)
    assert rows[3]["speedup_vs_best_baseline"] == pytest.approx(1.5)
    assert rows[3]["val_loss_vs_simulated"] == pytest.approx(0.01)
    table = format_table(rows)
    assert "1.50x" in table and "+1.0%" in table and "failed: exit 1: boom" in table


def test_bench_train_recompute_rows():
    """--recompute: peak memory (largest rank) vs the same recipe without recompute; the
    speedup against the baseline of the same mode."""
    from dsq.bench.train import compare, format_table

    def row(recipe, mode, tps, peaks):
        return {"recipe": recipe, "recompute": mode, "tokens_per_s": tps,
                "peak_rss_bytes": peaks, "val_loss": 5.0, "error": None}

    rows = [row("fp32", "none", 100.0, [100 * 2**20, 90 * 2**20]),
            row("fp32", "full", 80.0, [75 * 2**20, 70 * 2**20]),
            row("w8a8", "full", 40.0, [60 * 2**20, 60 * 2**20])]
    compare(rows)
    assert rows[0]["peak_vs_no_recompute"] is None
    assert rows[1]["peak_vs_no_recompute"] == pytest.approx(-0.25)
    assert rows[2]["peak_vs_no_recompute"] is None  # no w8a8 row without recompute
    assert rows[2]["speedup_vs_best_baseline"] == pytest.approx(0.5)  # vs fp32 full
    table = format_table(rows)
    assert "| recompute |" in table and "-25%" in table
    plain = [row("fp32", "none", 1.0, [2**20])]
    compare(plain)
    assert "recompute" not in format_table(plain)


def test_bench_train_checkpoint_stall_rows():
    """--async-ckpt false,true: each row's checkpoint mode and stall per save; speedups are
    compared within a mode."""
    from dsq.bench.train import compare, format_table

    rows = [{"recipe": "fp32", "async_ckpt": a, "ckpt_stall_s": st, "tokens_per_s": t,
             "peak_rss_bytes": [2**20], "val_loss": 5.0, "error": None}
            for a, st, t in ((False, 0.5, 100.0), (True, 0.02, 120.0))]
    compare(rows)
    assert [r["speedup_vs_best_baseline"] for r in rows] == [1.0, 1.0]
    table = format_table(rows)
    assert "| ckpt  | stall/save s |" in table
    assert "| sync  |        0.500 |" in table and "| async |        0.020 |" in table
