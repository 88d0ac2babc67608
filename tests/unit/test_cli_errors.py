"""Bad input on every ``dsq`` subcommand, in process (``dsq.cli.main``): one ``dsq: error:``
line on stderr, exit 2, no traceback and nothing written (the folder the command was given
is as before). Data errors of ``dsq prepare`` beyond the CLI are tested in tests/unit/data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsq.cli import main
from tests.conftest import ROOT


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def inputs(tmp_path):
    """A folder of bad inputs: a file that is no config, no checkpoint, a JSONL record whose
    text is a number, a ZeRO-0 checkpoint root (a tag without ZeRO optimizer files)."""
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "text.txt").write_text("some text\n")
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    z0 = tmp_path / "zero0" / "step_00000004"
    z0.mkdir(parents=True)
    (tmp_path / "zero0" / "latest").write_text("step_00000004")
    (z0 / "mp_rank_00_model_states.pt").write_bytes(b"x")
    return tmp_path


CASES = {  # name: (argv with {t} for the inputs folder, a piece of the error line)
    "unknown command": (["nosuchcmd"], "unknown command 'nosuchcmd'"),
    "train: no config file": (["train", "{t}/none.yaml"], "does not exist"),
    "train: not YAML": (["train", "{t}/bad.yaml"], "is not valid YAML"),
    "train: bad value": (["train", "configs/tiny.yaml", "train.steps=abc",
                          "train.out_dir={t}/run"], "train.steps='abc' is not an integer"),
    "config: bad option": (["config", "configs/tiny.yaml", "--world-size", "x"],
                           "--world-size: invalid int value"),
    "config: unknown key": (["config", "configs/tiny.yaml", "train.nokey=1"], "train.nokey"),
    "prepare: a number as text": (["prepare", "configs/tiny.yaml", "data.train=[{t}/num.jsonl]",
                                   "data.cache_dir={t}/cache"], "num.jsonl"),
    "prepare: bad workers": (["prepare", "configs/tiny.yaml", "--workers", "0",
                              "data.cache_dir={t}/cache"], "--workers 0 must be >= 1"),
    "eval: no path": (["eval", "{t}/none", "--data", "{t}/text.txt"], "does not exist"),
    "eval: not a checkpoint": (["eval", "{t}/text.txt", "--data", "{t}/text.txt"],
                               "no complete checkpoint"),
    "export: no path": (["export", "{t}/none", "{t}/out"], "does not exist"),
    "export: not a checkpoint": (["export", "{t}/text.txt", "{t}/out"], "no complete checkpoint"),
    "export: bad option": (["export", "{t}/none", "{t}/out", "--weights", "bogus"],
                           "invalid choice: 'bogus'"),
    "generate: no path": (["generate", "{t}/none", "--prompt", "hi"], "does not exist"),
    "generate: not a checkpoint": (["generate", "{t}/text.txt", "--prompt", "hi"],
                                   "no complete checkpoint"),
    "generate: bad option": (["generate", "{t}/none", "--prompt", "hi", "--max-new-tokens",
                              "x"], "--max-new-tokens: invalid int value"),
    "reshard: no path": (["ckpt", "reshard", "{t}/none", "--dp", "1"], "is not a directory"),
    "reshard: a file": (["ckpt", "reshard", "{t}/text.txt", "--dp", "2"], "is not a directory"),
    "reshard: ZeRO-0": (["ckpt", "reshard", "{t}/zero0", "--dp", "2"],
                        "ZeRO-0 checkpoints do not depend on the data-parallel size"),
    "reshard: bad option": (["ckpt", "reshard", "{t}/zero0", "--dp", "x"],
                            "--dp: invalid int value"),
    "ckpt: unknown": (["ckpt", "bogus"], "usage: dsq ckpt reshard"),
    "mlflow: not a run": (["mlflow", "sync", "{t}/text.txt"], "not a dsq run directory"),
    "mlflow: unknown": (["mlflow", "bogus"], "invalid choice: 'bogus'"),
    "report: no store": (["report", "--experiment", "e", "--tracking-uri",
                          "sqlite:///{t}/none.db", "--out", "{t}/report"], "no MLflow store"),
    "bench: unknown": (["bench", "bogus"], "unknown benchmark 'bogus'"),
    "bench optim: bad option": (["bench", "optim", "--bogus"], "unrecognized arguments: --bogus"),
}


@pytest.fixture
def same_env():
    """``dsq`` sets environment variables (extensions dir, allocator): undone after."""
    env = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(env)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(case, inputs, capsys, same_env):
    argv, want = CASES[case]
    before = _tree(inputs)
    with pytest.raises(SystemExit) as e:
        main([a.format(t=inputs) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("dsq: error: ") and want in lines[0], lines[0]
    assert "Traceback" not in out + err and "error" not in out  # stdout: progress lines only
    assert _tree(inputs) == before


def test_reshard_of_a_missing_path_through_the_command():
    """The entry point itself (``python -m dsq.cli``): exit 2, one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-m", "dsq.cli", "ckpt", "reshard", "/nonexistent",
                          "--dp", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "dsq: error: /nonexistent is not a directory: give the checkpoint root "
        "(<train.out_dir>/checkpoints, which holds 'latest')"]
