"""A real one-node SLURM cluster for the session: munged, slurmctld and slurmd on this host.

Everything lives in a temporary directory (config, munge key and socket, state, spool, logs,
free ports), so the fixture never touches a system SLURM. The node has this host's short name
and 2 CPUs; process tracking is ``proctrack/linuxproc`` and ``task/none`` (no cgroups here).
``AuthInfo=cred_expire=5`` shortens the wait before a requeued job may start again (SLURM
ties it to the credential lifetime, 120 s by default).

Missing SLURM binaries skip the tests on a developer machine and fail them in CI (CI=true),
where ``.ci/run`` installs them.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

from tests.conftest import ROOT

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo",
            "squeue")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


class Slurm:
    """Client side of the test cluster: commands run with its SLURM_CONF."""

    def __init__(self, root: Path, conf: Path, node: str):
        self.root, self.conf, self.node = root, conf, node
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "PYTHONWARNINGS"):
            env.pop(k, None)
        env.update(SLURM_CONF=str(conf), PATH=SEARCH_PATH, DSQ_PYTHON=sys.executable)
        self.env = env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw
            ) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=kw.pop("env", self.env), cwd=kw.pop("cwd", ROOT),
                             capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n"
                                 f"{res.stderr}\n{self.logs()}")
        return res

    def sbatch(self, *args: str, env: Optional[Dict[str, str]] = None, wait: bool = False,
               timeout: float = 900) -> int:
        """Submit from the repository root; returns the job id (after the end with wait)."""
        e = {**self.env, **(env or {})}
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
        res = self.run(*cmd, env=e, check=False, timeout=timeout)
        m = re.match(r"(\d+)", res.stdout.strip())
        if not m:
            raise AssertionError(f"sbatch gave no job id ({res.returncode}):\n{res.stdout}\n"
                                 f"{res.stderr}\n{self.logs()}")
        return int(m.group(1))

    def job(self, job_id: int) -> Dict[str, str]:
        """The fields of `scontrol show job` that tests read (state, restarts, exit code)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields = {}
        for key in ("JobState", "Reason", "Restarts", "ExitCode", "StartTime", "ArrayTaskId",
                    "ArrayJobId"):
            m = re.search(rf"\b{key}=(\S+)", out)
            if m:
                fields[key] = m.group(1)
        return fields

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_final(self, job_id: int, timeout: float = 900, poll: float = 0.5) -> Dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(poll)
        raise AssertionError(f"job {job_id} still {self.job(job_id)} after {timeout} s\n"
                             f"{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / name
            if p.is_file():
                out.append(f"--- {name}\n" + "\n".join(p.read_text().splitlines()[-lines:]))
        return "\n".join(out)


def _conf(root: Path, node: str, user: str) -> str:
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=dsqtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MinJobAge=600
KillWait=10
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
JobRequeue=1
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory={int(mem_mb * 0.9)} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: Optional[int]) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _stop(pid: Optional[int], timeout: float = 15) -> None:
    """Stop one daemon this fixture started, by its pid: SIGTERM, then SIGKILL."""
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = [b for b in BINARIES if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        msg = (f"SLURM is not installed (missing {', '.join(missing)}): apt-get install "
               f"slurmctld slurmd slurm-client munge")
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o700)
    for d in ("state", "spool"):
        (root / d).mkdir()
    node = socket.gethostname().split(".")[0]
    user = getpass.getuser()
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node, user))
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    cluster = Slurm(root, conf, node)
    env = cluster.env

    def daemon(*cmd: str) -> None:
        res = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd[0]} did not start ({res.returncode}): {res.stdout}"
                               f"{res.stderr}\n{cluster.logs()}")

    pids = {}
    try:
        daemon(shutil.which("munged", path=SEARCH_PATH), "--force", f"--socket={root}/munge.sock",
               f"--key-file={key}", f"--log-file={root}/munged.log",
               f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed")
        pids["munged"] = _pid(root / "munged.pid")
        daemon(shutil.which("slurmctld", path=SEARCH_PATH), "-f", str(conf))
        daemon(shutil.which("slurmd", path=SEARCH_PATH), "-f", str(conf))
        deadline = time.time() + 90
        state = ""
        while time.time() < deadline:
            for name in ("slurmctld", "slurmd"):
                pids[name] = pids.get(name) or _pid(root / f"{name}.pid")
            res = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=20)
            state = res.stdout.strip()
            if state == "idle":
                break
            if state.rstrip("*~#") in ("down", "drain", "drng", "fail"):
                cluster.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the SLURM node never became idle (sinfo: {state!r})\n"
                               f"{cluster.logs()}")
        yield cluster
    finally:
        jobs = cluster.run("squeue", "-h", "-o", "%A", check=False, timeout=20).stdout.split()
        if jobs:
            cluster.run("scancel", *jobs, check=False, timeout=20)
            deadline = time.time() + 30
            while time.time() < deadline and cluster.run(
                    "squeue", "-h", check=False, timeout=20).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmctld", "slurmd"):
            pids[name] = pids.get(name) or _pid(root / f"{name}.pid")
        cluster.run("scontrol", "shutdown", check=False, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            _stop(pids.get(name))
