"""HTTP/2 towards the sandbox (ALPN h2); HTTP/1.1 towards upstreams.

Each h2 stream is served by the same `HttpSession` that serves an HTTP/1.1 connection: the
stream's request is written as HTTP/1.1 onto an in-memory pipe (`StreamPipe`), and the
session's HTTP/1.1 answer is parsed back into h2 frames. So every request hook — policy,
Host (here `:authority`) against the destination, substitution, exfil blocking, redaction,
audit — is one code path for both protocols, and a refusal ends only its own stream. The
upstream connections are HTTP/1.1; streams hand idle ones to each other (`UpstreamPool`).

Flow control: a stream's receive window reopens only as its session consumes the body, and
the connection window covers every stream's window at once, so a stalled stream cannot hold
up the others. Response DATA waits for the client's stream and connection windows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from sealbox.egress.context import SandboxContext
from sealbox.egress.http import (
    CONNECTION_ERRORS,
    IDLE_TIMEOUT,
    Destination,
    HttpSession,
    Refusal,
    UpstreamPool,
)
from sealbox.egress.streams import Stream

MAX_STREAMS = 100
STREAM_WINDOW = 256 << 10
DEFAULT_WINDOW = 65535  # RFC 9113 6.9.2: every window starts here
# Connection-specific fields are not allowed in h2 (RFC 9113 8.2.2).
_CONNECTION_SPECIFIC = {b"connection", b"keep-alive", b"proxy-connection",
                        b"transfer-encoding", b"upgrade"}
Headers = Sequence[tuple[bytes, bytes]]


def h1_request(headers: Headers, has_body: bool) -> h11.Request:
    """The HTTP/1.1 form of an h2 request's header block."""
    pseudo = {n: v for n, v in headers if n.startswith(b":")}
    fields = [(n, v) for n, v in headers if not n.startswith(b":") and n not in
              (b"host", b"cookie")]
    # :authority and any Host field become Host fields: equal ones collapse, differing ones
    # stay two, and the session refuses a request with two Hosts like any other mismatch.
    authority = [pseudo[b":authority"]] if b":authority" in pseudo else []
    hosts = dict.fromkeys(authority + [v for n, v in headers if n == b"host"])
    fields[:0] = [(b"host", h) for h in hosts]
    cookies = [v for n, v in headers if n == b"cookie"]
    if cookies:  # h2 may split the cookie field; HTTP/1.1 wants one (RFC 9113 8.2.3)
        fields.append((b"cookie", b"; ".join(cookies)))
    if has_body and not any(n == b"content-length" for n, _ in fields):
        fields.append((b"transfer-encoding", b"chunked"))
    # A CONNECT has no :path; the session refuses it (no tunnels on a terminated connection).
    target = pseudo.get(b":path") or pseudo.get(b":authority", b"*")
    return h11.Request(method=pseudo[b":method"], target=target, headers=fields)


class StreamPipe(Stream):
    """One h2 stream as an HTTP/1.1 connection for `HttpSession`. The h11 client that writes
    the request also parses the session's answer, so it knows e.g. that a HEAD has no body."""

    def __init__(self, session: H2Session, stream_id: int, headers: Headers,
                 has_body: bool) -> None:
        super().__init__()
        self.session = session
        self.stream_id = stream_id
        self.h1 = h11.Connection(h11.CLIENT)
        self.chunked = has_body and not any(n == b"content-length" for n, _ in headers)
        self.inbox: asyncio.Queue[tuple[h11.Data | h11.EndOfMessage, int]] = asyncio.Queue()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.request_ended = False
        self.request = h1_request(headers, has_body)

    # ----- fed by the connection's reader ------------------------------------------------
    def data(self, data: bytes, flow: int) -> None:
        self.inbox.put_nowait((h11.Data(data=data), flow))

    def end(self) -> None:
        self.request_ended = True
        # Trailers only exist in HTTP/1.1 with chunked framing; with a Content-Length they
        # are dropped.
        self.inbox.put_nowait((h11.EndOfMessage(headers=self.trailers if self.chunked else []),
                               0))

    # ----- the session's side ------------------------------------------------------------
    def start(self) -> None:
        self.unread(self.h1.send(self.request) or b"")

    async def _recv(self) -> bytes:
        # One request per stream: once it is written (or answered) the "connection" ends.
        while self.h1.our_state is h11.SEND_BODY and self.h1.their_state is not h11.DONE:
            event, flow = await self.inbox.get()
            data = self.h1.send(event)
            if flow:
                await self.session.consumed(self.stream_id, flow)
            if data:
                return data
        return b""

    async def send(self, data: bytes) -> None:
        self.h1.receive_data(data)
        while True:
            event = self.h1.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            await self.session.respond(self.stream_id, event)

    async def close(self) -> None:
        """End the h2 stream: reset it if the answer is incomplete; if the client is still
        sending a request that has been answered, tell it to stop (RFC 9113 8.1)."""
        if self.h1.their_state is not h11.DONE:
            self.session.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)
        elif not self.request_ended:
            self.session.reset(self.stream_id, ErrorCodes.NO_ERROR)
        await self.session.flush()


