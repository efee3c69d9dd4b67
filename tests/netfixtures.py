"""Reusable network test helpers: fake upstream hosts in their own namespaces, clients inside
sandbox-like namespaces, and a leak check.

Everything here lives in namespaces the tests create; nothing talks to a real address.

* `test_host(address)` — a "host on the internet / LAN / metadata service" at ADDRESS: its own
  netns ``sealbox-t-host-…``, joined to the host by a veth ``sbth…`` (never ``sbx*``, so the
  sandbox rules do not apply to it), running a TCP+UDP recorder. `TestHost.received()` lists the
  connections and datagrams it got; `TestHost.packets()` counts every IP packet that reached it
  (an nft counter inside its namespace), so a test can prove it got *nothing* — not even a SYN
  or an ICMP echo.
* `plain_client()` — a control namespace ``sealbox-t-cli-…`` joined by a ``sbtc…`` veth with
  forwarding on: what a sandbox would be without the sealbox rules. A test uses it to show a
  test host is really reachable, so "the sandbox reached nothing" means something.
* `netns_run(name, *cmd)` — run a command inside a namespace (optionally under bubblewrap as
  an unprivileged user, like a real sandbox).
* `leftovers()` — sbx/sbth/sbtc links, ``sealbox-`` namespaces, the ``inet sealbox`` table and
  test routing state, for session-level leak checks.

Routing: a test host's /32 lives in routing table `ROUTE_TABLE`. `ip rule`s send traffic from
the sandbox and control subnets to it; traffic from host processes is sent there too only when
the host would otherwise route that address out through its default route (e.g. 203.0.113.10),
never when the host has a real route for it (e.g. a cloud metadata route for 169.254.169.254).
Concurrent test sessions on one host are serialized per address by a lock file.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any

from sealbox._sys import net, netns

NETNS_PREFIX = "sealbox-t-"
SANDBOX_SUBNET = IPv4Network("10.77.0.0/16")
CONTROL_SUBNET = IPv4Network("10.76.0.0/16")
ROUTE_TABLE = 7377
RULE_PREF = 7377
LOCK_DIR = Path("/run/sealbox-test")
TEST_LINK_PREFIXES = ("sbth", "sbtc")

PUBLIC = IPv4Address("203.0.113.10")  # TEST-NET-3: looks like the internet
PRIVATE = IPv4Address("192.168.77.10")
METADATA = IPv4Address("169.254.169.254")

# The recorder a test host runs: logs each TCP connection (and its first bytes) and each UDP
# datagram as JSON lines, answers with a tiny HTTP response / "test-host", and prints "ready".
_RECORDER = r"""
import json, socket, sys, threading
addr, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()
def record(**entry):
    with lock, open(log, "a") as f:
        f.write(json.dumps(entry) + "\n")
def handle(conn, peer):
    record(proto="tcp", event="connect", peer=peer[0], port=peer[1])
    with conn:
        conn.settimeout(5)
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        record(proto="tcp", event="data", peer=peer[0], port=peer[1], data=data.decode("latin-1"))
        try:
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntest-host")
        except OSError:
            pass
def serve_udp(sock):
    while True:
        data, peer = sock.recvfrom(65536)
        record(proto="udp", event="data", peer=peer[0], port=peer[1], data=data.decode("latin-1"))
        sock.sendto(b"test-host", peer)
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((addr, port))
tcp.listen(64)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((addr, port))
threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
print("ready", flush=True)
while True:
    conn, peer = tcp.accept()
    threading.Thread(target=handle, args=(conn, peer), daemon=True).start()
"""

_COUNTER = """\
table inet sealbox_test {
    chain ingress_count {
        type filter hook prerouting priority raw; policy accept;
        iifname "eth0" counter
    }
}
"""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


def unique_name(prefix: str) -> str:
    return prefix + secrets.token_hex(4)


@contextmanager
def _flock(name: str) -> Iterator[None]:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def netns_run(name: str, *cmd: str, bwrap: bool = False, timeout: float = 30,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run CMD inside netns NAME. With BWRAP, as uid 65534 in a user namespace (no
    capabilities over the network namespace), the way a sandbox process runs."""
    wrapper: list[str] = []
    if bwrap:
        # A checkout under /tmp keeps its virtualenv's interpreter in sight.
        prefix = Path(sys.prefix)
        keep = (["--ro-bind", str(prefix), str(prefix)]
                if prefix.is_relative_to("/tmp") else [])
        wrapper = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                   "--tmpfs", "/tmp", *keep, "--unshare-user", "--unshare-pid",
                   "--uid", "65534", "--gid", "65534", "--die-with-parent", "--"]
    return subprocess.run(["ip", "netns", "exec", name, *wrapper, *cmd], capture_output=True,
                          text=True, timeout=timeout, input=input, check=False)


