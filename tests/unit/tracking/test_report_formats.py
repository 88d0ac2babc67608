"""``dsq report``'s SQNR and bits-per-element columns, read from a real MLflow store (sqlite)
seeded with the params, tags and metrics exactly as ``dsq train`` logs them."""

from __future__ import annotations

import pytest

from dsq.tracking.report import _bits, collect, markdown


def _seed_store(uri: str) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("formats")
    recipes = {  # quant.weight / activation / grad as flatten(to_dict(cfg)) logs them (str())
        "int8": ("int8:channel", "int8:token", "None"),
        "fp": ("mxfp8", "nvfp4", "fp8e5m2:token"),
    }
    # last SQNR per (recipe, seed): {layer/operand: dB}; an earlier eval step's values must not count
    sqnr = {
        ("int8", 1): {"qkv/weight": 40.0, "fc1/weight": 36.0, "qkv/activation": 30.0,
                      "fc1/activation": 26.0},
        ("int8", 2): {"qkv/weight": 42.0, "fc1/weight": 38.0, "qkv/activation": 32.0,
                      "fc1/activation": 28.0},
        ("fp", 1): {"qkv/weight": 31.0, "fc1/weight": 29.0, "qkv/activation": 20.0,
                    "fc1/activation": 18.0, "qkv/grad": 25.0, "fc1/grad": 23.0},
        ("fp", 2): {"qkv/weight": 33.0, "fc1/weight": 31.0, "qkv/activation": 22.0,
                    "fc1/activation": 20.0, "qkv/grad": 27.0, "fc1/grad": 25.0},
    }
    for (recipe, seed), last in sqnr.items():
        w, a, g = recipes[recipe]
        run = client.create_run(exp, run_name=recipe, tags={"dsq.recipe": recipe})
        rid = run.info.run_id
        params = {"train.seed": str(seed), "train.steps": "100", "model.hidden_size": "256",
                  "quant.weight": w, "quant.activation": a, "quant.grad": g,
                  "quant.grad_gemms": "weight", "quant.backward_operands": "quantized",
                  "optim.name": "adamw"}
        metrics = [Metric(f"sqnr_db/{k}", 5.0, 0, 50) for k in last]  # superseded eval step
        metrics += [Metric(f"sqnr_db/{k}", v, 1, 100) for k, v in last.items()]
        metrics += [Metric("val/loss", 5.0 + seed / 10, 1, 100),
                    Metric("summary/val_loss", 5.0 + seed / 10, 2, 100),
                    Metric("summary/train_loss", 5.1, 2, 100)]
        client.log_batch(rid, metrics=metrics,
                         params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(rid)


def test_sqnr_and_bits_per_element_from_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _seed_store(uri)
    rows = {r["recipe"]: r for r in collect(MlflowClient(uri), "formats")}
    i8, fp = rows["int8"], rows["fp"]
    # W: mean over layer types of the last value, then over seeds: (38 + 40) / 2
    assert i8["sqnr"]["W"] == pytest.approx(39.0) and i8["sqnr"]["A"] == pytest.approx(29.0)
    assert i8["sqnr"]["G"] != i8["sqnr"]["G"]  # nan: grad not quantized
    assert fp["sqnr"] == pytest.approx({"W": 31.0, "A": 20.0, "G": 25.0})
    # hidden 256: int8 per-row fp32 scale 8 + 32/256; mxfp8 8 + 8/32 (E8M0 per 32);
    # nvfp4 4 + 8/16 (E4M3 per 16) + 32/(256*256) (fp32 tensor scale); fp8 per-row 8 + 32/256
    assert i8["bits"]["W"] == pytest.approx(8.125) and i8["bits"]["A"] == pytest.approx(8.125)
    assert fp["bits"] == pytest.approx({"W": 8.25, "A": 4.5 + 32 / 65536, "G": 8.125})
    md = markdown(list(rows.values()), "formats")
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]]
             for ln in md.splitlines() if ln.startswith("| int8 ") or ln.startswith("| fp ")}
    assert cells["int8"][-2:] == ["39.0 / 29.0 / -", "8.125 / 8.125 / -"]
    assert cells["fp"][-2:] == ["31.0 / 20.0 / 25.0", "8.250 / 4.500 / 8.125"]
    assert "SQNR W / A / G (dB) | bits/elem W / A / G |" in md
    assert "reduction dimension 256)" in md


def test_bits_without_hidden_size_assume_the_reference():
    p = {"quant.weight": "int8:tensor", "quant.activation": "mxfp4", "quant.grad": "None"}
    # per-tensor fp32 scale over the assumed 1024 x 1024; mxfp4: 4 + 8/32; int4 group 128: 4 + 32/128
    assert _bits(p, "weight") == pytest.approx(8 + 32 / 1024 ** 2)
    assert _bits(p, "activation") == pytest.approx(4.25)
    assert _bits(p, "grad") != _bits(p, "grad")
    assert _bits({"quant.weight": "int4:group128"}, "weight") == pytest.approx(4.25)
    md = markdown(collect(_Fake(p), "exp"), "exp")
    assert "reduction dimension 1024 (assumed: no `model.hidden_size` logged)" in md


class _Fake:
    def __init__(self, p):
        from types import SimpleNamespace as NS

        self.r = NS(info=NS(run_id="r", run_name="x", status="FINISHED", start_time=0),
                    data=NS(params={"train.seed": "1", **p}, tags={}, metrics={}))

    def get_experiment_by_name(self, name):
        from types import SimpleNamespace as NS

        return NS(experiment_id="1")

    def search_runs(self, ids, max_results):
        return [self.r]
