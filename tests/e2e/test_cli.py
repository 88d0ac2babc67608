"""First contact: --help everywhere, --version, usage without a config, clear errors for paths
that cannot be written; the progress lines and spike guard; threads per rank; the lock file."""

import io
import os
import re
import subprocess
import sys

import pytest

from dsq.config import ConfigError, check_paths, load_config
from dsq.train.progress import Progress, SpikeGuard

from tests.conftest import ROOT, dsq

SUBCOMMANDS = ["train", "prepare", "eval", "config", "mlflow", "report", "ckpt", "bench",
               "bench optim", "bench linear", "bench train", "ckpt reshard", "mlflow sync"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_on_every_subcommand(cmd):
    res = dsq(*cmd.split(), "--help", timeout=120)
    assert res.returncode == 0 and res.stdout.lower().startswith("usage:"), res.stdout[:300]
    assert "does not exist" not in res.stdout + res.stderr


def test_version_and_bare_commands():
    import dsq as pkg

    assert dsq("--version").stdout.strip() == f"dsq {pkg.__version__}"
    res = dsq("train", check=False)
    assert res.returncode == 2 and res.stderr.startswith("usage: dsq train CONFIG...")
    assert "give at least one config file" in res.stderr
    res = dsq(check=False)
    assert res.returncode == 2 and "commands:" in res.stderr


def _unwritable(tmp_path) -> str:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return str(blocker / "run")  # a directory below a regular file can never be made


def test_unwritable_out_dir_is_one_error_before_anything_runs(tmp_path):
    out = _unwritable(tmp_path)
    with pytest.raises(ConfigError, match=r"train.out_dir=.*cannot be written: .*a-file is a file"):
        check_paths(load_config([], [f"train.out_dir={out}"]))
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a plain user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="is not writable"):
            check_paths(load_config([], [f"train.out_dir={ro / 'run'}"]))
    cache = tmp_path / "cache"
    for args in (["train"], ["config", "--check-paths"]):
        res = dsq(*args, "configs/tiny.yaml", f"train.out_dir={out}", f"data.cache_dir={cache}",
                  check=False, timeout=120)
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(err) == 1, res.stderr
        assert err[0].startswith("dsq: error: train.out_dir=") and "set train.out_dir" in err[0]
        assert not cache.exists()  # checked before data preparation
    # launch/local.sh's pre-check: no rank starts
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", "launch/local.sh", "2", "configs/tiny.yaml",
                          f"train.out_dir={out}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "train.out_dir" in res.stderr
    assert "spawned" not in res.stdout + res.stderr and "deepspeed" not in res.stdout.lower()


def test_corrupt_tokenizer_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("not a model\n")
    res = dsq("prepare", "configs/tiny.yaml", f"data.tokenizer={bad}",
              f"data.cache_dir={tmp_path / 'cache'}", check=False, timeout=120)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert err[0].startswith(f"dsq: error: data.tokenizer='{bad}' is not a sentencepiece model")
    assert "INTERNAL" not in err[0] and not (tmp_path / "cache").exists()


def test_spike_guard_flags_only_spikes():
    g = SpikeGuard(factor=1.25, window=10)
    losses = [7.6, 7.5, 7.3, 7.1, 6.9, 6.7, 6.5, 6.4, 6.3, 6.35, 9.56, 6.3, 6.2]
    flagged = {s: g.check(s, x) for s, x in enumerate(losses, 1)}
    assert [s for s, r in flagged.items() if r] == [11] == g.spikes
    # ratio to the median of the 10 steps before it (6.8)
    assert flagged[11] == pytest.approx(9.56 / 6.8)
    assert SpikeGuard(factor=0).check(1, 1.0) is None
    g = SpikeGuard(factor=1.25, window=10)
    assert not any(g.check(s, x) for s, x in enumerate([9.0, 20.0, 8.0, 7.0], 1))  # too early
    with pytest.raises(ConfigError, match="train.spike_factor"):
        load_config([], ["train.spike_factor=0.9"])


def test_progress_without_a_terminal_prints_plain_lines():
    out = io.StringIO()
    p = Progress(total=25, initial=0, log_every=10, stream=out)
    for step in range(1, 26):
        p.update(step, {"loss": f"{10 - step / 10:.4f}", "tok/s": "1,000"})
    p.close()
    lines = out.getvalue().splitlines()
    # the first step, every log_every, the last
    assert lines == ["step 1/25  loss 9.9000  tok/s 1,000",
                     "step 10/25  loss 9.0000  tok/s 1,000", "step 20/25  loss 8.0000  tok/s 1,000",
                     "step 25/25  loss 7.5000  tok/s 1,000"]
    assert "\r" not in out.getvalue()


@pytest.mark.parametrize("env, threads", [
    ({"WORLD_SIZE": "2"}, None),                        # cores / 2
    ({"WORLD_SIZE": "4", "OMP_NUM_THREADS": "2"}, 2),   # the user's setting wins
    ({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "8"}, 0),  # torchrun: ranks on this node
])
def test_threads_per_rank(env, threads):
    code = ("from dsq.runtime import set_threads_per_rank, cores_available; import torch; "
            "n = set_threads_per_rank(); print(n, torch.get_num_threads(), cores_available())")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE",
                                                            "LOCAL_WORLD_SIZE",
                                                            "DSQ_NPROC_PER_NODE")}
    res = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    n, torch_n, cores = map(int, res.stdout.split())
    expected = {None: max(1, cores // 2), 2: 2, 0: cores}[threads]
    assert n == torch_n == expected


def test_lock_pins_what_ci_runs():
    """launch/requirements.lock: exact pins, torch the CPU 2.13.0, every dependency of
    pyproject.toml listed, and the versions of this (CI's) environment."""
    import tomllib
    from importlib import metadata

    pins = {}
    for ln in (ROOT / "launch/requirements.lock").read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", ln.strip())
            assert m, f"not an exact pin: {ln!r}"
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    assert pins["torch"] == "2.13.0" and "dsq" not in pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["test"]
    for req in list(wanted):  # the test extra names dsq[export]: pin what that extra needs
        if m := re.fullmatch(r"dsq\[(\w+)\]", req):
            wanted.remove(req)
            wanted += extras[m.group(1)]
    for req in wanted:
        name = re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()
        assert name in pins, f"{name} from pyproject.toml is not in the lock"
        assert "<" in req, f"{req}: give an upper bound"
    for name, version in pins.items():
        if name == "torch":
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a platform-specific package of the lock's source environment
        assert installed == version, f"{name}: lock {version}, installed {installed}"
