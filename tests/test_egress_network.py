"""Sandbox network plumbing and host firewall, end to end: real namespaces, real nftables,
real clients inside the sandbox namespace (invariant 3: the gateway is the only path;
invariant 5: nothing survives detach)."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import netfixtures as nf
import pytest

from sealbox._sys import net, netns, nft
from sealbox.egress import network as netmod
from sealbox.egress.network import Link, Network
from sealbox.errors import ConfigError, EgressError

pytestmark = pytest.mark.privileged

SO_ORIGINAL_DST = 80
PROXY_PORT = 15001


@pytest.fixture(scope="module", autouse=True)
def no_network_leaks() -> Iterator[None]:
    before = nf.leftovers()
    yield
    after = nf.leftovers()
    leaked = {k: sorted(set(v) - set(before.get(k, []))) for k, v in after.items()}
    assert not {k: v for k, v in leaked.items() if v}, leaked


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    n = Network()
    n.install()
    yield n
    n.uninstall()


@pytest.fixture
def make_sandbox(network: Network) -> Iterator[Callable[[], Link]]:
    """Attach fresh sandbox namespaces; detach and delete them afterwards."""
    made: list[Link] = []
    names: list[str] = []

    def make() -> Link:
        name = nf.unique_name(nf.NETNS_PREFIX + "sb-")
        names.append(name)
        netns.create(name)
        link = network.attach("t" + name[-8:], name)
        made.append(link)
        return link

    yield make
    for link in made:
        network.detach(link)
    for name in names:
        netns.delete(name)


@dataclass
class Accepted:
    peer: tuple[str, int]
    local: tuple[str, int]
    original_dst: tuple[str, int]
    data: bytes


@dataclass
class Interceptor:
    """What the gateway does: listen at (host_ip, proxy_port), read SO_ORIGINAL_DST."""

    sock: socket.socket
    accepted: list[Accepted] = field(default_factory=list)

    def serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                port, addr = struct.unpack("!2xH4s8x", raw)
                conn.settimeout(5)
                data = conn.recv(65536)
                self.accepted.append(Accepted(peer, conn.getsockname(),
                                              (socket.inet_ntoa(addr), port), data))
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nproxy")


@pytest.fixture
def intercept() -> Iterator[Callable[[IPv4Address], Interceptor]]:
    started: list[tuple[Interceptor, threading.Thread]] = []

    def start(host_ip: IPv4Address) -> Interceptor:
        sock = socket.socket()
        # Connections the previous test's proxy closed may linger in TIME_WAIT on this address.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(host_ip), PROXY_PORT))
        sock.listen(16)
        icp = Interceptor(sock)
        thread = threading.Thread(target=icp.serve, daemon=True)
        thread.start()
        started.append((icp, thread))
        return icp

    yield start
    for icp, thread in started:
        icp.sock.shutdown(socket.SHUT_RDWR)
        icp.sock.close()
        thread.join(5)


@pytest.fixture
def host_listener() -> Iterator[Callable[[int], tuple[int, list[object]]]]:
    """A host-namespace service on 0.0.0.0 (TCP or UDP); records whatever reaches it."""
    socks: list[socket.socket] = []

    def start(kind: int) -> tuple[int, list[object]]:
        sock = socket.socket(socket.AF_INET, kind)
        sock.bind(("0.0.0.0", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(4)
        got: list[object] = []

        def serve() -> None:
            while True:
                try:
                    got.append(sock.accept() if kind == socket.SOCK_STREAM else sock.recv(9000))
                except OSError:
                    return

        threading.Thread(target=serve, daemon=True).start()
        socks.append(sock)
        return sock.getsockname()[1], got

    yield start
    for sock in socks:
        # Wakes the blocked accept/recv (and says ENOTCONN for an unconnected UDP socket).
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def udp_send(ns: str, address: str, port: int, bwrap: bool = True) -> bool:
    """Send one datagram from inside NS; True if any reply came back within a second."""
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\n"
            "s.sendto(b'hello',(sys.argv[1],int(sys.argv[2])))\n"
            "try:\n    s.recv(100)\nexcept OSError:\n    sys.exit(1)\n")
    return nf.py_in(ns, code, address, str(port), bwrap=bwrap).returncode == 0


# ----- interception ------------------------------------------------------------------------


def test_tcp_lands_on_proxy_with_original_destination(
        make_sandbox: Callable[[], Link],
        intercept: Callable[[IPv4Address], Interceptor]) -> None:
    with nf.test_host(nf.PUBLIC, 80) as host:
        link = make_sandbox()
        proxy = intercept(link.host_ip)
        out = nf.netns_run(link.netns, "curl", "-sS", "-m", "5", f"http://{host.address}/x",
                           bwrap=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "proxy"
        [got] = proxy.accepted
        assert got.original_dst == (str(host.address), 80)
        assert got.local == (str(link.host_ip), PROXY_PORT)
        assert got.peer[0] == str(link.sandbox_ip)
        assert got.data.startswith(b"GET /x HTTP/1.1\r\n")
        assert host.received() == [] and host.packets() == 0


def test_dns_is_redirected_to_dns_port(make_sandbox: Callable[[], Link]) -> None:
    link = make_sandbox()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, nf.test_host(nf.PUBLIC, 53) as host:
        sock.bind((str(link.host_ip), 53))
        sock.settimeout(5)
        code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "s.sendto(b'query',(sys.argv[1],53))\n")
        assert nf.py_in(link.netns, code, str(host.address), bwrap=True).returncode == 0
        data, peer = sock.recvfrom(100)
        assert data == b"query" and peer[0] == str(link.sandbox_ip)
        assert host.packets() == 0


# ----- nothing but the gateway -------------------------------------------------------------


def test_host_services_unreachable(
        make_sandbox: Callable[[], Link],
        intercept: Callable[[IPv4Address], Interceptor],
        host_listener: Callable[[int], tuple[int, list[object]]]) -> None:
    link = make_sandbox()
    tcp_port, tcp_got = host_listener(socket.SOCK_STREAM)
    udp_port, udp_got = host_listener(socket.SOCK_DGRAM)
    # Without a proxy listening the redirected connection is refused...
    assert not nf.can_connect(link.netns, str(link.host_ip), tcp_port, bwrap=True)
    # ...and with one, it lands at the proxy, never at the host service.
    proxy = intercept(link.host_ip)
    assert nf.can_connect(link.netns, str(link.host_ip), tcp_port, bwrap=True)
    assert [a.original_dst for a in proxy.accepted] == [(str(link.host_ip), tcp_port)]
    assert not udp_send(link.netns, str(link.host_ip), udp_port)
    assert tcp_got == [] and udp_got == []
    assert not nf.ping(link.netns, str(link.host_ip))


@pytest.mark.parametrize("address", [nf.PUBLIC, nf.PRIVATE, nf.METADATA],
                         ids=["public", "private", "metadata"])
def test_test_hosts_receive_nothing(make_sandbox: Callable[[], Link],
                                    address: IPv4Address) -> None:
    with nf.test_host(address, 80) as host:
        # The control shows the path exists when the sealbox rules do not apply.
        with nf.plain_client([host.address]) as control:
            assert nf.can_connect(control.netns, str(host.address), 80)
            assert nf.ping(control.netns, str(host.address))
        before = host.packets()
        assert before > 0
        link = make_sandbox()
        # Even with forwarding switched on for this link, the forward hook drops it.
        net.write_sysctls({f"net/ipv4/conf/{link.host_if}/forwarding": "1"})
        assert not nf.can_connect(link.netns, str(host.address), 80, bwrap=True)
        assert not udp_send(link.netns, str(host.address), 80)
        assert not nf.ping(link.netns, str(host.address))
        assert host.packets() == before
        assert all(r["peer"] != str(link.sandbox_ip) for r in host.received())


def test_sandboxes_cannot_reach_each_other(make_sandbox: Callable[[], Link]) -> None:
    a, b = make_sandbox(), make_sandbox()
    for link in (a, b):
        net.write_sysctls({f"net/ipv4/conf/{link.host_if}/forwarding": "1"})
    log = Path(nf.LOCK_DIR) / f"{b.netns}.log"
    server = subprocess.Popen(
        ["ip", "netns", "exec", b.netns, sys.executable, "-c",
         ("import socket,sys\ns=socket.socket()\ns.bind(('0.0.0.0',8080))\ns.listen()\n"
          "print('ready',flush=True)\nc,p=s.accept()\nopen(sys.argv[1],'w').write(p[0])\n"),
         str(log)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        for target in (b.sandbox_ip, b.host_ip):
            assert not nf.can_connect(a.netns, str(target), 8080, bwrap=True)
            assert not udp_send(a.netns, str(target), 8080)
            assert not nf.ping(a.netns, str(target))
        assert not log.exists()
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
        log.unlink(missing_ok=True)


def test_ipv6_is_off(make_sandbox: Callable[[], Link]) -> None:
    link = make_sandbox()
    inside = nf.netns_run(link.netns, "ip", "-6", "addr", "show")
    assert inside.returncode == 0 and inside.stdout.strip() == ""
    flag = nf.netns_run(link.netns, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6")
    assert flag.stdout.strip() == "1"
    host_side = subprocess.run(["ip", "-6", "addr", "show", "dev", link.host_if],
                               capture_output=True, text=True, check=True)
    assert host_side.stdout.strip() == ""


def test_sandbox_routes(make_sandbox: Callable[[], Link]) -> None:
    link = make_sandbox()
    routes = nf.netns_run(link.netns, "ip", "-4", "route", "show").stdout.splitlines()
    assert sorted(r.split(" proto")[0] for r in routes) == sorted([
        f"default via {link.host_ip} dev eth0",
        f"{IPv4Address(int(link.host_ip) - 1)}/30 dev eth0",
    ])


# ----- lifecycle ---------------------------------------------------------------------------


def test_attach_detach_leaves_nothing(network: Network) -> None:
    name = nf.unique_name(nf.NETNS_PREFIX + "sb-")
    netns.create(name)
    try:
        link = network.attach("tdetach", name)
        assert link.host_if == netmod.host_if_name("tdetach")
        assert len(link.host_if) <= 15 and link.host_if.startswith("sbx")
        assert link.host_ip in network.subnet and link.sandbox_ip == link.host_ip + 1
        with pytest.raises(EgressError, match="already attached"):
            network.attach("tdetach", name)
        assert link.host_if in netns.host_links("sbx")  # the failed attach did not undo it
        network.detach(link)
        network.detach(link)
        assert link.host_if not in netns.host_links("sbx")
        assert all(a.ip != link.host_ip for a in net.host_ipv4_addresses())
        inside = nf.netns_run(name, "ip", "-br", "link").stdout
        assert "eth0" not in inside
    finally:
        netns.delete(name)


def test_attach_needs_existing_netns(network: Network) -> None:
    with pytest.raises(EgressError, match="does not exist"):
        network.attach("tnons", nf.NETNS_PREFIX + "missing")
    with pytest.raises(ConfigError):
        network.attach("bad id/..", nf.NETNS_PREFIX + "missing")


def test_concurrent_attach_gets_distinct_blocks(network: Network) -> None:
    names = [nf.unique_name(nf.NETNS_PREFIX + "cc-") for _ in range(10)]
    links: list[Link] = []
    try:
        for name in names:
            netns.create(name)
        with ThreadPoolExecutor(10) as pool:
            links = list(pool.map(lambda n: network.attach("t" + n[-8:], n), names))
        assert len({link.host_ip for link in links}) == 10
        assert len({int(link.host_ip) // 4 for link in links}) == 10
        for link in links:
            assert nf.netns_run(link.netns, "ip", "-br", "addr", "show", "eth0") \
                .stdout.split()[2] == f"{link.sandbox_ip}/30"
    finally:
        for link in links:
            network.detach(link)
        for name in names:
            netns.delete(name)


def test_concurrent_attach_across_processes(network: Network) -> None:
    """Separate processes (two servers on one host) share the lock and see each other's
    blocks."""
    names = [nf.unique_name(nf.NETNS_PREFIX + "mp-") for _ in range(6)]
    code = ("import sys\nfrom sealbox.egress.network import Network\n"
            "link = Network().attach(sys.argv[1], sys.argv[2])\nprint(link.host_ip)\n")
    try:
        for name in names:
            netns.create(name)
        procs = [subprocess.Popen([sys.executable, "-c", code, "t" + n[-8:], n],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in names]
        outputs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        assert len({out.strip() for out, _ in outputs}) == len(names)
    finally:
        for name in names:
            network.detach(Link("t" + name[-8:], name, netmod.host_if_name("t" + name[-8:]),
                                IPv4Address(0), IPv4Address(0)))
            netns.delete(name)


def test_cleanup_orphans(network: Network, make_sandbox: Callable[[], Link]) -> None:
    keep, gone1, gone2 = make_sandbox(), make_sandbox(), make_sandbox()
    # A link labelled as owned by another live process (another server) is not ours to remove.
    other = subprocess.Popen(["sleep", "60"])
    foreign_ns = nf.unique_name(nf.NETNS_PREFIX + "fo-")
    foreign_if = netmod.host_if_name("tforeign")
    try:
        netns.create(foreign_ns)
        token = netmod._process_token(other.pid)
        net.create_veth(foreign_if, foreign_ns, "eth0", alias=f"sealbox tforeign {token}")
        removed = network.cleanup_orphans({keep.sandbox_id})
        assert sorted(removed) == sorted([gone1.sandbox_id, gone2.sandbox_id])
        links = netns.host_links("sbx")
        assert keep.host_if in links and foreign_if in links
        assert gone1.host_if not in links and gone2.host_if not in links
        # Once its owner is dead, it is an orphan too.
        other.kill()
        other.wait()
        assert network.cleanup_orphans({keep.sandbox_id}) == ["tforeign"]
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        net.delete_link(foreign_if)
        netns.delete(foreign_ns)


# ----- host rules --------------------------------------------------------------------------


def test_install_is_idempotent_and_atomic(network: Network) -> None:
    first = nft.list_table("inet", "sealbox")
    network.install()
    network.install()
    assert nft.list_table("inet", "sealbox") == first
    assert first is not None and f"redirect to :{PROXY_PORT}" in first


def test_conflicting_configuration_refused(make_sandbox: Callable[[], Link]) -> None:
    make_sandbox()
    with pytest.raises(EgressError, match="another sealbox gateway"):
        Network(proxy_port=PROXY_PORT + 1).install()


def test_uninstall_keeps_rules_while_sandboxes_exist(make_sandbox: Callable[[], Link]) -> None:
    make_sandbox()
    Network().uninstall()
    assert nft.list_table("inet", "sealbox") is not None


@pytest.mark.parametrize("subnet", ["8.8.0.0/16", "10.0.0.0/31", "nonsense", "fd00::/64"])
def test_bad_subnet(subnet: str) -> None:
    with pytest.raises(ConfigError):
        Network(subnet=subnet)
