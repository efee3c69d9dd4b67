"""HTTP/1.1 between a sandbox and its upstreams: one `HttpSession` per client connection.

h11 parses both sides; this module wires the policy hooks in at the points where a decision
is due: every request is checked on its own (keep-alive re-checks), placeholders are decided
for the upstream the gateway actually connects to, and every response byte passes redaction.
Bodies stream: only request bodies up to `BODY_LIMIT` with a Content-Length are buffered (so
the length can be fixed after substitution).
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11

from sealbox.egress.context import SandboxContext
from sealbox.egress.policy import IPAddress, normalize_name, parse_address
from sealbox.egress.resolver import ResolveError
from sealbox.egress.secrets import BODY_LIMIT, RequestRewriter, SecretBlocked
from sealbox.egress.streams import Stream, TcpStream
from sealbox.egress.websocket import FrameError, FrameRewriter
from sealbox.errors import ConfigError

CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
DRAIN_TIMEOUT = 2.0
# Never forwarded upstream: proxy-only headers, and Expect (the gateway answers 100 itself).
_DROP_REQUEST = {b"proxy-connection", b"proxy-authorization", b"expect", b"keep-alive"}
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection"}
# What ends one client connection (or one h2 stream): peers misbehaving or going away.
CONNECTION_ERRORS = (OSError, ssl.SSLError, h11.ProtocolError, TimeoutError)


@dataclass(frozen=True)
class Destination:
    """Where the sandbox meant to go: a name (from its DNS answer, CONNECT or an absolute URL)
    or, without one, a literal address."""

    name: str | None
    ip: IPAddress | None
    port: int
    tls: bool = False
    sni: str | None = None

    @property
    def host(self) -> str:
        return self.name if self.name is not None else str(self.ip)

    @classmethod
    def parse(cls, host: str, port: int) -> Destination:
        ip = parse_address(host)
        if ip is not None:
            return cls(None, ip, port)
        try:
            return cls(normalize_name(host), None, port)
        except ConfigError as exc:
            raise Refusal(400, "bad-request", exc.message) from None


class Refusal(Exception):
    """Answer the current request with STATUS and close. CODE goes in the response header;
    KIND is the audit event."""

    def __init__(self, status: int, code: str, reason: str, kind: str = "blocked",
                 **fields: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.kind = kind
        self.fields = fields


@dataclass
class _Upstream:
    key: tuple[str, int, bool, str | None]
    stream: TcpStream
    conn: h11.Connection


class UpstreamPool:
    """Idle upstream connections that sessions of one client connection hand to each other:
    every HTTP/2 stream is its own `HttpSession`, and without this each would pay a new TCP
    and TLS handshake upstream."""

    MAX_IDLE = 8

    def __init__(self) -> None:
        self._idle: list[_Upstream] = []

    def take(self, key: tuple[str, int, bool, str | None]) -> _Upstream | None:
        for i, up in enumerate(self._idle):
            if up.key == key:
                del self._idle[i]
                if up.stream.reader.at_eof():  # closed by the upstream while idle
                    up.stream.writer.close()
                    continue
                return up
        return None

    async def put(self, up: _Upstream) -> None:
        if up.conn.our_state is h11.IDLE and len(self._idle) < self.MAX_IDLE:
            self._idle.append(up)
        else:
            await up.stream.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for up in idle:  # all at once first: a cancelled await below must not skip any
            up.stream.writer.close()
        for up in idle:
            await up.stream.close()


def split_host_port(value: str, default: int | None) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]' or '[v6]:port' → (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    if not port_text:
        return host.lower(), default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Refusal(400, "bad-request", f"invalid port in {value!r}")
    return host.lower(), int(port_text)


OnConnect = Callable[[Stream, Destination], Awaitable[None]]


class HttpSession:
    """Serve one client connection. DEST None is explicit-proxy mode: each request names its
    destination (CONNECT authority or absolute URL), and ON_CONNECT takes over a tunnel.
    REFUSAL, if given, answers every request (e.g. the TLS name did not match)."""

    def __init__(self, client: Stream, ctx: SandboxContext, dest: Destination | None, *,
                 on_connect: OnConnect | None = None, refusal: Refusal | None = None,
                 pool: UpstreamPool | None = None) -> None:
        self.client = client
        self.ctx = ctx
        self.dest = dest
        self.on_connect = on_connect
        self.refusal = refusal
        self.pool = pool
        self.conn = h11.Connection(h11.SERVER)
        self._up: _Upstream | None = None
        self._fields: dict[str, Any] = {}

    # ----- plumbing ----------------------------------------------------------------------
    async def _client_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await asyncio.wait_for(self.client.recv(), IDLE_TIMEOUT))

    async def _to_client(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.client.send(data)

    @staticmethod
    async def _upstream_event(up: _Upstream) -> Any:
        while True:
            event = up.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            up.conn.receive_data(await asyncio.wait_for(up.stream.recv(), IDLE_TIMEOUT))

    @staticmethod
    async def _to_upstream(up: _Upstream, event: Any) -> None:
        data = up.conn.send(event)
        if data:
            await up.stream.send(data)

    async def _drop_upstream(self) -> None:
        if self._up is not None:
            up, self._up = self._up, None
            await up.stream.close()

    def _audit(self, kind: str, **fields: Any) -> None:
        self.ctx.audit.record(kind, **{**self._fields, **fields})

    # ----- the session -------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                self._fields = {}
                event = await self._client_event()
                if not isinstance(event, h11.Request):
                    return
                try:
                    keep = await self._exchange(event)
                except Refusal as refusal:
                    await self._refuse(refusal)
                    return
                if not (keep and self.conn.our_state is h11.DONE
                        and self.conn.their_state is h11.DONE):
                    return
                self.conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            # Garbage from the sandbox: say so if a response can still be sent.
            await self._refuse(Refusal(exc.error_status_hint, "bad-request", str(exc)))
        finally:
            if self.pool is not None and self._up is not None:
                up, self._up = self._up, None
                await self.pool.put(up)
            await self._drop_upstream()

    async def _refuse(self, r: Refusal) -> None:
        self._audit(r.kind, reason=r.reason, status=r.status, **r.fields)
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response has started; closing is all that is left
        body = f"sealbox: {self.ctx.secrets.redact_text(r.reason)}\n".encode()
        header = b"x-sealbox-blocked" if r.status == 403 else b"x-sealbox-error"
        try:
            await self._to_client(h11.Response(status_code=r.status, headers=[
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (header, r.code.encode()), (b"connection", b"close")]))
            await self._to_client(h11.Data(data=body))
            await self._to_client(h11.EndOfMessage())
            # Read what the client still sends, so closing does not reset the connection
            # before it has read the answer.
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while self.conn.their_state is h11.SEND_BODY:
                    if not isinstance(await self._client_event(), h11.Data):
                        break
        except (h11.ProtocolError, OSError, TimeoutError):
            pass

    async def _exchange(self, req: h11.Request) -> bool:
        """Handle one request; True if the client connection may carry another."""
        method = req.method.decode("ascii")
        target = req.target
        if self.dest is None:
            if method == "CONNECT":
                await self._tunnel(req)
                return False
            dest, target = self._absolute(target, None)
        else:
            dest = self.dest
            if method == "CONNECT":
                self._fields = {"host": dest.host, "port": dest.port, "method": method}
                raise Refusal(403, "not-allowed", "CONNECT is only accepted by the explicit proxy")
            if not target.startswith(b"/") and target != b"*":
                dest, target = self._absolute(target, dest)
        path = target.decode("latin-1")
        self._fields = {"host": dest.host, "port": dest.port, "method": method, "path": path}
        if self.refusal is not None:
            raise self.refusal
        self._check_host_header(req, dest)
        self._check_policy(dest)
        rewriter = self.ctx.secrets.rewriter(dest.name, dest.port, method, path)
        try:
            new_target = rewriter.rewrite(target, "target")
            headers = self._request_headers(req, dest, rewriter)
            chunked = _has_token(req.headers, b"transfer-encoding", b"chunked")
            length = _content_length(req.headers)
            buffered = not chunked and (length is None or length <= BODY_LIMIT)
            if self.conn.they_are_waiting_for_100_continue:
                await self._to_client(h11.InformationalResponse(status_code=100, headers=[]))
            body = b""
            if buffered:
                body = await self._read_body(rewriter)
                if length is not None:
                    headers.append((b"content-length", str(len(body)).encode()))
            elif length is not None:
                # Streamed unchanged (a placeholder is refused, never swapped): same length.
                headers.append((b"content-length", str(length).encode()))
        except SecretBlocked as b:
            raise _secret_refusal(b) from None
        up = await self._connect(dest)
        await self._to_upstream(up, h11.Request(method=req.method, target=new_target,
                                                headers=headers))
        if buffered:
            if body:
                await self._to_upstream(up, h11.Data(data=body))
            await self._to_upstream(up, h11.EndOfMessage())
        else:
            await self._stream_body(up, rewriter, substitute=chunked)
        for e in rewriter.events:
            self._audit(e.kind, secret=e.secret, where=e.where, reason=e.reason or None)
        return await self._relay_response(up, dest, method, rewriter)

    def _absolute(self, target: bytes, dest: Destination | None) -> tuple[Destination, bytes]:
        """An absolute-form target: where it points, and its origin form for upstream."""
        url = urlsplit(target.decode("latin-1"))
        try:
            port = url.port or 80
        except ValueError:
            port = 0
        if url.scheme != "http" or not url.hostname or not port:
            raise Refusal(400, "bad-request",
                          "proxy requests must be absolute http:// URLs or CONNECT")
        origin = (url.path or "/") + (f"?{url.query}" if url.query else "")
        parsed = Destination.parse(url.hostname, port)
        if dest is not None and (parsed.host, port) != (dest.host, dest.port):
            raise Refusal(403, "host-mismatch",
                          f"request for {parsed.host}:{port} on a connection to {dest.host}")
        return (parsed if dest is None else dest), origin.encode("latin-1")

    def _check_host_header(self, req: h11.Request, dest: Destination) -> None:
        values = [v for n, v in req.headers if n == b"host"]
        if not values:
            return  # HTTP/1.0; the Host sent upstream is added from DEST
        host, port = split_host_port(values[0].decode("latin-1"), dest.port)
        if len(values) > 1 or host.removesuffix(".") != dest.host or port != dest.port:
            raise Refusal(403, "host-mismatch",
                          f"Host header {values[0].decode('latin-1')!r} does not match the "
                          f"destination {dest.host}:{dest.port}")

    def _check_policy(self, dest: Destination) -> None:
        policy = self.ctx.policy
        decision = (policy.check_name(dest.name, dest.port) if dest.name is not None
                    else policy.check_address(dest.ip, dest.port) if dest.ip is not None
                    else None)
        if decision is None or not decision.allowed:
            raise Refusal(403, "not-allowed", decision.reason if decision else "no destination")

    def _request_headers(self, req: h11.Request, dest: Destination,
                         rewriter: RequestRewriter) -> list[tuple[bytes, bytes]]:
        bound = self.ctx.secrets.binds(dest.name, dest.port)
        websocket = _has_token(req.headers, b"upgrade", b"websocket")
        out: list[tuple[bytes, bytes]] = []
        for name, value in req.headers:
            if (name in _DROP_REQUEST or name == b"content-length"
                    # a compressed answer could hide an echoed value from redaction
                    or (bound and name == b"accept-encoding")
                    # compressed WebSocket frames could not be inspected
                    or name == b"sec-websocket-extensions"
                    # only WebSocket upgrades are relayed (h2c and others are not)
                    or (name == b"upgrade" and not websocket)):
                continue
            out.append((name, rewriter.rewrite(value, "header:" + name.decode("latin-1"))))
        if not any(n == b"host" for n, _ in out):
            default = 443 if dest.tls else 80
            host = dest.host if dest.port == default else f"{dest.host}:{dest.port}"
            out.insert(0, (b"host", host.encode()))
        if bound:
            out.append((b"accept-encoding", b"identity"))
        return out

    async def _read_body(self, rewriter: RequestRewriter) -> bytes:
        parts = []
        while True:
            event = await self._client_event()
            if isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return rewriter.rewrite(b"".join(parts), "body")
            else:
                raise ConnectionError("client went away mid-request")

    async def _stream_body(self, up: _Upstream, rewriter: RequestRewriter,
                           substitute: bool) -> None:
        replacer = rewriter.body(substitute)
        try:
            while True:
                event = await self._client_event()
                if isinstance(event, h11.Data):
                    out = replacer.feed(event.data)
                    if out:
                        await self._to_upstream(up, h11.Data(data=out))
                elif isinstance(event, h11.EndOfMessage):
                    out = replacer.finish()
                    if out:
                        await self._to_upstream(up, h11.Data(data=out))
                    trailers = [(n, rewriter.rewrite(v, "header:" + n.decode("latin-1")))
                                for n, v in event.headers]
                    await self._to_upstream(up, h11.EndOfMessage(headers=trailers))
                    return
                else:
                    raise ConnectionError("client went away mid-request")
        except SecretBlocked as b:
            # The upstream has part of the body: cut it off so it never sees a whole request.
            await self._drop_upstream()
            raise _secret_refusal(b) from None

    async def _connect(self, dest: Destination) -> _Upstream:
        server_name = dest.name or dest.sni or str(dest.ip)
        key = (dest.host, dest.port, dest.tls, server_name)
        if self._up is not None:
            if self._up.key == key and self._up.conn.our_state is h11.IDLE:
                return self._up
            await self._drop_upstream()
        pooled = self.pool.take(key) if self.pool is not None else None
        if pooled is not None:
            self._up = pooled
            return pooled
        if dest.name is not None:
            try:
                addr, port = await self.ctx.resolver.resolve(dest.name, dest.port,
                                                             self.ctx.policy)
            except ResolveError as exc:
                raise (Refusal(403, "not-allowed", str(exc)) if exc.blocked else
                       Refusal(502, "upstream-unreachable", str(exc), kind="upstream_error")
                       ) from None
        elif dest.ip is not None:
            addr, port = dest.ip, dest.port
        else:
            raise Refusal(403, "not-allowed", "no destination")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                str(addr), port, ssl=self.ctx.upstream_tls if dest.tls else None,
                server_hostname=server_name if dest.tls else None), CONNECT_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise Refusal(502, "upstream-unreachable",
                          f"cannot connect to {dest.host}:{dest.port}: {exc or 'timeout'}",
                          kind="upstream_error") from None
        self._up = _Upstream(key, TcpStream(reader, writer), h11.Connection(h11.CLIENT))
        return self._up

    async def _relay_response(self, up: _Upstream, dest: Destination, method: str,
                              rewriter: RequestRewriter) -> bool:
        secrets = self.ctx.secrets
        while True:
            event = await self._upstream_event(up)
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    await self._switch(up, event, rewriter)
                    return False
                continue  # 1xx other than 101: the gateway already answered any Expect
            await self._drop_upstream()
            raise Refusal(502, "upstream-unreachable", "upstream closed without a response",
                          kind="upstream_error")
        status = event.status_code
        has_body = method != "HEAD" and status not in (204, 304)
        decode = self._decoder(event, dest) if has_body else None
        headers = []
        for name, value in event.headers:
            if (name in _HOP_BY_HOP or (decode is not None and name == b"content-encoding")
                    # redaction may change the length: let h11 frame the body anew
                    or (has_body and secrets and name in (b"content-length",
                                                          b"transfer-encoding"))):
                continue
            headers.append((name, secrets.redact(value)))
        await self._to_client(h11.Response(status_code=event.status_code, headers=headers,
                                           reason=secrets.redact(event.reason)))
        redactor = secrets.redactor()
        sent = 0
        while True:
            event = await self._upstream_event(up)
            if isinstance(event, h11.Data):
                out = redactor.feed(decode(event.data) if decode else event.data)
            elif isinstance(event, h11.EndOfMessage):
                out = redactor.finish()
            else:
                await self._drop_upstream()
                return False  # upstream died mid-body: the client sees the connection end
            if out:
                sent += len(out)
                await self._to_client(h11.Data(data=out))
            if isinstance(event, h11.EndOfMessage):
                await self._to_client(h11.EndOfMessage(
                    headers=[(n, secrets.redact(v)) for n, v in event.headers]))
                break
        self._audit("allowed", status=status, bytes=sent)
        if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
            up.conn.start_next_cycle()
        else:
            await self._drop_upstream()
        return True

    def _decoder(self, resp: h11.Response, dest: Destination) -> Callable[[bytes], bytes] | None:
        """Undo gzip/deflate on answers from a host a secret is bound to (it may echo the
        value; redaction needs plain bytes). It was asked for identity, so this is rare."""
        if not self.ctx.secrets.binds(dest.name, dest.port):
            return None
        encoding = b",".join(v for n, v in resp.headers if n == b"content-encoding").strip()
        if encoding in (b"", b"identity"):
            return None
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            inflater = zlib.decompressobj(wbits=47)  # 47: a zlib or a gzip header

            def decode(data: bytes) -> bytes:
                try:
                    return inflater.decompress(data)
                except zlib.error as exc:
                    raise ConnectionError(f"bad {encoding!r} body from upstream") from exc
            return decode
        raise Refusal(502, "unsupported-encoding",
                      f"{dest.host} answered with content-encoding "
                      f"{encoding.decode('latin-1')!r}, which the gateway cannot inspect",
                      kind="upstream_error")

    async def _switch(self, up: _Upstream, info: h11.InformationalResponse,
                      rewriter: RequestRewriter) -> None:
        """After a 101: relay WebSocket frames both ways, still substituting and redacting."""
        secrets = self.ctx.secrets
        audited = len(rewriter.events)
        await self._to_client(h11.InformationalResponse(
            status_code=101, headers=[(n, secrets.redact(v)) for n, v in info.headers],
            reason=secrets.redact(info.reason)))
        self._audit("allowed", status=101)
        self._up = None  # the relay owns the upstream now
        to_up = FrameRewriter(lambda payload: rewriter.rewrite(payload, "body"))
        to_client = FrameRewriter(secrets.redact)
        pipes = [
            asyncio.create_task(_pipe(self.client, up.stream, to_up.feed,
                                      self.conn.trailing_data[0])),
            asyncio.create_task(_pipe(up.stream, self.client, to_client.feed,
                                      up.conn.trailing_data[0])),
        ]
        try:
            done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            await up.stream.close()
        for e in rewriter.events[audited:]:
            self._audit(e.kind, secret=e.secret, where="websocket", reason=e.reason or None)
        for task in done:
            exc = task.exception()
            if isinstance(exc, SecretBlocked):
                self._audit(exc.kind, secret=exc.secret, where="websocket", reason=exc.reason)
            elif isinstance(exc, FrameError):
                self._audit("blocked", reason=str(exc))
            elif exc is not None and not isinstance(exc, (OSError, ssl.SSLError)):
                raise exc

    async def _tunnel(self, req: h11.Request) -> None:
        """Explicit proxy CONNECT: check, answer 200, then serve the tunnel as if the sandbox
        had connected to that destination directly."""
        host, port = split_host_port(req.target.decode("latin-1"), None)
        if port is None:
            raise Refusal(400, "bad-request", "CONNECT needs host:port")
        dest = Destination.parse(host, port)
        self._fields = {"host": dest.host, "port": port, "method": "CONNECT"}
        self._check_policy(dest)
        if self.on_connect is None:
            raise Refusal(403, "not-allowed", "nested CONNECT is not supported")
        await self._to_client(h11.Response(status_code=200, headers=[],
                                           reason=b"Connection established"))
        self.client.unread(self.conn.trailing_data[0])
        await self.on_connect(self.client, dest)


async def _pipe(src: Stream, dst: Stream, transform: Callable[[bytes], bytes],
                first: bytes) -> None:
    data = first
    while True:
        if data:
            out = transform(data)
            if out:
                await dst.send(out)
        data = await src.recv()
        if not data:
            return


def _has_token(headers: Sequence[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    return any(token in (t.strip().lower() for t in v.split(b","))
               for n, v in headers if n == name)


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


def _secret_refusal(b: SecretBlocked) -> Refusal:
    code = "secret-exfil" if b.kind == "secret_exfil_blocked" else "secret-blocked"
    return Refusal(403, code, b.reason, kind=b.kind, secret=b.secret, where=b.where)
