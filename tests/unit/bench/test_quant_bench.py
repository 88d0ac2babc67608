"""``dsq bench quant`` in process: its rows (schema and the formats asked for, never timings)
and its one-line error on a bad format."""

import json

import pytest

from dsq.bench import quant


def test_rows_per_format_and_shape(tmp_path, capsys):
    out = tmp_path / "q.json"
    quant.main(["--formats", "mxfp4", "nvfp4:stochastic", "fp8e4m3:token", "--shapes", "32x64",
                "16x32", "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
                "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["format"], r["shape"]) for r in rows] == [
        (f, s) for s in ("32x64", "16x32") for f in ("mxfp4", "nvfp4:stochastic", "fp8e4m3:token")]
    assert all(isinstance(r["ms"], float) and r["ms"] > 0 for r in rows)
    table = capsys.readouterr().out
    assert "nvfp4:stochastic" in table and "16x32" in table


@pytest.mark.parametrize("argv, msg", [(["--formats", "mxfp5"], "dsq: error: --formats"),
                                       (["--shapes", "12by4"], "ROWSxCOLS")])
def test_bad_input_exits_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        quant.main(argv + ["--repeats", "1"])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
