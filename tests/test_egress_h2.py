"""HTTP/2 from the sandbox, and load, through the proxy core on loopback.

Real clients — `curl --http2`, `httpx` with http2=True, curl for the bulk transfers — talk
to `handle_connection` as in test_egress_proxy (the original destination handed over by the
test); upstreams are HTTP/1.1 servers on 127.0.0.1 reached through ResolvePin. No assertion
is about speed: deadlines only guard against hangs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import httpx
import pytest
from test_egress_proxy import SECRETS, VALUE, Setup, Upstream, ph, sandbox_gateway

HANG_GUARD = 100.0
MiB = 1 << 20
BLOCK = random.Random(7).randbytes(MiB)  # what /bytes/N repeats: incompressible, no secrets


def expected_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for _ in range(size // MiB):
        digest.update(BLOCK)
    digest.update(BLOCK[:size % MiB])
    return digest.hexdigest()


@dataclass
class BulkUpstream(Upstream):
    """Routes for load: /bytes/N (N bytes of BLOCKs), /sha256 (hash of the request body),
    /barrier/N (answers once N requests wait), /flood (streams until `release`), else "ok"."""

    waiting: int = 0
    all_waiting: asyncio.Event = field(default_factory=asyncio.Event)
    flooded: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)

        async def event() -> Any:
            while (ev := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await reader.read(MiB))
            return ev

        async def send(ev: Any) -> None:
            writer.write(conn.send(ev) or b"")
            await writer.drain()

        try:
            while isinstance(req := await event(), h11.Request):
                digest, size = hashlib.sha256(), 0
                while isinstance(ev := await event(), h11.Data):
                    digest.update(ev.data)
                    size += len(ev.data)
                route, _, arg = req.target.decode().strip("/").partition("/")
                if route == "bytes":
                    await send(h11.Response(status_code=200, headers=[
                        (b"content-length", arg.encode())]))
                    for left in range(int(arg), 0, -MiB):
                        await send(h11.Data(data=BLOCK[:min(left, MiB)]))
                elif route == "flood":
                    await send(h11.Response(status_code=200, headers=[]))
                    while not self.release.is_set():
                        await send(h11.Data(data=BLOCK))
                        self.flooded += len(BLOCK)
                else:
                    if route == "barrier":
                        self.waiting += 1
                        if self.waiting == int(arg):
                            self.all_waiting.set()
                        await self.all_waiting.wait()
                    body = json.dumps({"sha256": digest.hexdigest(), "bytes": size}).encode()
                    await send(h11.Response(status_code=200, headers=[
                        (b"content-length", str(len(body)).encode())]))
                    await send(h11.Data(data=body))
                await send(h11.EndOfMessage())
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[Setup]:
    async with sandbox_gateway(tmp_path, Upstream(), SECRETS, ["api.test", "other.test"]) as s:
        yield s


@pytest.fixture
async def bulk(tmp_path: Path) -> AsyncIterator[Setup]:
    async with sandbox_gateway(tmp_path, BulkUpstream(), SECRETS, ["api.test"]) as s:
        s.to("api.test", 443)
        yield s


# ----- clients ----------------------------------------------------------------------------
def curl_args(s: Setup, *args: str) -> list[str]:
    """curl as a sandbox would run it: it asks for https://api.test/..., and the connection
    lands on the proxy port (the test's stand-in for the NAT redirect)."""
    return ["curl", "-sS", "--max-time", str(int(HANG_GUARD)), "--cacert", str(s.ca.cert_path),
            "--connect-to", f"::127.0.0.1:{s.port}", *args]


async def curl(s: Setup, *args: str) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        *curl_args(s, *args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out, err.decode()


def h2_client(s: Setup, http2: bool = True, **kwargs: Any) -> httpx.AsyncClient:
    verify = ssl.create_default_context(cafile=str(s.ca.cert_path))
    return httpx.AsyncClient(http2=http2, http1=not http2, verify=verify,
                             base_url=f"https://127.0.0.1:{s.port}", timeout=HANG_GUARD,
                             **kwargs)


async def get(client: httpx.AsyncClient, path: str, host: str = "api.test",
              **kwargs: Any) -> httpx.Response:
    """A request for https://HOST/PATH; the TLS name is HOST, the socket goes to the proxy."""
    return await client.request(kwargs.pop("method", "GET"), path,
                                headers={"host": host, **kwargs.pop("headers", {})},
                                extensions={"sni_hostname": host}, **kwargs)


# ----- HTTP/2 -----------------------------------------------------------------------------
async def test_curl_http2_substitution_and_redaction(echo: Setup) -> None:
    echo.to("api.test", 443)
    p = ph(echo)
    code, out, err = await curl(echo, "--http2", "-D", "-", "-H", f"Authorization: Bearer {p}",
                                "--data-binary", f'{{"token": "{p}"}}',
                                f"https://api.test/v1/x?key={p}")
    assert code == 0, err
    assert out.startswith(b"HTTP/2 200")
    seen = echo.upstream.requests[-1]
    assert seen["headers"]["authorization"] == f"Bearer {VALUE}"
    assert seen["headers"]["host"] == "api.test"
    assert seen["target"] == f"/v1/x?key={VALUE}"
    assert seen["body"] == f'{{"token": "{VALUE}"}}'
    # Echoed in a header and three times in the body (split into 7-byte chunks upstream).
    assert VALUE.encode() not in out and out.count(p.encode()) == 4
    assert {e["where"] for e in echo.events("secret_substituted")} == {
        "target", "header:authorization", "body"}


async def test_curl_http2_authority_mismatch_is_blocked(echo: Setup) -> None:
    echo.to("api.test", 443)
    code, out, err = await curl(echo, "--http2", "-D", "-", "-H", "Host: other.test",
                                "-H", f"X-Key: {ph(echo)}", "https://api.test/")
    assert code == 0, err
    assert out.startswith(b"HTTP/2 403") and b"x-sealbox-blocked: host-mismatch" in out
    assert not echo.upstream.requests


async def test_exfil_on_one_stream_does_not_stop_the_others(echo: Setup) -> None:
    echo.to("other.test", 443)
    async with h2_client(echo) as client:
        first = await get(client, "/warm-up", host="other.test")
        assert first.http_version == "HTTP/2"
        blocked, fine = await asyncio.gather(
            get(client, "/steal", host="other.test", headers={"x-key": ph(echo)}),
            get(client, "/fine", host="other.test"))
        again = await get(client, "/after", host="other.test")
    # One connection carried all four streams.
    streams = {id(r.extensions["network_stream"]) for r in (first, blocked, fine, again)}
    assert len(streams) == 1
    assert blocked.status_code == 403 and blocked.headers["x-sealbox-blocked"] == "secret-exfil"
    assert fine.status_code == 200 and again.status_code == 200
    assert [r["target"] for r in echo.upstream.requests] == ["/warm-up", "/fine", "/after"]
    (event,) = echo.events("secret_exfil_blocked")
    assert event["host"] == "other.test" and event["secret"] == "API_KEY"


async def test_sequential_streams_reuse_the_upstream_connection(echo: Setup) -> None:
    echo.to("other.test", 443)
    async with h2_client(echo) as client:
        replies = [await get(client, f"/seq/{i}", host="other.test") for i in range(5)]
    assert [r.status_code for r in replies] == [200] * 5
    # One TLS connection upstream carried all five requests, one after the other.
    assert echo.upstream.connections == 1
    assert [r["target"] for r in echo.upstream.requests] == [f"/seq/{i}" for i in range(5)]


async def test_many_streams_on_one_connection(echo: Setup) -> None:
    echo.to("api.test", 443)
    p = ph(echo)
    async with h2_client(echo) as client:
        replies = await asyncio.gather(*(
            get(client, f"/n/{i}", method="POST", content=f"{i}:{p}".encode(),
                headers={"authorization": p}) for i in range(60)))
    assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in replies)
    bodies = sorted(r["body"] for r in echo.upstream.requests)
    assert bodies == sorted(f"{i}:{VALUE}" for i in range(60))
    for r in replies:  # every echo redacted
        assert VALUE not in r.text and r.headers["x-echo-auth"] == p


async def test_http2_bulk_both_ways_respects_flow_control(bulk: Setup) -> None:
    size = 24 * MiB  # far past every window: only WINDOW_UPDATEs can carry it
    async with h2_client(bulk) as client:
        down, up = await asyncio.gather(
            get(client, f"/bytes/{size}"),
            get(client, "/sha256", method="POST", content=BLOCK * 24))
    assert down.http_version == "HTTP/2"
    assert hashlib.sha256(down.content).hexdigest() == expected_sha256(size)
    assert up.json() == {"sha256": expected_sha256(size), "bytes": size}


async def h2_raw(s: Setup, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                h2.connection.H2Connection]:
    """A bare h2 client over TLS to the proxy, for what well-behaved clients never send."""
    tls = ssl.create_default_context(cafile=str(s.ca.cert_path))
    tls.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port, ssl=tls,
                                                   server_hostname=host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    await writer.drain()
    return reader, writer, conn


async def h2_events(reader: asyncio.StreamReader, conn: h2.connection.H2Connection,
                    until: type) -> list[Any]:
    """Events until one of type UNTIL (or the connection ends)."""
    seen: list[Any] = []
    async with asyncio.timeout(HANG_GUARD):
        while not any(isinstance(e, until) for e in seen):
            data = await reader.read(65536)
            if not data:
                break
            seen += conn.receive_data(data)
    return seen


async def test_h2_connect_is_refused_on_an_intercepted_connection(echo: Setup) -> None:
    echo.to("api.test", 443)
    reader, writer, conn = await h2_raw(echo, "api.test")
    try:
        conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"other.test:443")])
        writer.write(conn.data_to_send())
        seen = await h2_events(reader, conn, h2.events.StreamEnded)
    finally:
        writer.close()
    status = [dict(e.headers)[b":status"] for e in seen if isinstance(e, h2.events.ResponseReceived)]
    assert status == [b"403"], seen
    assert not echo.upstream.requests


