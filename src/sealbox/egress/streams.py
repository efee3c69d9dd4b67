"""Byte streams the proxy relays between: TCP, and TLS over any stream.

TLS towards the sandbox runs on an ``ssl.SSLObject`` over memory BIOs rather than asyncio's
``start_tls``, because the gateway reads the ClientHello (to learn SNI) before choosing a
certificate: those bytes are handed back with `Stream.unread` and fed to the handshake.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from typing import TypeVar

CHUNK = 65536
T = TypeVar("T")


class Stream:
    """recv() returns b"" at end of stream; unread() pushes bytes back for the next recv()."""

    def __init__(self) -> None:
        self._pending = b""

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending

    async def recv(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return await self._recv()

    async def _recv(self) -> bytes:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class TcpStream(Stream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer

    async def _recv(self) -> bytes:
        try:
            return await self.reader.read(CHUNK)
        except (ConnectionError, ssl.SSLError):
            return b""

    async def send(self, data: bytes) -> None:
        # write() is synchronous, so concurrent senders keep their order.
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


class TlsStream(Stream):
    """The server side of TLS over INNER (whose pending bytes start the handshake)."""

    def __init__(self, inner: Stream, context: ssl.SSLContext) -> None:
        super().__init__()
        self._inner = inner
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)

    @classmethod
    async def accept(cls, inner: Stream, context: ssl.SSLContext) -> TlsStream:
        stream = cls(inner, context)
        await stream._io(stream._obj.do_handshake)
        return stream

    @property
    def alpn(self) -> str | None:
        """The application protocol the client and the gateway agreed on, if any."""
        return self._obj.selected_alpn_protocol()

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self._inner.send(data)

    async def _io(self, op: Callable[[], T]) -> T:
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._inner.recv()
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()
                continue
            await self._flush()
            return result

    async def _recv(self) -> bytes:
        try:
            return await self._io(lambda: self._obj.read(CHUNK))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = await self._io(functools.partial(self._obj.write, view))
            view = view[written:]

    async def close(self) -> None:
        try:
            self._obj.unwrap()  # queue close_notify
        except ssl.SSLError:
            pass
        try:
            await self._flush()
        except ConnectionError:
            pass
        await self._inner.close()
