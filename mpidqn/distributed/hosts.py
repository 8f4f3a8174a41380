"""Which host each rank runs on: its hostname, plus an address where hostnames coincide.

Hosts are told apart by hostname. Where two ranks share a hostname but not their network addresses
they are on different hosts all the same (containers or network namespaces that keep the
machine's hostname, cloned VMs): their label then becomes ``hostname/address``.
"""
from __future__ import annotations

import fcntl
import socket
import struct
from typing import Any, Sequence

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
