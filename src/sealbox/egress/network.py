"""Per-sandbox network plumbing and the host firewall that makes the gateway the only path.

Each sandbox gets a veth pair: ``sbx<10 hex>`` in the host (named from a hash of the sandbox
id) and ``eth0`` in its network namespace, on its own /30 out of one private subnet
(host side .1, sandbox side .2), with the default route via the host side. One nftables table,
``inet sealbox``, matches every sandbox interface by the ``sbx`` prefix:

* TCP is redirected to the gateway's proxy port and UDP/53 to its DNS port, on the address
  of the interface it came in on (so the gateway can bind per sandbox at ``host_ip``);
* nothing else from a sandbox reaches the host (input drop), nothing is forwarded in or out
  of a sandbox interface (whatever ``ip_forward`` says), and IPv6 is dropped.

Allocation state lives in the kernel: a /30 is taken while some host interface holds an
address in it. Probing and claiming happen under one file lock, so concurrent attaches in one
process, several processes, or two servers on one host never get the same block, and a crash
leaves nothing stale to free but the veth itself (see `cleanup_orphans`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_network
from pathlib import Path

from sealbox._sys import net, nft
from sealbox._sys.netns import exists as netns_exists
from sealbox.errors import ConfigError, EgressError

IF_PREFIX = "sbx"
TABLE_FAMILY = "inet"
TABLE_NAME = "sealbox"
LOCK_PATH = Path("/run/sealbox/net.lock")
BLOCK_PREFIX = 30
SANDBOX_IF = "eth0"
_ALIAS_TAG = "sealbox"
_SANDBOX_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_RULESET = """\
table inet {table}
delete table inet {table}
table inet {table} {{
    comment "{comment}"
    chain sandbox_raw {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{p}*" meta nfproto != ipv4 drop
    }}
    chain sandbox_nat {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{p}*" meta l4proto tcp redirect to :{proxy}
        iifname "{p}*" udp dport 53 redirect to :{dns}
    }}
    chain sandbox_input {{
        type filter hook input priority filter; policy accept;
        iifname "{p}*" jump from_sandbox
    }}
    chain from_sandbox {{
        ct state established,related accept
        ct state invalid drop
        meta l4proto tcp th dport {proxy} accept
        meta l4proto udp th dport {dns} accept
        drop
    }}
    chain sandbox_forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{p}*" drop
        oifname "{p}*" drop
    }}
}}
"""


@dataclass(frozen=True)
class Link:
    sandbox_id: str
    netns: str
    host_if: str
    host_ip: IPv4Address
    sandbox_ip: IPv4Address


def host_if_name(sandbox_id: str) -> str:
    """``sbx`` + 10 hex digits: unique enough, and within IFNAMSIZ (15)."""
    return IF_PREFIX + hashlib.sha256(sandbox_id.encode()).hexdigest()[:10]


def _process_token(pid: int) -> str | None:
    """pid:starttime, which names a process even after its pid is reused; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the parenthesised command name, which may hold spaces.
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"


