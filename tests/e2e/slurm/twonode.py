"""A real two-node SLURM cluster on this one machine: two network namespaces, two slurmd.

Layout (all names carry this process's id, so two test runs never share anything)::

    root namespace        bridge dsqbr<pid>, 10.217.K.1/24: slurmctld, munged, the test (sbatch)
      |-- veth --  netns dsq<pid>-1  eth0 10.217.K.2/24, hostname dsq-node1: slurmd -N dsq-node1
      '-- veth --  netns dsq<pid>-2  eth0 10.217.K.3/24, hostname dsq-node2: slurmd -N dsq-node2

Each slurmd runs in its own network namespace (``nsenter --net``) with its own UTS and mount
namespace (``unshare --uts --mount``): ``hostname`` says its node name, and ``/etc/hosts`` is a
bind mount of a file in the cluster's directory that names the controller and both nodes (and
nothing else, so a node's name never resolves to 127.0.1.1). Jobs, job steps and ranks are
children of their node's slurmd, so they see the same: a rank on dsq-node2 reaches dsq-node1
over the veth pair and the bridge, exactly as over a cluster network. The namespaces have no
default route; no packet leaves 10.217.K.0/24. The file system is shared, like a cluster's
shared home/scratch. Each node has 1 CPU (``CPUs=1``) and half the memory. munged (a Unix
socket, reachable from every namespace by its path) and slurmctld run in the root namespace.

Debian's SLURM is built with MULTIPLE_SLURMD (``scontrol show config``), so the slurmd
pid/log/spool paths use ``%n``; the namespaces are what gives each node its own address and
hostname, which several slurmd on one address cannot.

:meth:`TwoNodeCluster.crash` SIGKILLs every process of a node's namespace (slurmd, slurmstepd,
torchrun, ranks): a node going down. :meth:`TwoNodeCluster.boot` starts its slurmd again.
:meth:`TwoNodeCluster.stop` (always called by the fixture) cancels jobs, stops the daemons,
kills whatever is left in the namespaces, deletes them and the bridge.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from .conftest import SEARCH_PATH, Slurm, _alive, _free_port, _pid, _stop

NODES = ("dsq-node1", "dsq-node2")


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PATH": SEARCH_PATH})
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def missing_tools() -> List[str]:
    """What building the cluster needs besides SLURM: root, iproute2, util-linux."""
    missing = [t for t in ("ip", "nsenter", "unshare", "mount", "hostname")
               if shutil.which(t, path=SEARCH_PATH) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    return missing


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.217.K.0/24 no interface of this machine has an address in."""
    used = [ipaddress.ip_interface(w) for line in _sh("ip", "-o", "-4", "addr").stdout.splitlines()
            for w in line.split() if "/" in w and w[0].isdigit()]
    for k in [(os.getpid() + i) % 250 + 1 for i in range(250)]:
        net = ipaddress.ip_network(f"10.217.{k}.0/24")
        if not any(u.ip in net or net.overlaps(u.network) for u in used):
            return net
    raise RuntimeError("no free 10.217.K.0/24 subnet")


