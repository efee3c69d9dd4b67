"""The proxy core over real loopback sockets, driven without the NAT: each test hands
`handle_connection` the original destination itself. Upstreams are local HTTP/TLS servers
(a test CA passed as upstream_ca), reached through ResolvePin; names are under .test."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import h11
import pytest

from sealbox.egress.audit import AuditLog
from sealbox.egress.context import SandboxContext
from sealbox.egress.dns import NameMap
from sealbox.egress.policy import IPAddress, Policy
from sealbox.egress.proxy import EXPLICIT_PROXY_PORT, handle_connection
from sealbox.egress.resolver import ResolvePin, Resolver
from sealbox.egress.secrets import SecretContext, SecretSpec
from sealbox.egress.streams import TcpStream
from sealbox.egress.tls import CertificateAuthority, upstream_context
from sealbox.egress.websocket import FrameRewriter, encode_frame

VALUE = "sk-live-REAL-0123456789abcdef"
HOST_IP = IPv4Address("10.77.0.1")  # never bound: handle_connection only compares with it
Headers = list[tuple[bytes, bytes]]


# ----- upstream: an HTTP/1.1 echo server (plain and TLS) ----------------------------------
@dataclass
class Upstream:
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    plain_port: int = 0
    tls_port: int = 0
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)

        async def event() -> Any:
            while (ev := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            return ev

        async def send(*events: Any) -> None:
            for ev in events:
                writer.write(conn.send(ev) or b"")
            await writer.drain()

        try:
            while isinstance(req := await event(), h11.Request):
                body = b""
                while isinstance(ev := await event(), h11.Data):
                    body += ev.data
                record = {"method": req.method.decode(), "target": req.target.decode(),
                          "headers": {k.decode(): v.decode() for k, v in req.headers},
                          "body": body.decode()}
                self.requests.append(record)
                if req.target == b"/ws":
                    await self.websocket(conn, send, reader, writer)
                    return
                if req.target == b"/stream":
                    await send(h11.Response(status_code=200, headers=[]), h11.Data(data=b"first\n"))
                    await self.release.wait()
                    await send(h11.Data(data=b"second\n"), h11.EndOfMessage())
                else:
                    data = json.dumps(record).encode()
                    # Tiny chunks: an echoed value is split across many of them.
                    await send(h11.Response(status_code=200, headers=[
                        (b"x-echo-auth", dict(req.headers).get(b"authorization", b"-"))]))
                    for i in range(0, len(data), 7):
                        await send(h11.Data(data=data[i:i + 7]))
                    await send(h11.EndOfMessage())
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()

    async def websocket(self, conn: h11.Connection, send: Callable[..., Awaitable[None]],
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send(h11.InformationalResponse(status_code=101, headers=[
            (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", b"dummy")]))
        received: list[bytes] = []
        frames = FrameRewriter(lambda p: received.append(p) or p)
        data = conn.trailing_data[0]
        while True:
            frames.feed(data)
            while received:
                payload = received.pop(0)
                self.requests.append({"ws": payload.decode()})
                writer.write(encode_frame(0x81, b"echo:" + payload, None))
                await writer.drain()
            data = await reader.read(65536)
            if not data:
                return


# ----- the client side: h11 over a raw socket to the proxy --------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    async def event(self) -> Any:
        while (ev := self.conn.next_event()) is h11.NEED_DATA:
            self.conn.receive_data(await self.reader.read(65536))
        return ev

    async def send(self, *events: Any) -> None:
        for ev in events:
            self.writer.write(self.conn.send(ev) or b"")
        await self.writer.drain()

    async def request(self, method: str, target: str, headers: Headers | None = None,
                      body: bytes | list[bytes] = b"", host: str = "api.test") -> Reply:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [(b"host", host.encode()), *(headers or [])]
        chunks = body if isinstance(body, list) else [body]
        if isinstance(body, list):
            hdrs.append((b"transfer-encoding", b"chunked"))
        elif body:
            hdrs.append((b"content-length", str(len(body)).encode()))
        await self.send(h11.Request(method=method, target=target, headers=hdrs))
        for chunk in chunks:
            if chunk:
                await self.send(h11.Data(data=chunk))
        await self.send(h11.EndOfMessage())
        return await self.response()

    async def response(self) -> Reply:
        resp = await self.event()
        body = b""
        while isinstance(ev := await self.event(), h11.Data):
            body += ev.data
        return Reply(resp.status_code, dict(resp.headers), body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@dataclass
class Setup:
    ctx: SandboxContext
    upstream: Upstream
    ca: CertificateAuthority
    port: int
    orig: tuple[IPAddress, int] = (HOST_IP, 0)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def to(self, name: str, port: int) -> None:
        """The next connection is one the sandbox opened to NAME:PORT after asking our DNS."""
        self.orig = (self.ctx.names.address_for(name), port)

    async def connect(self, sni: str | None = "api.test", tls: bool = True) -> Client:
        client_ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=client_ctx if tls else None,
            server_hostname=sni if tls else None)
        return self.track(reader, writer)

    def track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Client:
        self.writers.append(writer)
        return Client(reader, writer)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.ctx.audit.events() if e["kind"] == kind]


def make_context(tmp: Path, upstream: Upstream, test_ca: CertificateAuthority,
                 secrets: dict[str, SecretSpec], allow: list[str]) -> SandboxContext:
    pins = [ResolvePin(h, p, "127.0.0.1", up) for h in ("api.test", "other.test")
            for p, up in ((443, upstream.tls_port), (80, upstream.plain_port))]
    secret_ctx = SecretContext(secrets)
    return SandboxContext(
        sandbox_id="sbtest", host_ip=HOST_IP, policy=Policy.parse(allow), secrets=secret_ctx,
        names=NameMap(), audit=AuditLog("sbtest", tmp / "audit.jsonl", secret_ctx.redact_text),
        resolver=Resolver(pins), ca=CertificateAuthority(tmp / "ca"),
        upstream_tls=upstream_context([test_ca.cert_path]),
    )


SECRETS = {"API_KEY": SecretSpec(value=VALUE, hosts=["api.test"])}


@pytest.fixture
async def setup(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    secrets, allow = getattr(request, "param", (SECRETS, ["api.test", "other.test"]))
    async with sandbox_gateway(tmp_path, Upstream(), secrets, allow) as s:
        yield s


@contextlib.asynccontextmanager
async def sandbox_gateway(tmp_path: Path, upstream: Upstream, secrets: dict[str, SecretSpec],
                          allow: list[str]) -> AsyncIterator[Setup]:
    """One sandbox's proxy on loopback (its files under TMP_PATH) in front of UPSTREAM."""
    test_ca = CertificateAuthority(tmp_path / "upstream-ca")
    plain = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    tls = await asyncio.start_server(upstream.serve, "127.0.0.1", 0,
                                     ssl=_multi_host_context(test_ca))
    upstream.plain_port = plain.sockets[0].getsockname()[1]
    upstream.tls_port = tls.sockets[0].getsockname()[1]
    ctx = make_context(tmp_path, upstream, test_ca, secrets, allow)
    holder: list[Setup] = []
    tasks: set[asyncio.Task[None]] = set()

    async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        with contextlib.suppress(asyncio.CancelledError):  # teardown cancels open connections
            await handle_connection(TcpStream(reader, writer), holder[0].orig, ctx)

    server = await asyncio.start_server(front, "127.0.0.1", 0)
    holder.append(Setup(ctx, upstream, ctx.ca, server.sockets[0].getsockname()[1]))
    try:
        yield holder[0]
    finally:
        upstream.release.set()
        for w in holder[0].writers:
            w.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await w.wait_closed()
        for s in (server, plain, tls):
            s.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _multi_host_context(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ca.server_context("api.test")
    other = ca.server_context("other.test")
    ctx.sni_callback = lambda sock, name, _: setattr(sock, "context", other) if (
        name == "other.test") else None
    return ctx


def ph(s: Setup, name: str = "API_KEY") -> str:
    return s.ctx.secrets.placeholders[name]


# ----- tests ------------------------------------------------------------------------------
async def test_substitution_reaches_upstream_and_echoes_are_redacted(setup: Setup) -> None:
    setup.to("api.test", 443)
    client = await setup.connect()
    p = ph(setup)
    reply = await client.request("POST", f"/v1/x?key={p}",
                                 [(b"authorization", f"Bearer {p}".encode())],
                                 body=f'{{"token": "{p}"}}'.encode())
    seen = setup.upstream.requests[-1]
    assert seen["headers"]["authorization"] == f"Bearer {VALUE}"
    assert seen["target"] == f"/v1/x?key={VALUE}"
    assert seen["body"] == f'{{"token": "{VALUE}"}}'
    assert seen["headers"]["content-length"] == str(len(seen["body"]))
    assert seen["headers"]["accept-encoding"] == "identity"
    # The upstream echoed the value in a header and (split in 7-byte chunks) in the body.
    assert reply.status == 200
    assert VALUE.encode() not in reply.body and reply.body.count(p.encode()) == 3
    assert reply.headers[b"x-echo-auth"] == f"Bearer {p}".encode()
    subs = setup.events("secret_substituted")
    assert {e["where"] for e in subs} == {"target", "header:authorization", "body"}
    assert VALUE not in (Path(str(setup.ctx.audit.path)).read_text())
    await client.close()


async def test_chunked_request_body_with_split_placeholder(setup: Setup) -> None:
    setup.to("api.test", 80)
    client = await setup.connect(tls=False)
    p = ph(setup).encode()
    reply = await client.request("PUT", "/upload", body=[b"a" * 5000 + p[:20], p[20:] + b"z"])
    assert reply.status == 200
    assert setup.upstream.requests[-1]["body"] == "a" * 5000 + VALUE + "z"
    await client.close()


async def test_placeholder_to_unbound_host_is_blocked(setup: Setup) -> None:
    setup.to("other.test", 443)
    client = await setup.connect(sni="other.test")
    reply = await client.request("GET", "/", [(b"x-key", ph(setup).encode())], host="other.test")
    assert reply.status == 403 and reply.headers[b"x-sealbox-blocked"] == b"secret-exfil"
    assert not setup.upstream.requests
    (event,) = setup.events("secret_exfil_blocked")
    assert event["secret"] == "API_KEY" and event["host"] == "other.test"


async def test_sni_that_disagrees_with_dns_is_blocked(setup: Setup) -> None:
    setup.to("other.test", 443)  # the sandbox looked up other.test ...
    client = await setup.connect(sni="api.test")  # ... but asks TLS for api.test
    reply = await client.request("GET", "/", [(b"authorization", ph(setup).encode())])
    assert reply.status == 403 and reply.headers[b"x-sealbox-blocked"] == b"sni-mismatch"
    assert setup.events("tls_mismatch") and not setup.upstream.requests


async def test_host_header_that_disagrees_is_blocked(setup: Setup) -> None:
    setup.to("other.test", 80)
    client = await setup.connect(tls=False)
    reply = await client.request("GET", "/", [(b"authorization", ph(setup).encode())],
                                 host="api.test")
    assert reply.status == 403 and reply.headers[b"x-sealbox-blocked"] == b"host-mismatch"
    assert not setup.upstream.requests


async def test_another_sandboxes_placeholder_is_not_substituted(setup: Setup) -> None:
    foreign = SecretContext(SECRETS).placeholders["API_KEY"]
    setup.to("api.test", 443)
    client = await setup.connect()
    reply = await client.request("GET", "/", [(b"authorization", foreign.encode())])
    assert reply.status == 200
    assert setup.upstream.requests[-1]["headers"]["authorization"] == foreign


SCOPED = {
    "HDR": SecretSpec(value="hdr-value-123", hosts=["api.test"], headers=["authorization"]),
    "GETONLY": SecretSpec(value="get-value-123", hosts=["api.test"], methods=["GET"]),
    "V1": SecretSpec(value="v1-value-123", hosts=["api.test"], path_prefixes=["/v1/"]),
    "OLD": SecretSpec(value="old-value-123", hosts=["api.test"],
                      expires_at=datetime.now(UTC) - timedelta(minutes=1)),
}


@pytest.mark.parametrize("setup", [(SCOPED, ["api.test"])], indirect=True)
async def test_scope_rules(setup: Setup) -> None:
    setup.to("api.test", 443)
    client = await setup.connect()
    names = ("HDR", "GETONLY", "V1", "OLD")
    values = " ".join(ph(setup, n) for n in names).encode()
    await client.request("POST", "/v1/a", [(b"authorization", values), (b"x-other", values)])
    seen = setup.upstream.requests[-1]["headers"]
    assert seen["authorization"].split() == [
        "hdr-value-123", ph(setup, "GETONLY"), "v1-value-123", ph(setup, "OLD")]
    assert seen["x-other"].split() == [
        ph(setup, "HDR"), ph(setup, "GETONLY"), "v1-value-123", ph(setup, "OLD")]
    await client.request("GET", "/v2/b", [(b"x-other", values)])
    assert setup.upstream.requests[-1]["headers"]["x-other"].split() == [
        ph(setup, "HDR"), "get-value-123", ph(setup, "V1"), ph(setup, "OLD")]
    reasons = {e["secret"]: e["reason"] for e in setup.events("secret_out_of_scope")}
    assert reasons["OLD"] == "expired" and "path" in reasons["V1"]
    await client.close()


async def test_blocked_destinations_get_403_with_reason(setup: Setup) -> None:
    setup.to("blocked.test", 443)
    client = await setup.connect(sni="blocked.test")
    reply = await client.request("GET", "/", host="blocked.test")
    assert reply.status == 403 and reply.headers[b"x-sealbox-blocked"] == b"not-allowed"
    assert b"not on the allowlist" in reply.body
    setup.orig = (ip_address("169.254.169.254"), 80)  # literal metadata address: no connect
    client = await setup.connect(tls=False)
    reply = await client.request("GET", "/latest/meta-data", host="169.254.169.254")
    assert reply.status == 403 and b"link-local" in reply.body
    assert len(setup.events("blocked")) == 2 and not setup.upstream.requests


async def test_keep_alive_requests_are_each_checked(setup: Setup) -> None:
    setup.to("api.test", 443)
    client = await setup.connect()
    assert (await client.request("GET", "/one")).status == 200
    assert (await client.request("GET", "/two")).status == 200
    setup.ctx.policy = Policy.parse(["other.test"])
    reply = await client.request("GET", "/three")
    assert reply.status == 403
    assert [r["target"] for r in setup.upstream.requests] == ["/one", "/two"]


async def test_streaming_response_arrives_incrementally(setup: Setup) -> None:
    setup.to("api.test", 443)
    client = await setup.connect()
    await client.send(h11.Request(method="GET", target="/stream", headers=[(b"host", b"api.test")]),
                      h11.EndOfMessage())
    assert isinstance(await client.event(), h11.Response)
    first = await asyncio.wait_for(client.event(), 5)
    assert isinstance(first, h11.Data) and first.data == b"first\n"
    setup.upstream.release.set()
    rest = b""
    while isinstance(ev := await client.event(), h11.Data):
        rest += ev.data
    assert rest == b"second\n"


async def test_websocket_upgrade_relays_frames_with_substitution(setup: Setup) -> None:
    setup.to("api.test", 443)
    client = await setup.connect()
    await client.send(h11.Request(method="GET", target="/ws", headers=[
        (b"host", b"api.test"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-key", base64.b64encode(b"0123456789abcdef")),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-extensions", b"permessage-deflate")]))
    info = await client.event()
    assert isinstance(info, h11.InformationalResponse) and info.status_code == 101
    assert "sec-websocket-extensions" not in setup.upstream.requests[-1]["headers"]
    client.writer.write(encode_frame(0x81, f"key={ph(setup)}".encode(), b"\x01\x02\x03\x04"))
    await client.writer.drain()
    got: list[bytes] = []
    frames = FrameRewriter(lambda p: got.append(p) or p)
    frames.feed(client.conn.trailing_data[0])
    while not got:
        frames.feed(await asyncio.wait_for(client.reader.read(65536), 5))
    assert setup.upstream.requests[-1] == {"ws": f"key={VALUE}"}
    assert got == [f"echo:key={ph(setup)}".encode()]
    await client.close()


async def test_explicit_proxy_connect_and_absolute_form(setup: Setup) -> None:
    setup.orig = (HOST_IP, EXPLICIT_PROXY_PORT)
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    setup.writers.append(writer)
    writer.write(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    client_ctx = ssl.create_default_context(cafile=str(setup.ca.cert_path))
    await writer.start_tls(client_ctx, server_hostname="api.test")
    client = setup.track(reader, writer)
    reply = await client.request("GET", "/via-connect",
                                 [(b"authorization", ph(setup).encode())])
    assert reply.status == 200
    assert setup.upstream.requests[-1]["headers"]["authorization"] == VALUE
    await client.close()

    plain = await setup.connect(tls=False)
    reply = await plain.request("GET", "http://api.test/absolute?x=1")
    assert reply.status == 200 and setup.upstream.requests[-1]["target"] == "/absolute?x=1"
    reply = await plain.request("GET", "http://blocked.test/", host="blocked.test")
    assert reply.status == 403

    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    setup.writers.append(writer)
    writer.write(b"CONNECT blocked.test:443 HTTP/1.1\r\nHost: blocked.test:443\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 403")


async def test_dns_over_tcp_on_the_gateway(setup: Setup) -> None:
    from dnslib import DNSRecord
    setup.orig = (HOST_IP, 53)
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    setup.writers.append(writer)
    query = DNSRecord.question("api.test", "A").pack()
    writer.write(len(query).to_bytes(2, "big") + query)
    size = int.from_bytes(await reader.readexactly(2), "big")
    reply = DNSRecord.parse(await reader.readexactly(size))
    assert setup.ctx.names.name_for(ip_address(str(reply.rr[0].rdata))) == "api.test"