def py_in(name: str, code: str, *args: str, bwrap: bool = False,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet inside netns NAME (``sys.argv[1:]`` = ARGS)."""
    return netns_run(name, sys.executable, "-c", code, *args, bwrap=bwrap, timeout=timeout)


def can_connect(name: str, address: str, port: int, timeout: float = 2,
                bwrap: bool = False) -> bool:
    """Whether a TCP connect from inside netns NAME to ADDRESS:PORT succeeds."""
    code = ("import socket,sys\n"
            "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=float(sys.argv[3]))\n"
            "s.close()\n")
    return py_in(name, code, address, str(port), str(timeout), bwrap=bwrap,
                 timeout=timeout + 10).returncode == 0


_PING = r"""
import socket, struct, sys
def checksum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
packet = struct.pack("!BBHHH", 8, 0, 0, 0x5B0C, 1) + b"sealbox-ping"
packet = packet[:2] + struct.pack("!H", checksum(packet)) + packet[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(float(sys.argv[2]))
s.sendto(packet, (sys.argv[1], 0))
while True:
    data, peer = s.recvfrom(65536)
    ihl = (data[0] & 0x0F) * 4
    if peer[0] == sys.argv[1] and data[ihl] == 0:
        sys.exit(0)
"""


def ping(name: str, address: str, timeout: float = 2) -> bool:
    """Whether an ICMP echo from inside netns NAME (as root: raw socket) gets a reply
    (there is no `ping` binary on these hosts)."""
    return py_in(name, _PING, address, str(timeout), timeout=timeout + 10).returncode == 0


@dataclass
class TestHost:
    """A fake remote host; see the module docstring."""

    __test__ = False  # not a pytest test class

    netns: str
    address: IPv4Address
    port: int
    host_if: str
    log: Path
    host_reachable: bool
    """Whether processes in the host namespace (e.g. the gateway) can connect to it."""

    def received(self) -> list[dict[str, Any]]:
        """What the recorder logged: one dict per TCP connect/data or UDP datagram."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def packets(self) -> int:
        """IP packets that arrived on its interface (any protocol, ICMP included)."""
        done = netns_run(self.netns, "nft", "-j", "list", "table", "inet", "sealbox_test")
        for item in json.loads(done.stdout)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        raise RuntimeError(f"no packet counter in {self.netns}: {done.stderr}")


def _default_routed(address: IPv4Address) -> bool:
    """True if the host's main table routes ADDRESS only by its default route."""
    done = _ip("-j", "route", "show", "table", "main", "match", str(address))
    return all(r.get("dst") == "default" for r in json.loads(done.stdout or "[]"))


def _rules(address: IPv4Address, sources: Sequence[IPv4Network] | None) -> list[list[str]]:
    tail = ["to", f"{address}/32", "lookup", str(ROUTE_TABLE), "pref", str(RULE_PREF)]
    if sources is None:
        return [tail]
    return [["from", str(s), *tail] for s in sources]


def _clear_address(address: IPv4Address) -> None:
    """Remove routing state a crashed session may have left for ADDRESS (lock held)."""
    _ip("route", "del", f"{address}/32", "table", str(ROUTE_TABLE), check=False)
    while _ip("rule", "del", "to", f"{address}/32", "lookup", str(ROUTE_TABLE),
              check=False).returncode == 0:
        pass


@contextmanager
def test_host(address: IPv4Address | str, port: int = 80,
              sources: Sequence[IPv4Network] = (SANDBOX_SUBNET, CONTROL_SUBNET),
              tmp: Path | None = None) -> Iterator[TestHost]:
    """A test host at ADDRESS:PORT (TCP and UDP), reachable from SOURCES (see module doc)."""
    addr = ip_address(address)
    if not isinstance(addr, IPv4Address):
        raise TypeError(f"test hosts are IPv4 only: {address}")
    ns = unique_name(NETNS_PREFIX + "host-")
    host_if = unique_name("sbth")
    log_dir = tmp or LOCK_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{ns}.jsonl"
    proc: subprocess.Popen[str] | None = None
    with _flock(str(addr)):
        _clear_address(addr)
        # Link-local (metadata) addresses never take host traffic: a host process may really
        # use the metadata service through its default route.
        host_local = _default_routed(addr) and not addr.is_link_local
        rules = _rules(addr, None if host_local else list(sources))
        try:
            netns.create(ns)
            net.write_sysctls({"net/ipv6/conf/all/disable_ipv6": "1",
                               "net/ipv6/conf/default/disable_ipv6": "1"}, ns_name=ns)
            net.create_veth(host_if, ns, "eth0", alias=f"sealbox-test {ns}")
            net.write_sysctls({
                f"net/ipv6/conf/{host_if}/disable_ipv6": "1",
                # Answer the test host's ARP for any address it sends back to.
                f"net/ipv4/conf/{host_if}/proxy_arp": "1",
                # Lets replies to a control client (plain_client) be forwarded back to it.
                f"net/ipv4/conf/{host_if}/forwarding": "1",
            })
            _ip("link", "set", host_if, "up")
            _ip("addr", "add", f"{addr}/32", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("route", "add", "default", "dev", "eth0", ns=ns)
            done = netns_run(ns, "nft", "-f", "-", input=_COUNTER)
            if done.returncode != 0:
                raise RuntimeError(f"nft counter in {ns}: {done.stderr}")
            _ip("route", "add", f"{addr}/32", "dev", host_if, "table", str(ROUTE_TABLE))
            for rule in rules:
                _ip("rule", "add", *rule)
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", _RECORDER, str(addr),
                 str(port), str(log)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"test host server failed: {proc.stderr.read() if proc.stderr else ''}")
            yield TestHost(netns=ns, address=addr, port=port, host_if=host_if, log=log,
                           host_reachable=host_local)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
            for rule in rules:
                _ip("rule", "del", *rule, check=False)
            _ip("route", "del", f"{addr}/32", "table", str(ROUTE_TABLE), check=False)
            net.delete_link(host_if)
            netns.delete(ns)
            log.unlink(missing_ok=True)


@dataclass
class PlainClient:
    """A namespace wired like a sandbox but without any sealbox rule (the control)."""

    netns: str
    host_if: str
    address: IPv4Address
    host_ip: IPv4Address


@contextmanager
def plain_client(routes: Sequence[IPv4Address]) -> Iterator[PlainClient]:
    """A control namespace with routes only to ROUTES (test hosts), forwarded by the host.

    Forwarding is switched on for its host-side link only, never host-wide.
    """
    ns = unique_name(NETNS_PREFIX + "cli-")
    host_if = unique_name("sbtc")
    try:
        netns.create(ns)
        net.write_sysctls({"net/ipv6/conf/all/disable_ipv6": "1"}, ns_name=ns)
        with _flock("control-subnet"):
            used = {IPv4Network(f"{a.ip}/30", strict=False) for a in net.host_ipv4_addresses()}
            block = next(b for b in CONTROL_SUBNET.subnets(new_prefix=30) if b not in used)
            net.create_veth(host_if, ns, "eth0", alias=f"sealbox-test {ns}")
            net.write_sysctls({f"net/ipv6/conf/{host_if}/disable_ipv6": "1",
                               f"net/ipv4/conf/{host_if}/forwarding": "1"})
            _ip("addr", "add", f"{block[1]}/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
        _ip("addr", "add", f"{block[2]}/30", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        for route in routes:
            _ip("route", "add", f"{route}/32", "via", str(block[1]), ns=ns)
        yield PlainClient(netns=ns, host_if=host_if, address=block[2], host_ip=block[1])
    finally:
        net.delete_link(host_if)
        netns.delete(ns)


def leftovers() -> dict[str, list[str]]:
    """Network state a test may leak: sandbox and test links, test namespaces, the sealbox
    nft table, test routing rules/routes. Empty lists are omitted."""
    links = [h.name for h in net.host_links("sb") if h.name.startswith(("sbx", *TEST_LINK_PREFIXES))]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=False).stdout.split("\n")
    rules = _ip("rule", "show", "table", str(ROUTE_TABLE), check=False).stdout.splitlines()
    routes = _ip("route", "show", "table", str(ROUTE_TABLE), check=False).stdout.splitlines()
    found = {
        "links": links,
        "netns": netns.list_names("sealbox-"),
        "nft": [t.strip() for t in tables if t.strip() == "table inet sealbox"],
        "test_rules": [r.strip() for r in rules if r.strip()],
        "test_routes": [r.strip() for r in routes if r.strip()],
    }
    return {k: v for k, v in found.items() if v}
