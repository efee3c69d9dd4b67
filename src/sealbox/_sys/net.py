"""Netlink plumbing for sandbox links: veth pairs, addresses, routes, per-netns sysctls.

Every function raises OSError (netlink errors are translated, keeping their errno) so callers
outside `_sys` never see pyroute2's exception types.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError, NetNS

from sealbox._sys import netns

AF_INET = 2


@dataclass(frozen=True)
class HostLink:
    name: str
    alias: str


@contextmanager
def _oserror() -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        raise OSError(exc.code, f"netlink: {exc}") from exc


def create_veth(host_if: str, ns_name: str, peer_if: str, alias: str) -> None:
    """Create HOST_IF in the host with its peer created directly inside NS_NAME as PEER_IF.

    Creating the peer in the target namespace avoids a moment where it sits in the host
    under a name (``eth0``) that may clash with a host interface. The link stays down.
    """
    with _oserror(), IPRoute() as ip:
        ip.link("add", ifname=host_if, kind="veth",
                peer={"ifname": peer_if, "net_ns_fd": ns_name})
        index = ip.link_lookup(ifname=host_if)[0]
        ip.link("set", index=index, ifalias=alias)


def configure_host_side(host_if: str, address: IPv4Interface) -> None:
    with _oserror(), IPRoute() as ip:
        index = ip.link_lookup(ifname=host_if)[0]
        ip.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        ip.link("set", index=index, state="up")


def configure_netns_side(ns_name: str, ifname: str, address: IPv4Interface,
                         gateway: IPv4Address | None) -> None:
    """Address IFNAME inside NS_NAME, bring it up, and set the default route via GATEWAY."""
    with _oserror(), NetNS(ns_name) as ns:
        index = ns.link_lookup(ifname=ifname)[0]
        ns.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        ns.link("set", index=index, state="up")
        if gateway is not None:
            ns.route("add", dst="default", gateway=str(gateway))


def delete_link(name: str) -> bool:
    """Delete a host link (a veth takes its peer with it). False if it did not exist."""
    with IPRoute() as ip:
        try:
            ip.link("del", ifname=name)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise OSError(exc.code, f"netlink: deleting {name}: {exc}") from exc
    return True


def host_links(prefix: str) -> list[HostLink]:
    """Host links whose name starts with PREFIX, with their alias ('' when unset)."""
    with _oserror(), IPRoute() as ip:
        found = [HostLink(link.get_attr("IFLA_IFNAME") or "",
                          link.get_attr("IFLA_IFALIAS") or "") for link in ip.get_links()]
    return sorted((h for h in found if h.name.startswith(prefix)), key=lambda h: h.name)


def host_ipv4_addresses() -> list[IPv4Interface]:
    """Every IPv4 address configured in the host namespace."""
    with _oserror(), IPRoute() as ip:
        return [IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in ip.get_addr(family=AF_INET)]


def write_sysctls(values: Mapping[str, str], ns_name: str | None = None) -> None:
    """Write /proc/sys keys (slash-separated, e.g. ``net/ipv6/conf/all/disable_ipv6``).

    /proc/sys/net shows the network namespace of the thread that opens it, so for NS_NAME
    the writes happen in a short-lived thread that setns()es first; the process's other
    threads stay in the host namespace.
    """
    failure: list[OSError] = []

    def work() -> None:
        try:
            if ns_name is not None:
                netns.enter(ns_name)
            for key, value in values.items():
                Path("/proc/sys", key).write_text(value)
        except OSError as exc:  # re-raised in the caller's thread
            failure.append(exc)

    if ns_name is None:
        work()
    else:
        # The thread ends after the writes, so its changed namespace never leaks into reuse.
        thread = threading.Thread(target=work, name=f"sysctl-{ns_name}")
        thread.start()
        thread.join()
    if failure:
        raise failure[0]
