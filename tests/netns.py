"""Several "hosts" on one machine for multi-host MPI runs: Linux network namespaces on a bridge.

    with NetnsHosts(2) as hosts:                       # root only; see netns_unavailable()
        p = hosts.mpiexec([2, 2], [sys.executable, "-m", "mpidqn", ...], timeout=120)

Layout: one namespace per host (``<prefix>-h<i>``) holding an interface ``mpi0`` with address
``10.231.0.<i+1>/24``; its veth peer sits on a bridge in a switch namespace (``<prefix>-sw``), so
nothing is added to the machine's own namespace. Names are unique per process and instance.
Namespaces share the machine's hostname and file system (run dirs are "shared storage").

MPICH's Hydra ``mpiexec`` runs in host 0 with its ssh launcher pointed at ``tests/netns_ssh``,
which starts each host's proxy inside that host's namespace (no sshd). MPI traffic is pinned to
``mpi0`` over TCP (ofi/tcp), as on a cluster where the interface matters (pmodels/mpich#7028).
:meth:`NetnsHosts.link_down` cuts a host off the bridge, as a failed NIC or switch port would.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

SHIM = Path(__file__).resolve().parent / "netns_ssh"
IFACE = "mpi0"
SUBNET = "10.231.0"
# ofi over TCP on the test interface; Hydra's own control traffic is pinned by `-iface`.
TRANSPORT = {"FI_PROVIDER": "tcp", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_TCP_IFACE": IFACE}
_count = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why namespaces with veth pairs cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    try:
        with NetnsHosts(1):
            pass
    except (subprocess.CalledProcessError, OSError) as e:
        err = getattr(e, "stderr", "") or str(e)
        return f"cannot create a network namespace with a veth pair: {err.strip()}"
    return None


def hydra_mpiexec() -> str | None:
    """Why the mpiexec on PATH cannot run the multi-host tests (None: it is MPICH's Hydra)."""
    exe = shutil.which("mpiexec")
    if exe is None:
        return "no mpiexec on PATH"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    return None if "HYDRA" in out else "the multi-host harness drives MPICH's Hydra mpiexec (ssh launcher)"


class NetnsHosts:
    """``n`` hosts (network namespaces) on one bridge; a context manager that deletes them."""

    def __init__(self, n: int) -> None:
        if not 1 <= n <= 250:
            raise ValueError(f"n must be in 1..250, got {n}")
        self.prefix = f"mpidqn{os.getpid()}-{next(_count)}"
        self.switch = f"{self.prefix}-sw"
        self.names = [f"{self.prefix}-h{i}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in (self.switch, *self.names):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addrs)):
            port = f"p{i}"
            _ip("-n", ns, "link", "add", IFACE, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")

    def __enter__(self) -> NetnsHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill what still runs in the namespaces (this harness started it), then delete them."""
        for ns in reversed(self._made):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        self._made.clear()

    # ------------------------------------------------------------------------------------- launch

    def env(self) -> dict[str, str]:
        """Environment for mpiexec and ranks: the shim's host map and the TCP transport."""
        hosts = " ".join(f"{a}={ns}" for a, ns in zip(self.addrs, self.names))
        return {"MPIDQN_NETNS_HOSTS": hosts, **TRANSPORT}

    def mpiexec_argv(self, ranks_per_host: Sequence[int], argv: Sequence[str], on: int = 0) -> list[str]:
        """The command line of `mpiexec` run in host ``on``, with ``ranks_per_host[i]`` ranks on host i
        (zeros leave a host out)."""
        if len(ranks_per_host) != len(self.names):
            raise ValueError(f"ranks_per_host has {len(ranks_per_host)} entries for {len(self.names)} hosts")
        hosts = ",".join(f"{a}:{k}" for a, k in zip(self.addrs, ranks_per_host) if k > 0)
        return ["ip", "netns", "exec", self.names[on], "mpiexec", "-launcher", "ssh", "-launcher-exec", str(SHIM),
                "-iface", IFACE, "-hosts", hosts, "-n", str(sum(ranks_per_host)), "-genvall", *argv]

    def pids(self, i: int, match: str = "") -> list[int]:
        """Processes running in host ``i`` (those whose command line contains ``match``)."""
        found = []
        for pid in _ip("netns", "pids", self.names[i]).stdout.split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # ended meanwhile
                continue
            if match in argv:
                found.append(int(pid))
        return found

    def wait_ended(self, timeout: float, match: str = "") -> list[list[int]]:
        """Wait until no process (whose command line contains ``match``) runs in any host, or
        ``timeout`` seconds pass (killed ranks take a moment to be reaped); those left per host."""
        deadline = time.monotonic() + timeout
        while any(left := [self.pids(i, match) for i in range(len(self.names))]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def link_down(self, i: int) -> None:
        """Cut host ``i`` off: its interface goes down (packets to and from it are dropped)."""
        _ip("-n", self.names[i], "link", "set", IFACE, "down")
