"""Named network namespaces (``/run/netns/NAME``) and entering them."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def create(name: str) -> None:
    """Create a network namespace holding only an up loopback interface."""
    netns.create(name)
    with NetNS(name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def delete(name: str) -> None:
    if exists(name):
        netns.remove(name)


def list_names(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def enter(name: str) -> None:
    """setns() the calling thread into NAME. Meant for a child between fork and exec."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def host_links(prefix: str) -> list[str]:
    """Names of host-namespace links starting with PREFIX (leak checks, reconciliation)."""
    with IPRoute() as ip:
        names = [link.get_attr("IFLA_IFNAME") for link in ip.get_links()]
    return sorted(n for n in names if n and n.startswith(prefix))
