"""Which host each rank runs on: its hostname, plus an address where hostnames coincide.

Hosts are told apart by hostname. Where two ranks share a hostname but not their network addresses
they are on different hosts all the same (containers or network namespaces that keep the
machine's hostname, cloned VMs): their label then becomes ``hostname/address``.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Any, Collection, Sequence

_SIOCGIFADDR = 0x8915  # Linux: IPv4 address of an interface


def local_addresses() -> tuple[str, ...]:
    """IPv4 addresses of this network namespace's interfaces, loopback aside, in interface order
    (empty where the interfaces cannot be listed)."""
    try:
        interfaces = socket.if_nameindex()
    except OSError:
        return ()
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in interfaces:
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            addr = socket.inet_ntoa(raw[20:24])
            if not addr.startswith("127."):
                found.append(addr)
    return tuple(found)


def this_host() -> tuple[str, tuple[str, ...]]:
    """(hostname, addresses) of the calling process."""
    return socket.gethostname(), local_addresses()


def host_labels(hosts: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """One label per rank from every rank's (hostname, addresses): the hostname, or
    ``hostname/first address`` where ranks of that hostname differ in their addresses."""
    seen: dict[str, set[tuple[str, ...]]] = {}
    for name, addrs in hosts:
        seen.setdefault(name, set()).add(tuple(addrs))
    return [name if len(seen[name]) == 1 else f"{name}/{addrs[0] if addrs else 'no-address'}"
            for name, addrs in hosts]


def rank_hosts(comm: Any) -> list[str]:
    """The host label of every rank of ``comm`` (collective), index = rank."""
    return host_labels(comm.allgather(this_host()))


def usable_cpus() -> list[int]:
    """The CPUs the calling process may run on (its affinity: what mpiexec, Slurm or a cgroup binding
    left it), or all of the machine's where affinity is unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def limit_threads(threads: int) -> None:
    """Cap this process's compute threads: torch's intra-op pool and numpy's BLAS (OpenBLAS or MKL).

    numpy's OpenBLAS otherwise starts a thread per CPU of the machine in every rank, and its idle
    threads spin on CPUs the job may not own: a 1-rank CartPole run at batch scale 8 used 21-23 CPU
    seconds for 12-14 s of wall time, and 11-14 CPU seconds with the cap, at the same wall time
    (docs/scaling.md)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")  # applied now; kept for the process's life


def reuse_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Have glibc's malloc serve blocks below ``mmap_threshold`` from its heap and keep up to
    ``trim_threshold`` bytes free at the heap's top (``mallopt``; fixed values also end glibc's dynamic
    thresholds). By default a block above 128 KiB is a fresh ``mmap`` and every first touch of its pages
    a page fault; an update's temporary tensors of a few hundred KiB then cost hundreds of faults per
    update. False where the process's C library has no ``mallopt`` (not glibc): nothing changed."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: the parameter numbers below are glibc's
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return mallopt(m_mmap_threshold, mmap_threshold) == 1 and mallopt(m_trim_threshold, trim_threshold) == 1


def _host_unions(hosts: Sequence[str], cpus: Sequence[Collection[int]]) -> dict[str, set[int]]:
    union: dict[str, set[int]] = {}
    for host, mine in zip(hosts, cpus):
        union.setdefault(host, set()).update(mine)
    return union


def host_cores(comm: Any, hosts: Sequence[str], cpus: Sequence[Collection[int]] | None = None) -> dict[str, int]:
    """Per host label (``hosts``: :func:`rank_hosts`), how many CPUs its ranks may run on together: the
    union of their affinity sets (``cpus``: every rank's :func:`usable_cpus`, gathered here when not given:
    collective). Ranks times torch threads above it oversubscribe the host."""
    cpus = comm.allgather(usable_cpus()) if cpus is None else cpus
    return {host: len(union) for host, union in _host_unions(hosts, cpus).items()}


def host_threads(hosts: Sequence[str], threads: Sequence[int]) -> dict[str, int]:
    """Per host label, the compute threads of its ranks together (``hosts``, ``threads``: per rank)."""
    total: dict[str, int] = {}
    for host, n in zip(hosts, threads):
        total[host] = total.get(host, 0) + int(n)
    return total


def cpu_shares(hosts: Sequence[str], cpus: Sequence[Collection[int]]) -> list[int]:
    """Per rank (index = rank), its share of its host: the CPUs the host's ranks may run on together,
    divided by how many ranks the host has, at most the CPUs of the rank's own affinity, at least 1.

    ``hosts``: every rank's host label; ``cpus``: every rank's affinity (:func:`usable_cpus`). One rank
    alone on a 16-CPU host gets 16; 8 unbound ranks there get 2 each; 4 ranks bound to 2 CPUs each (Slurm's
    ``--cpus-per-task=2``) get 2 each; 4 ranks on 2 CPUs get 1 each."""
    union = _host_unions(hosts, cpus)
    return [max(1, min(len(mine), len(union[host]) // hosts.count(host))) for host, mine in zip(hosts, cpus)]


def cpu_share(comm: Any) -> int:
    """This rank's :func:`cpu_shares` among all ranks of ``comm`` (collective): pass the communicator of
    every process that runs on the machines (the world), not one run's group of a sweep."""
    hosts = rank_hosts(comm)
    return cpu_shares(hosts, comm.allgather(usable_cpus()))[comm.Get_rank()]


def crowded_hosts(hosts: Sequence[str], cores: dict[str, int], threads: Sequence[int]) -> list[str]:
    """A warning line per host whose multi-threaded ranks together run more compute threads than it has
    CPUs (``hosts``, ``threads``: per rank; ``cores``: per host, :func:`host_cores`). Ranks of one thread
    that share CPUs take turns and lose little; ranks of several threads that share CPUs spin in each
    other's way: 2 ranks of 2 threads on 2 CPUs ran CartPole 20x slower than 2 ranks of 1 thread."""
    multi = {h for h, t in zip(hosts, threads) if t > 1}  # hosts with a rank of several threads
    return [f"mpidqn: warning: {host} runs {hosts.count(host)} rank(s) with {n} compute threads on "
            f"{cores[host]} CPU(s); ranks of several threads that share CPUs can run many times slower: "
            "set parallel.torch_threads=auto"
            for host, n in host_threads(hosts, threads).items() if host in multi and n > cores[host]]


def resolve_threads(setting: int | str, comm: Any, share: int | None = None) -> int:
    """This rank's compute threads from ``parallel.torch_threads``: a number as given; "auto" its share of
    its host, ``share`` where the caller knows it, else :func:`cpu_share` among the ranks of ``comm``
    (collective: every rank of ``comm`` must call with the same setting)."""
    if setting != "auto":
        return int(setting)
    return share if share is not None else cpu_share(comm)