@contextmanager
def _host_lock() -> Iterator[None]:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Network:
    """Host side of sandbox networking. Safe to use from several threads and processes."""

    def __init__(self, subnet: str = "10.77.0.0/16", proxy_port: int = 15001,
                 dns_port: int = 53) -> None:
        try:
            parsed = ip_network(subnet)
        except ValueError as exc:
            raise ConfigError(f"sandbox subnet {subnet!r} is not a network: {exc}") from exc
        if not isinstance(parsed, IPv4Network) or not parsed.is_private:
            raise ConfigError(f"sandbox subnet {subnet!r} must be a private IPv4 network")
        if parsed.prefixlen > BLOCK_PREFIX:
            raise ConfigError(f"sandbox subnet {subnet!r} is smaller than one /{BLOCK_PREFIX}")
        for name, port in (("proxy_port", proxy_port), ("dns_port", dns_port)):
            if not 0 < port < 65536:
                raise ConfigError(f"{name} {port} is not a TCP/UDP port")
        self.subnet = parsed
        self.proxy_port = proxy_port
        self.dns_port = dns_port
        self._owner = _process_token(os.getpid()) or str(os.getpid())
        self._comment = f"sealbox egress subnet={parsed} proxy={proxy_port} dns={dns_port}"

    # ----- host rules ------------------------------------------------------------------
    def ruleset(self) -> str:
        """The nft script `install` applies (replaces the table atomically)."""
        return _RULESET.format(table=TABLE_NAME, comment=self._comment, p=IF_PREFIX,
                               proxy=self.proxy_port, dns=self.dns_port)

    def install(self) -> None:
        """Apply the table, replacing it atomically (which also repairs edited rules)."""
        with _host_lock():
            self._ensure_installed(force=True)

    def _ensure_installed(self, force: bool = False) -> None:
        """Apply the table unless one with our configuration is there (or FORCE).
        Caller holds the host lock."""
        try:
            listing = nft.list_table(TABLE_FAMILY, TABLE_NAME)
            current = nft.table_comment(listing) if listing is not None else None
            if current == self._comment and not force:
                return
            if current not in (None, self._comment) and net.host_links(IF_PREFIX):
                # Another gateway on this host redirects its sandboxes to other ports;
                # replacing its rules would hand its sandboxes to us or to nobody.
                raise EgressError(
                    f"the host firewall is set up for another sealbox gateway ({current}); "
                    "run one configuration per host or wait until its sandboxes are gone"
                )
            nft.apply(self.ruleset())
        except OSError as exc:
            raise EgressError(f"cannot install the host firewall: {exc}") from exc

    def uninstall(self) -> None:
        """Remove the host rules — unless a sandbox interface (of any gateway) still exists,
        because removing them would leave that sandbox unfiltered."""
        with _host_lock():
            try:
                if not net.host_links(IF_PREFIX):
                    nft.delete_table(TABLE_FAMILY, TABLE_NAME)
            except OSError as exc:
                raise EgressError(f"cannot remove the host firewall: {exc}") from exc

    # ----- links -----------------------------------------------------------------------
    def attach(self, sandbox_id: str, netns: str) -> Link:
        if not _SANDBOX_ID.fullmatch(sandbox_id):
            raise ConfigError(f"invalid sandbox id {sandbox_id!r}")
        if not netns_exists(netns):
            raise EgressError(f"network namespace {netns!r} does not exist")
        host_if = host_if_name(sandbox_id)
        try:
            # Off before eth0 exists, so it never gets even a link-local IPv6 address.
            net.write_sysctls({"net/ipv6/conf/all/disable_ipv6": "1",
                               "net/ipv6/conf/default/disable_ipv6": "1"}, ns_name=netns)
            with _host_lock():
                # Rules first: a sandbox interface never exists without them.
                self._ensure_installed()
                block = self._free_block()
                net.create_veth(host_if, netns, SANDBOX_IF,
                                alias=f"{_ALIAS_TAG} {sandbox_id} {self._owner}")
                try:
                    net.write_sysctls({
                        f"net/ipv6/conf/{host_if}/disable_ipv6": "1",
                        # Strict reverse-path filter: a sandbox cannot spoof another's address.
                        f"net/ipv4/conf/{host_if}/rp_filter": "1",
                    })
                    # Holding the address is what claims the block (see the module docstring).
                    net.configure_host_side(host_if, IPv4Interface(f"{block[1]}/{BLOCK_PREFIX}"))
                except BaseException:
                    net.delete_link(host_if)
                    raise
            link = Link(sandbox_id=sandbox_id, netns=netns, host_if=host_if,
                        host_ip=block[1], sandbox_ip=block[2])
            try:
                net.configure_netns_side(netns, SANDBOX_IF,
                                         IPv4Interface(f"{link.sandbox_ip}/{BLOCK_PREFIX}"),
                                         gateway=link.host_ip)
            except BaseException:
                self.detach(link)
                raise
        except FileExistsError as exc:
            raise EgressError(f"sandbox {sandbox_id} is already attached ({host_if})") from exc
        except OSError as exc:
            raise EgressError(f"cannot attach sandbox {sandbox_id} to the network: {exc}") from exc
        return link

    def _free_block(self) -> IPv4Network:
        """The lowest /30 of the subnet no host interface uses. Caller holds the host lock."""
        used = {IPv4Network(f"{iface.ip}/{BLOCK_PREFIX}", strict=False)
                for iface in net.host_ipv4_addresses() if iface.ip in self.subnet}
        for block in self.subnet.subnets(new_prefix=BLOCK_PREFIX):
            if block not in used:
                return block
        raise EgressError(f"no free address block left in {self.subnet}")

    def detach(self, link: Link) -> None:
        """Delete the host veth (its peer goes with it), which frees the block. Idempotent."""
        self.detach_id(link.sandbox_id)

    def detach_id(self, sandbox_id: str) -> None:
        """`detach` by sandbox id: for an attach whose Link never reached its caller."""
        try:
            net.delete_link(host_if_name(sandbox_id))
        except OSError as exc:
            raise EgressError(f"cannot detach sandbox {sandbox_id}: {exc}") from exc

    def cleanup_orphans(self, live_ids: set[str]) -> list[str]:
        """Remove sandbox veths whose sandbox is not in LIVE_IDS; returns their sandbox ids.

        Links owned by another process that is still running (another server on this host)
        are left alone; links of dead owners, of this process, or unlabelled ones are removed.
        """
        removed: list[str] = []
        with _host_lock():
            try:
                for link in net.host_links(IF_PREFIX):
                    parts = link.alias.split()
                    labelled = len(parts) == 3 and parts[0] == _ALIAS_TAG
                    sandbox_id = parts[1] if labelled else link.name
                    if sandbox_id in live_ids:
                        continue
                    if labelled and parts[2] != self._owner and _owner_alive(parts[2]):
                        continue
                    if net.delete_link(link.name):
                        removed.append(sandbox_id)
            except OSError as exc:
                raise EgressError(f"cannot clean up sandbox links: {exc}") from exc
        return removed


def _owner_alive(token: str) -> bool:
    pid, _, _ = token.partition(":")
    return pid.isdigit() and _process_token(int(pid)) == token