class TwoNodeCluster(Slurm):
    def __init__(self, root: Path):
        self.tag = str(os.getpid())
        self.net = _free_subnet()
        hosts = list(self.net.hosts())
        self.ctl_addr = str(hosts[0])
        self.addr = {n: str(hosts[i + 1]) for i, n in enumerate(NODES)}
        self.ns = {n: f"dsq{self.tag}-{i + 1}" for i, n in enumerate(NODES)}
        self.bridge = f"dsqbr{self.tag}"
        self.ctl_host = socket.gethostname().split(".")[0]
        self.pids: Dict[str, Optional[int]] = {}
        root.chmod(0o700)
        for d in ("state", "spool"):
            (root / d).mkdir()
        conf = root / "slurm.conf"
        super().__init__(root, conf, NODES[0])
        conf.write_text(self._conf())
        self.hosts = root / "hosts"
        self.hosts.write_text(
            "127.0.0.1 localhost\n" f"{self.ctl_addr} {self.ctl_host}\n"
            + "".join(f"{a} {n}\n" for n, a in self.addr.items()))
        self.hosts.chmod(0o644)

    def _conf(self) -> str:
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        root, user = self.root, getpass.getuser()
        nodes = "".join(f"NodeName={n} NodeHostname={n} NodeAddr={a} CPUs=1 "
                        f"RealMemory={int(mem_mb * 0.45)} State=UNKNOWN\n"
                        for n, a in self.addr.items())
        return f"""\
ClusterName=dsqtest2
SlurmctldHost={self.ctl_host}({self.ctl_addr})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
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
{nodes}PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def logs(self, lines: int = 30) -> str:
        out = []
        for p in sorted(self.root.glob("*.log")):
            out.append(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    # ---- network
    def _network(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.ctl_addr}/{self.net.prefixlen}", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, node in enumerate(NODES):
            ns, veth = self.ns[node], f"dsqv{self.tag}-{i + 1}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", veth, "master", self.bridge, "up")
            for cmd in (["addr", "add", f"{self.addr[node]}/{self.net.prefixlen}", "dev", "eth0"],
                        ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
                _sh("ip", "-n", ns, *cmd)

    def ns_pids(self, node: str) -> List[int]:
        res = _sh("ip", "netns", "pids", self.ns[node], check=False)
        return [int(p) for p in res.stdout.split()]

    # ---- daemons
    def _daemon(self, *cmd: str) -> None:
        res = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... did not start ({res.returncode}): "
                               f"{res.stdout}{res.stderr}\n{self.logs()}")

    def boot(self, node: str) -> None:
        """Start the node's slurmd in its namespaces, with its hostname and /etc/hosts."""
        slurmd = shutil.which("slurmd", path=SEARCH_PATH)
        # nsenter --net rather than `ip netns exec`, which remounts /sys and so hides the
        # cgroup file system that slurmd probes at start
        (self.root / "spool" / node).mkdir(exist_ok=True)
        self._daemon("nsenter", f"--net=/run/netns/{self.ns[node]}", "unshare", "--uts", "--mount",
                     "--propagation", "private", "sh", "-c",
                     'mount --bind "$1" /etc/hosts && hostname "$2" && exec "$3" -f "$4" -N "$2"',
                     "sh", str(self.hosts), node, slurmd, str(self.conf))
        self.pids[node] = None
        deadline = time.time() + 30
        while self.pids[node] is None and time.time() < deadline:
            self.pids[node] = _pid(self.root / f"slurmd.{node}.pid")
            time.sleep(0.1)

    def node_states(self) -> Dict[str, str]:
        res = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=20)
        return dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        states: Dict[str, str] = {}
        while time.time() < deadline:
            states = self.node_states()
            if [states.get(n) for n in NODES] == ["idle"] * len(NODES):
                return
            for n, s in states.items():
                if s.rstrip("*~#") in ("down", "drain", "drng", "fail"):
                    self.run("scontrol", "update", f"nodename={n}", "state=resume", check=False)
            time.sleep(0.3)
        raise RuntimeError(f"the nodes never became idle (sinfo: {states})\n{self.logs()}")

    def start(self) -> None:
        self._network()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        root = self.root
        self._daemon(shutil.which("munged", path=SEARCH_PATH), "--force",
                     f"--socket={root}/munge.sock", f"--key-file={key}",
                     f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid",
                     f"--seed-file={root}/munged.seed")
        self.pids["munged"] = _pid(root / "munged.pid")
        self._daemon(shutil.which("slurmctld", path=SEARCH_PATH), "-f", str(self.conf))
        self.pids["slurmctld"] = _pid(root / "slurmctld.pid")
        for node in NODES:
            self.boot(node)
        self.wait_idle()

    def crash(self, node: str) -> List[int]:
        """SIGKILL every process of the node (slurmd, slurmstepd, launcher, ranks)."""
        killed = []
        for _ in range(5):  # a process may fork while we kill
            pids = self.ns_pids(node)
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                    killed.append(p)
                except OSError:
                    pass
            time.sleep(0.05)
        return killed

    def stop(self) -> None:
        """Stop everything start() made, whatever state it is in."""
        try:
            if _alive(self.pids.get("slurmctld")):
                jobs = self.run("squeue", "-h", "-o", "%A", check=False, timeout=20).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=20)
                self.run("scontrol", "shutdown", check=False, timeout=30)
        finally:
            for name in ("slurmctld", *NODES, "munged"):
                pid = self.pids.get(name) or _pid(self.root / (
                    f"slurmd.{name}.pid" if name in NODES else f"{name}.pid"))
                _stop(pid, timeout=10)
            for node in NODES:
                self.crash(node)
                _sh("ip", "netns", "del", self.ns[node], check=False)
            _sh("ip", "link", "del", self.bridge, check=False)
