"""The guest channel's wire format: framing, limits and flow control (standard library only).

This file is shared verbatim by the host client and the in-sandbox agent (which imports it as a
sibling module from ``/.sealbox/``), so it must not import anything outside the standard library.

Frame
-----
``struct.pack(">II", len(header), len(data))``, then ``header`` (a UTF-8 JSON object), then
``data`` (raw bytes, often empty). A header over `MAX_HEADER` or data over `MAX_DATA` is a
protocol violation: the receiver reports it and disconnects.

Every header has an integer ``"id"`` (>= 1) chosen by the host per operation. Host → guest headers
have ``"op"``; guest → host headers have ``"ev"``. Many operations run concurrently over one stream.

Flow control
------------
Each stream of bytes (exec output and file reads guest → host; stdin and file writes host → guest)
is credit-based: the sender may have `WINDOW` bytes unacknowledged per operation and the receiver
returns credit as its consumer takes the data (``credit`` op or event, ``{"id", "bytes"}``). One slow
reader therefore never stalls the other operations on the stream.

Operations (host → guest) and their events (guest → host)
---------------------------------------------------------
Every operation ends with exactly one terminal event: ``ok``, ``exit``, ``end`` or ``error``
(``{"code": one of ERROR_CODES, "message"}``).

``ping``                         → ``ok {version, python, pid}``
``exec {argv | shell, env?, cwd?, timeout?, pty?: {rows, cols}, background?, stdin?}``
    ``argv`` is a list of strings; ``shell`` runs under ``/bin/sh -c``. ``env`` is merged over the
    agent's environment. ``cwd`` defaults to the workspace and must exist. ``timeout`` (seconds)
    kills the whole process group. With ``pty`` stdout and stderr are one ``pty`` stream.
    Without ``stdin: true`` the process reads /dev/null. A foreground process is killed when its
    connection closes; a ``background`` one keeps running (its output is then discarded).
    → ``started {pid}``, ``stdout``/``stderr``/``pty`` (data), ``exit {code, signal, timed_out}``
    Follow-ups with the same id: ``stdin`` (data), ``stdin_close``, ``signal {sig}`` (to the
    process group), ``resize {rows, cols}`` (pty only), ``credit {bytes}``.
``ps``                           → ``ok {processes: [{pid, argv, running, exit_code}]}``
``kill {pid, sig?}``             → ``ok`` (only processes the agent started; to the process group)
``wait {pid}``                   → ``exit {code, signal, timed_out}``
``read {path}``                  → ``data`` (data, `CHUNK` bytes at most) ..., ``end {size}``
``write {path, mode?, mkdirs?}`` then host ``data`` (data) ..., ``end``  → ``credit`` ..., ``ok``
    Written to a temporary file in the same directory and renamed over ``path`` at ``end``: an
    aborted write (``cancel``, error, disconnect) leaves what was there untouched.
``list {path}``                  → ``entries {entries: [FILE]}`` ..., ``end``
``stat {path}``                  → ``ok {entry: FILE}``
``mkdir {path, parents?}``       → ``ok``
``remove {path, recursive?}``    → ``ok``
``rename {src, dst}``            → ``ok``
``cancel``                       abandons a ``read`` or ``write`` (no further events)

FILE is ``{name, path, type: file|dir|symlink|other, size, mode, mtime}`` (``lstat``: symlinks are
not followed). Relative paths are relative to the workspace (``/workspace``).

An error with ``"id": 0`` concerns the connection itself (e.g. a header without an id).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

VERSION = 1
HEADER = struct.Struct(">II")
MAX_HEADER = 1 << 20
MAX_DATA = 4 << 20
CHUNK = 64 << 10
WINDOW = 1 << 20

ERROR_CODES = ("not_found", "exists", "invalid", "permission", "is_directory", "not_directory",
               "io")


class ProtocolError(Exception):
    """The peer broke the framing rules; the connection cannot continue."""


def encode(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER or len(data) > MAX_DATA:
        raise ProtocolError(f"frame too large: header {len(raw)} bytes, data {len(data)} bytes")
    return HEADER.pack(len(raw), len(data)) + raw + data


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """The next frame, or None at a clean end of stream (between frames)."""
    try:
        prefix = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame") from None
        return None
    hlen, dlen = HEADER.unpack(prefix)
    if hlen > MAX_HEADER or dlen > MAX_DATA:
        raise ProtocolError(f"frame too large: header {hlen} bytes (max {MAX_HEADER}), "
                            f"data {dlen} bytes (max {MAX_DATA})")
    try:
        raw = await reader.readexactly(hlen)
        data = await reader.readexactly(dlen)
    except asyncio.IncompleteReadError:
        raise ProtocolError("stream ended inside a frame") from None
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    return header, data


class Window:
    """Send credit for one operation's byte stream (see "Flow control")."""

    def __init__(self, size: int = WINDOW) -> None:
        self._credit = size
        self._ready = asyncio.Event()
        self._ready.set()
        self.closed = False

    def give(self, n: int) -> None:
        self._credit += n
        if self._credit > 0:
            self._ready.set()

    def close(self) -> None:
        """No more credit will come: wake senders and let them stop (or discard)."""
        self.closed = True
        self._ready.set()

    async def take(self, n: int) -> bool:
        """Wait for credit and spend ``n`` bytes of it; False once the window is closed."""
        while self._credit <= 0 and not self.closed:
            self._ready.clear()
            await self._ready.wait()
        if self.closed:
            return False
        self._credit -= n
        return True