async def test_h2_garbage_ends_that_connection_only(echo: Setup) -> None:
    echo.to("api.test", 443)
    reader, writer, conn = await h2_raw(echo, "api.test")
    try:
        # A DATA frame on stream 0 (RFC 9113 6.1: a connection error), after a valid preface.
        writer.write(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00" + b"evil")
        seen = await h2_events(reader, conn, h2.events.ConnectionTerminated)
    finally:
        writer.close()
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in seen) or not seen
    # The gateway still serves the next connection.
    async with h2_client(echo) as client:
        assert (await get(client, "/after")).status_code == 200


async def test_h2_placeholder_in_a_large_body_to_another_host_is_blocked(echo: Setup) -> None:
    echo.to("other.test", 443)
    body = b"x" * (2 << 20) + ph(echo).encode() + b"y" * 1000  # past the 1 MiB buffer
    async with h2_client(echo) as client:
        r = await get(client, "/upload", host="other.test", method="POST", content=body)
        after = await get(client, "/after", host="other.test")
    assert r.status_code == 403 and r.headers["x-sealbox-blocked"] == "secret-exfil"
    assert after.status_code == 200
    # The upstream never saw a whole request carrying the placeholder.
    assert [q["target"] for q in echo.upstream.requests] == ["/after"]
    assert echo.events("secret_exfil_blocked")


