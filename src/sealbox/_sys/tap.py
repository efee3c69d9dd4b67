"""A microVM's network inside its sandbox's network namespace.

The engine leaves ``eth0`` (a veth to the gateway) with the sandbox address and a default
route. For a VM the address must live on the guest's virtio-net card instead, so the namespace
becomes a plain layer-2 switch: ``br0`` joins ``eth0`` and a tap QEMU opens, and nothing in
the namespace keeps an address. The gateway's host-side rules see the same veth as before.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sealbox._sys import netns
from sealbox._sys.cgroups import Cgroup

TAP = "tap0"
BRIDGE = "br0"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


@dataclass(frozen=True)
class GuestNet:
    address: str
    """Sandbox address with prefix, e.g. ``10.77.0.2/30``."""
    gateway: str


def _ip(netns: str, *args: str, stdin: str | None = None) -> str:
    r = subprocess.run(["ip", "-n", netns, *args], input=stdin, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise OSError(f"ip -n {netns} {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def guest_net(netns: str, uplink: str = "eth0") -> GuestNet | None:
    """UPLINK's IPv4 address and the default gateway, or None if the namespace has neither."""
    try:
        links = json.loads(_ip(netns, "-j", "-4", "addr", "show", "dev", uplink) or "[]")
        routes = json.loads(_ip(netns, "-j", "-4", "route", "show", "default") or "[]")
    except OSError:
        return None
    addrs = [a for link in links for a in link.get("addr_info", []) if a.get("family") == "inet"]
    gateways = [r["gateway"] for r in routes if "gateway" in r]
    if not addrs or not gateways:
        return None
    return GuestNet(f"{addrs[0]['local']}/{addrs[0]['prefixlen']}", gateways[0])


def bridge_tap(netns: str, uplink: str = "eth0") -> None:
    """Create TAP and BRIDGE, and move UPLINK's address off the host side."""
    _ip(netns, "-batch", "-", stdin="\n".join([
        f"tuntap add dev {TAP} mode tap vnet_hdr",
        f"link add {BRIDGE} type bridge",
        f"addr flush dev {uplink}",
        f"link set {uplink} master {BRIDGE}",
        f"link set {TAP} master {BRIDGE}",
        f"link set {TAP} up",
        f"link set {BRIDGE} up",
    ]) + "\n")


def open_tap(netns_name: str) -> int:
    """An fd attached to TAP, for QEMU's ``-netdev tap,fd=``: QEMU runs unprivileged and
    could not open /dev/net/tun or attach to the tap itself."""
    result: list[int | OSError] = []

    def attach() -> None:
        # setns() moves only this short-lived thread; a tun fd belongs to the netns it was
        # opened in, so the open must happen there.
        try:
            netns.enter(netns_name)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                ifr = struct.pack("16sH22x", TAP.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
                fcntl.ioctl(fd, TUNSETIFF, ifr)
            except BaseException:
                os.close(fd)
                raise
            result.append(fd)
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=attach, name=f"tap-{netns_name}")
    thread.start()
    thread.join()
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def remove_tap(netns: str) -> None:
    """Delete TAP and BRIDGE; a namespace (or link) already gone is fine."""
    for link in (TAP, BRIDGE):
        try:
            _ip(netns, "link", "del", link)
        except OSError:
            pass


def has_tap(netns: str) -> bool:
    try:
        _ip(netns, "link", "show", TAP)
    except OSError:
        return False
    return True


def enter_vmm(netns_name: str, cgroup: Cgroup, uid: int, groups: list[int]) -> Callable[[], None]:
    """A preexec_fn for QEMU: join the sandbox's netns and cgroup, then drop root for good.
    GROUPS are extra groups (the owner of /dev/kvm when KVM is used)."""

    def _preexec() -> None:
        netns.enter(netns_name)
        cgroup.join()
        os.setgroups(groups)
        os.setgid(uid)
        os.setuid(uid)

    return _preexec
