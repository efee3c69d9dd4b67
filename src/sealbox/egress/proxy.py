"""The per-sandbox TCP listener and what happens to each connection it accepts.

A sandbox's listener is bound on its own host-side address, so which listener accepted a
connection says which sandbox made it; nothing in the packets is trusted for that. The
original destination (from the NAT redirect) says where the sandbox meant to go:

* the sandbox's synthetic address for a name → that name (from its DNS answers);
* the gateway itself on `EXPLICIT_PROXY_PORT` → an explicit HTTP proxy (CONNECT, absolute
  URLs); on 53 → DNS over TCP;
* any other address → that literal address, under the address rules.

`handle_connection` takes the original destination as an argument so tests can drive it over
plain loopback sockets without the NAT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import replace


from sealbox.egress.context import SandboxContext
from sealbox.egress.dns import answer
from sealbox.egress.http import CONNECTION_ERRORS, Destination, HttpSession, Refusal
from sealbox.egress.http2 import H2Session
from sealbox.egress.policy import IPAddress
from sealbox.egress.streams import Stream, TcpStream, TlsStream
from sealbox.egress.tls import NotTls, is_tls_start, parse_client_hello
from sealbox.errors import EgressError

EXPLICIT_PROXY_PORT = 3128
DNS_PORT = 53
SO_ORIGINAL_DST = 80
FIRST_BYTES_TIMEOUT = 30.0
MAX_HELLO = 64 << 10


def original_destination(sock: socket.socket) -> tuple[IPAddress, int]:
    """Where a redirected connection was headed (the NAT's record of it)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return ipaddress.IPv4Address(raw[4:8]), port


async def handle_connection(client: Stream, orig_dst: tuple[IPAddress, int],
                            ctx: SandboxContext) -> None:
    ip, port = orig_dst
    try:
        if ip == ctx.host_ip and port == EXPLICIT_PROXY_PORT:
            await HttpSession(client, ctx, None,
                              on_connect=lambda s, d: serve_destination(s, d, ctx)).run()
        elif ip == ctx.host_ip and port == DNS_PORT:
            await serve_dns_tcp(client, ctx)
        elif ip == ctx.host_ip:
            ctx.audit.record("blocked", host=str(ip), port=port,
                             reason="connection to the gateway itself")
        else:
            name = ctx.names.name_for(ip)
            await serve_destination(client, Destination(name, None if name else ip, port), ctx)
    except (*CONNECTION_ERRORS, NotTls) as exc:
        ctx.audit.record("connection_error", host=str(ip), port=port,
                         reason=type(exc).__name__)
    finally:
        await client.close()


async def serve_destination(client: Stream, dest: Destination, ctx: SandboxContext) -> None:
    """Serve a connection the sandbox opened to DEST: TLS (terminated with a leaf from the
    installation CA) or plain HTTP."""
    data = await asyncio.wait_for(client.recv(), FIRST_BYTES_TIMEOUT)
    if not data:
        return
    if not is_tls_start(data):
        client.unread(data)
        await HttpSession(client, ctx, dest).run()
        return
    hello = parse_client_hello(data)
    while hello is None:
        more = await asyncio.wait_for(client.recv(), FIRST_BYTES_TIMEOUT)
        if not more or len(data) > MAX_HELLO:
            return
        data += more
        hello = parse_client_hello(data)
    client.unread(data)
    refusal = None
    if dest.name is not None and hello.sni is not None and hello.sni != dest.name:
        # The sandbox resolved one name and asks the server for another: it wants a
        # different upstream than the one its address stands for.
        reason = f"TLS server name {hello.sni!r} does not match {dest.name!r}"
        ctx.audit.record("tls_mismatch", host=dest.name, port=dest.port, sni=hello.sni,
                         reason=reason)
        refusal = Refusal(403, "sni-mismatch", reason)
    # Show the certificate the client asked for, so it reads the 403 instead of a TLS error.
    tls = await TlsStream.accept(client, ctx.ca.server_context(hello.sni or dest.host))
    dest = replace(dest, tls=True, sni=hello.sni)
    session = H2Session if tls.alpn == "h2" else HttpSession
    await session(tls, ctx, dest, refusal=refusal).run()


async def serve_dns_tcp(client: Stream, ctx: SandboxContext) -> None:
    buf = b""
    while True:
        data = await asyncio.wait_for(client.recv(), FIRST_BYTES_TIMEOUT)
        if not data:
            return
        buf += data
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack_from("!H", buf)[0]:
            size = struct.unpack_from("!H", buf)[0]
            query, buf = buf[2:2 + size], buf[2 + size:]
            reply = answer(query, ctx.policy, ctx.names, ctx.audit)
            if reply is None:
                return
            await client.send(struct.pack("!H", len(reply)) + reply)


class ProxyListener:
    """One sandbox's listening socket at (host_ip, port)."""

    def __init__(self, ctx: SandboxContext) -> None:
        self.ctx = ctx
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._accept, host, port,
                                                      reuse_address=True)
        except OSError as exc:
            raise EgressError(f"cannot listen on {host}:{port} for sandbox "
                              f"{self.ctx.sandbox_id}: {exc}") from exc

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        stream = TcpStream(reader, writer)
        try:
            try:
                orig = original_destination(writer.get_extra_info("socket"))
            except OSError:
                await stream.close()  # not a redirected connection: nothing to serve
                return
            await handle_connection(stream, orig, self.ctx)
        except asyncio.CancelledError:
            pass  # close() ends open connections; the task ends here either way
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
