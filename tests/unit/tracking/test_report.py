"""``dsq report`` over seeds: grouping, paired differences and their noise, distinct styles."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import pytest

from dsq.tracking.report import collect, markdown, styles, t975


class FakeClient:
    def __init__(self, runs):
        self.runs = runs

    def get_experiment_by_name(self, name):
        return NS(experiment_id="1") if name == "exp" else None

    def search_experiments(self):
        return [NS(name="exp")]

    def search_runs(self, ids, max_results):
        return self.runs


def run(recipe, seed, val, status="FINISHED", start=0, **params):
    p = {"train.seed": str(seed), "train.steps": "400", **params}
    return NS(info=NS(run_id=f"{recipe}-{seed}-{start}", run_name=recipe, status=status,
                      start_time=start),
              data=NS(params=p, tags={"dsq.recipe": recipe},
                      metrics={"summary/val_loss": val, "summary/train_loss": val + 0.1}))


def test_seeds_grouped_paired_differences_and_noise():
    base = [5.30, 5.34, 5.26]
    runs = [run("baseline", s, v) for s, v in zip((1, 2, 3), base)]
    # a recipe worse by 0.05 +- 0.001 per seed: beyond noise; one within noise
    runs += [run("w4a4", s, v + 0.05 + e, **{"quant.weight": "int4:channel"})
             for s, v, e in zip((1, 2, 3), base, (0.001, -0.001, 0.0))]
    runs += [run("w8a8", s, v + e, **{"quant.weight": "int8:channel",
                                       "quant.backward_operands": "full"})
             for s, v, e in zip((1, 2, 3), base, (0.01, -0.012, 0.004))]
    # superseded, running and failed runs do not count
    runs += [run("w8a8", 1, 9.0, start=-1), run("w8a8", 4, 1.0, status="RUNNING"),
             run("w8a8", 5, 1.0, status="FAILED")]
    rows = {r["recipe"]: r for r in collect(FakeClient(runs), "exp")}
    assert list(rows) == ["baseline", "w4a4", "w8a8"]
    b, w4, w8 = rows["baseline"], rows["w4a4"], rows["w8a8"]
    assert (b["n"], w4["n"], w8["n"]) == (3, 3, 3) and w8["seeds"] == [1, 2, 3]
    assert b["val_loss"] == pytest.approx(5.30) and b["val_std"] == pytest.approx(0.04)
    assert w4["delta_val"] == pytest.approx(0.05)
    assert w4["delta_se"] == pytest.approx(0.001 / math.sqrt(3))
    assert w4["beyond_noise"] is True
    d = [0.01, -0.012, 0.004]
    sd = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert w8["delta_val"] == pytest.approx(sum(d) / 3) and w8["delta_se"] == pytest.approx(
        sd / math.sqrt(3))
    assert w8["beyond_noise"] is False and w8["backward"] == "full"
    assert b["beyond_noise"] is None and b["backward"] == "-"
    md = markdown(list(rows.values()), "exp")
    line = next(ln for ln in md.splitlines() if ln.startswith("| w4a4 "))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[4] == "quantized"
    assert cells[7:14] == ["3", "5.4500", "5.3500", "0.0395", "+0.0500",
                           f"{0.001 / math.sqrt(3):.4f}", "yes"]


def test_a_tiny_standard_error_keeps_two_significant_digits():
    base = [5.30, 5.34, 5.26]
    d = [0.0012, 0.0012, 0.0013]  # seeds that move alike: s.e. 3.3e-5
    runs = [run("baseline", s, v) for s, v in zip((1, 2, 3), base)]
    runs += [run("fp8-states", s, v + e) for s, v, e in zip((1, 2, 3), base, d)]
    rows = collect(FakeClient(runs), "exp")
    se = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2) / math.sqrt(3)
    assert rows[1]["delta_se"] == pytest.approx(se) and rows[1]["beyond_noise"] is True
    line = next(ln for ln in markdown(rows, "exp").splitlines() if ln.startswith("| fp8-states "))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[11:14] == ["+0.0012", "0.000033", "yes"]


def test_one_seed_has_no_error_bars():
    rows = collect(FakeClient([run("baseline", 1, 5.0), run("a8", 1, 5.1)]), "exp")
    a8 = rows[1]
    assert a8["delta_val"] == pytest.approx(0.1)
    assert math.isnan(a8["delta_se"]) and a8["beyond_noise"] is None and math.isnan(a8["val_std"])


def test_t_quantiles():
    assert t975(2) == 4.303 and t975(1) == 12.706 and t975(100) == 1.96


def test_every_curve_has_its_own_style():
    st = styles(40)
    keys = {(s["color"], s["marker"], s["linestyle"]) for s in st}
    assert len(keys) == 40


def test_failed_runs_are_left_out_and_listed():
    runs = [run("baseline", s, 5.3) for s in (1, 2)]
    runs += [run("signed-v", 1, 5.9), run("signed-v", 2, 7.0, status="FAILED")]
    runs += [run("diverged", s, 8.0, status="FAILED") for s in (1, 2)]
    rows = {r["recipe"]: r for r in collect(FakeClient(runs), "exp")}
    assert rows["signed-v"]["n"] == 1 and len(rows["signed-v"]["failed"]) == 1
    assert rows["signed-v"]["val_loss"] == pytest.approx(5.9)
    assert rows["diverged"]["n"] == 0 and math.isnan(rows["diverged"]["val_loss"])
    md = markdown(list(rows.values()), "exp")
    assert "| 1 (1 failed) |" in md and "| 0 (2 failed) |" in md
    assert "- diverged seed 2: last validation loss" in md


def test_formats_given_as_mappings_are_shown_as_short_strings():
    """A recipe's format written as a mapping reaches MLflow as one param per field."""
    p = {"quant.weight.bits": "8", "quant.weight.granularity": "channel",
         "quant.weight.symmetric": "True", "quant.weight.rounding": "nearest",
         "quant.weight.group_size": "None", "quant.weight.min_range": "1e-05",
         "quant.activation": "int8:token", "quant.grad": "None",
         "quant.backward_operands": "full"}
    rows = collect(FakeClient([run("baseline", 1, 5.0), run("study", 1, 5.1, **p)]), "exp")
    study = rows[1]
    assert (study["W"], study["A"], study["G"]) == ("int8:channel:min=1e-05", "int8:token", "-")
    assert study["backward"] == "full" and rows[0]["backward"] == "-"


def test_a_diverging_curve_is_drawn_off_scale():
    from dsq.tracking.report import _y_range

    near = {"a": ([100, 200], [5.8, 5.3], [0.01, 0.01]), "b": ([100, 200], [5.9, 5.4], [0, 0])}
    assert _y_range(near) is None
    lo, hi = _y_range({**near, "signed-v": ([100, 200], [46.0, 9.5], [10.0, 1.2])})
    assert 5.2 < lo < 5.29 and 5.91 < hi < 6.0