# ----- load (HTTP/1.1) --------------------------------------------------------------------
async def test_100mb_download_arrives_intact(bulk: Setup) -> None:
    size = 100 * MiB
    proc = await asyncio.create_subprocess_exec(
        *curl_args(bulk, "--http1.1", f"https://api.test/bytes/{size}"),
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    digest, got = hashlib.sha256(), 0
    async with asyncio.timeout(HANG_GUARD):
        while chunk := await proc.stdout.read(MiB):
            digest.update(chunk)
            got += len(chunk)
        assert await proc.wait() == 0
    assert got == size and digest.hexdigest() == expected_sha256(size)


async def test_100mb_upload_arrives_intact(bulk: Setup, tmp_path: Path) -> None:
    size = 100 * MiB
    path = tmp_path / "upload.bin"
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(BLOCK)
    code, out, err = await curl(bulk, "--http1.1", "-T", str(path), "https://api.test/sha256")
    assert code == 0, err
    assert json.loads(out) == {"sha256": expected_sha256(size), "bytes": size}


async def test_200_concurrent_connections_all_succeed(bulk: Setup) -> None:
    n = 200
    # The upstream answers only once all N requests wait at once: N connections are open.
    async with h2_client(bulk, http2=False, limits=httpx.Limits(max_connections=n)) as client:
        replies = await asyncio.gather(*(get(client, f"/barrier/{n}") for _ in range(n)))
    assert [r.status_code for r in replies] == [200] * n
    assert len(bulk.events("allowed")) == n


async def test_a_flooding_sandbox_does_not_starve_another(tmp_path: Path) -> None:
    flood_up = BulkUpstream()
    async with (sandbox_gateway(tmp_path / "a", flood_up, {}, ["api.test"]) as a,
                sandbox_gateway(tmp_path / "b", BulkUpstream(), {}, ["api.test"]) as b):
        a.to("api.test", 443)
        b.to("api.test", 443)
        # Sandbox A: parallel downloads that never end until released.
        floods = [await asyncio.create_subprocess_exec(
            *curl_args(a, "--http1.1", "-o", "/dev/null", "https://api.test/flood"))
            for _ in range(8)]
        try:
            async with asyncio.timeout(HANG_GUARD):
                while flood_up.flooded < 64 * MiB:
                    await asyncio.sleep(0.05)
                before = flood_up.flooded
                async with h2_client(b, http2=False) as client:
                    small = [await get(client, f"/small/{i}") for i in range(20)]
                assert [r.status_code for r in small] == [200] * 20
                # A was still flooding the whole time B was served.
                assert flood_up.flooded > before
                assert all(p.returncode is None for p in floods)
                flood_up.release.set()
                assert [await p.wait() for p in floods] == [0] * 8
        finally:
            for p in floods:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
