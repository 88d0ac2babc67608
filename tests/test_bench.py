"""Smoke tests of ``dsq bench linear`` and ``dsq bench train`` (schemas, never timings)."""

import json

import pytest

from .conftest import dsq


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
    assert by[("bf16 nn.Linear", "32x16->24")]["speedup_vs_bf16"] == 1.0
    assert "| dsq int8 " in res.stdout  # the table


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
