import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "dsq" / "data" / "corpus" / "shakespeare"


def pytest_collection_modifyitems(config, items):
    """Mark each test ``unit`` or ``e2e`` by its folder: ``pytest -m unit`` runs the unit tests
    alone. (``-n 2`` runs each module on one xdist worker, ``--dist loadscope`` in
    pyproject.toml: a module's reference run, server or spawned TP group is built once.)"""
    for item in items:
        kind = Path(str(item.fspath)).resolve().relative_to(ROOT / "tests").parts[0]
        if kind in ("unit", "e2e"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module (tiny tensors: OpenMP spinning of two threads on a busy
    2-core machine is 20x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dist_one():
    """A one-process gloo group and megatron's parallel state (TP=1), torn down after the
    module."""
    import warnings

    import torch.distributed as dist

    from tests.dist_utils import free_port

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session (tokenizer training happens once)."""
    return tmp_path_factory.mktemp("data_cache")


def launch(nproc: int, *args: str, check: bool = True, timeout: int = 600, env=None, **popen):
    """Run ``launch/local.sh NPROC args...`` (the deepspeed launcher) and return the result."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", **(env or {})}
    cmd = ["bash", str(ROOT / "launch" / "local.sh"), str(nproc), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n"
                             f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def dsq(*args: str, check: bool = True, timeout: int = 600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-m", "dsq.cli", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"dsq {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def read_metrics(out_dir: Path, key: str = "train/loss") -> dict:
    import json

    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row[key]
    return out