class H2Session:
    """Serve one h2 client connection (TLS already terminated) to DEST. REFUSAL, if given,
    answers every stream, as `HttpSession` does for every request."""

    def __init__(self, client: Stream, ctx: SandboxContext, dest: Destination, *,
                 refusal: Refusal | None = None) -> None:
        self.client = client
        self.ctx = ctx
        self.dest = dest
        self.refusal = refusal
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        self._pipes: dict[int, StreamPipe] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()
        self._window_opened = asyncio.Event()
        self._upstreams = UpstreamPool()

    async def flush(self) -> None:
        async with self._send_lock:  # one writer at a time keeps frames in h2's order
            data = self.conn.data_to_send()
            if data:
                await self.client.send(data)

    async def consumed(self, stream_id: int, flow: int) -> None:
        """FLOW bytes of a stream's body are used up: let the client send more (now: it may
        be waiting for just this WINDOW_UPDATE, with nothing else to send us)."""
        self.conn.acknowledge_received_data(flow, stream_id)
        await self.flush()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.conn.reset_stream(stream_id, code)

    async def respond(self, stream_id: int, event: object) -> None:
        """Send one event of the session's HTTP/1.1 answer as h2 frames."""
        if isinstance(event, (h11.InformationalResponse, h11.Response)):
            self.conn.send_headers(stream_id, [(b":status", str(event.status_code).encode())] + [
                (n, v) for n, v in event.headers if n not in _CONNECTION_SPECIFIC])
        elif isinstance(event, h11.Data):
            await self._send_data(stream_id, event.data)
        elif isinstance(event, h11.EndOfMessage):
            if event.headers:
                self.conn.send_headers(stream_id, list(event.headers), end_stream=True)
            else:
                self.conn.end_stream(stream_id)
        await self.flush()

    async def _send_data(self, stream_id: int, data: bytes) -> None:
        while data:
            size = min(len(data), self.conn.local_flow_control_window(stream_id),
                       self.conn.max_outbound_frame_size)
            if size <= 0:
                await self._window_opened.wait()
                continue
            self.conn.send_data(stream_id, data[:size])
            data = data[size:]
            await self.flush()

    async def run(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                                   SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        self.conn.increment_flow_control_window(MAX_STREAMS * STREAM_WINDOW - DEFAULT_WINDOW)
        try:
            await self.flush()
            while True:
                # Idle only counts when no stream is open: a long download is not idleness.
                data = await asyncio.wait_for(self.client.recv(),
                                              None if self._tasks else IDLE_TIMEOUT)
                if not data:
                    return
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    await self.flush()  # the GOAWAY h2 queued
                    return
                for event in events:
                    if isinstance(event, h2.events.ConnectionTerminated):
                        return
                    self._dispatch(event)
                await self.flush()
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._upstreams.close()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
            sid = event.stream_id
            pipe = StreamPipe(self, sid, event.headers or [], has_body=event.stream_ended is None)
            self._pipes[sid] = pipe
            self._tasks[sid] = asyncio.create_task(self._serve_stream(pipe))
        elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
            pipe_or_none = self._pipes.get(event.stream_id)
            flow = event.flow_controlled_length or 0
            if pipe_or_none is not None and event.data:
                pipe_or_none.data(event.data, flow)
            elif flow:  # padding only, or a stream already answered: nothing will read it
                # (the reader flushes after every batch of events)
                self.conn.acknowledge_received_data(flow, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and event.stream_id in self._pipes:
            self._pipes[event.stream_id].trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self._pipes:
            self._pipes[event.stream_id].end()
        elif isinstance(event, h2.events.StreamReset) and event.stream_id in self._tasks:
            self._tasks[event.stream_id].cancel()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            # Wake every sender waiting for a window; each re-checks its own.
            self._window_opened.set()
            self._window_opened = asyncio.Event()

    async def _serve_stream(self, pipe: StreamPipe) -> None:
        try:
            pipe.start()
            await HttpSession(pipe, self.ctx, self.dest, refusal=self.refusal,
                              pool=self._upstreams).run()
        except (*CONNECTION_ERRORS, h2.exceptions.ProtocolError) as exc:
            self.ctx.audit.record("connection_error", host=self.dest.host, port=self.dest.port,
                                  reason=type(exc).__name__)
        finally:
            del self._pipes[pipe.stream_id], self._tasks[pipe.stream_id]
            with contextlib.suppress(*CONNECTION_ERRORS):  # the client may be gone already
                await pipe.close()
