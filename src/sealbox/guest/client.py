"""Host side of the guest channel: one `GuestClient` per connection, many operations over it.

The wire protocol is documented in `sealbox.guest.protocol`. Guest errors become `sealbox.errors`
here, at this one boundary: ``not_found`` → `NotFoundError`, ``io`` → `SandboxError`, any other
code → `ConfigError` (the guest's code in ``details["reason"]``), and a channel that closes
mid-operation → `SandboxGone`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sealbox.errors import ConfigError, NotFoundError, SandboxError, SandboxGone, SealboxError
from sealbox.guest import protocol

log = logging.getLogger(__name__)

GONE = "the sandbox is no longer running"
_Event = tuple[dict[str, Any], bytes]
_T = TypeVar("_T")
_STREAMS = ("stdout", "stderr", "pty", "data")


@dataclass(frozen=True)
class ExitStatus:
    code: int | None
    signal: int | None
    timed_out: bool = False
    limit: str | None = None
    """A limit the guest saw bite during the command (``pids``: a fork was refused)."""

    @property
    def exit_code(self) -> int:
        """The shell convention: the code, or 128 + the signal that killed the process."""
        if self.code is not None:
            return self.code
        return 128 + (self.signal or 0)


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout", "stderr" or "pty"
    data: bytes


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str
    type: str  # "file", "dir", "symlink" or "other"
    size: int
    mode: int
    mtime: float


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    argv: list[str]
    running: bool
    exit_code: int | None


def _guest_error(header: dict[str, Any]) -> SealboxError:
    code = str(header.get("code"))
    message = str(header.get("message") or f"guest error {code}")
    if code == "not_found":
        return NotFoundError(message)
    if code == "io":
        return SandboxError(message)
    return ConfigError(message, reason=code)


def _parse(build: Callable[..., _T], *args: Any) -> _T:
    """Code in the sandbox can replace the agent: its replies are checked, not trusted."""
    try:
        return build(*args)
    except (KeyError, TypeError, ValueError) as exc:
        raise SandboxError(f"malformed reply from the guest agent: {exc!r}") from None


def _exit_status(header: dict[str, Any]) -> ExitStatus:
    code, sig = header.get("code"), header.get("signal")
    return ExitStatus(code=None if code is None else int(code),
                      signal=None if sig is None else int(sig),
                      timed_out=bool(header.get("timed_out")),
                      limit="pids" if header.get("limit") == "pids" else None)


def _file_info(entry: dict[str, Any]) -> FileInfo:
    return FileInfo(name=str(entry["name"]), path=str(entry["path"]), type=str(entry["type"]),
                    size=int(entry["size"]), mode=int(entry["mode"]), mtime=float(entry["mtime"]))


class _Op:
    """One operation's inbox (None: the channel closed) and its send window."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[_Event | None] = asyncio.Queue()
        self.window = protocol.Window()
        self.unread = 0  # streamed bytes queued here: the guest may not exceed the window


class GuestClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ops: dict[int, _Op] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._reading = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], timeout: float = 10.0
                           ) -> GuestClient:
        """Connect, retrying until the agent answers a ping (it may still be starting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer"
        while True:
            remaining = max(deadline - loop.time(), 0.01)
            client = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(os.fspath(path)), remaining)
                client = await cls.from_streams(reader, writer)
                await asyncio.wait_for(client.ping(), remaining)
                return client
            except (OSError, SandboxError) as exc:  # TimeoutError is an OSError
                last = str(exc) or type(exc).__name__
                if client is not None:
                    await client.close()
            except BaseException:
                # Cancelled (a warm-pool boot stopped): close what was opened, without awaiting.
                if client is not None:
                    client.abort()
                raise
            if loop.time() >= deadline:
                raise SandboxError(f"the guest agent at {os.fspath(path)} did not answer within "
                                   f"{timeout:g}s ({last})")
            await asyncio.sleep(0.05)

    @classmethod
    async def from_streams(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                           ) -> GuestClient:
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed

    def abort(self) -> None:
        """Close at once, without waiting (for a caller that is being cancelled)."""
        if not self._closed:
            self._closed = True
            self._writer.close()
        self._reading.cancel()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)

    # ----- plumbing -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while (frame := await protocol.read_frame(self._reader)) is not None:
                header, data = frame
                mid, ev = header.get("id"), header.get("ev")
                if not isinstance(mid, int) or not isinstance(ev, str):
                    raise protocol.ProtocolError("event without an integer id and a string ev")
                op = self._ops.get(mid)
                if ev == "credit":
                    credit = header.get("bytes")
                    if not isinstance(credit, int) or credit < 0:
                        raise protocol.ProtocolError("credit without a byte count")
                    if op is not None:
                        op.window.give(credit)
                elif ev == "error" and (op is None or header.get("final") is False):
                    log.warning("guest agent: %s", header.get("message"))
                elif op is not None:
                    if ev in _STREAMS:
                        op.unread += len(data)
                        if op.unread > protocol.WINDOW + protocol.CHUNK:
                            raise protocol.ProtocolError("the guest ignored flow control")
                    if ev in ("ok", "exit", "end", "error"):
                        op.window.close()  # nothing more may be sent for a finished operation
                    op.events.put_nowait((header, data))
        except (protocol.ProtocolError, ConnectionError) as exc:
            log.warning("guest channel failed: %s", exc)
        finally:
            self._closed = True
            self._writer.close()
            for op in self._ops.values():
                op.window.close()
                op.events.put_nowait(None)

    def _open(self) -> tuple[int, _Op]:
        if self._closed:
            raise SandboxGone(GONE)
        mid = next(self._ids)
        op = self._ops[mid] = _Op()
        return mid, op

    async def _send(self, header: dict[str, Any], data: bytes = b"") -> None:
        if self._closed:
            raise SandboxGone(GONE)
        self._writer.write(protocol.encode(header, data))
        try:
            await self._writer.drain()
        except ConnectionError:
            raise SandboxGone(GONE) from None

    def _post(self, header: dict[str, Any]) -> None:
        """A small control frame (credit, cancel) that needs no waiting; dropped once closed."""
        if not self._closed:
            self._writer.write(protocol.encode(header))

    def _credit(self, mid: int, op: _Op, n: int) -> None:
        """The consumer took ``n`` streamed bytes: the guest may send that many more."""
        op.unread -= n
        self._post({"op": "credit", "id": mid, "bytes": n})

    async def _next(self, op: _Op) -> _Event:
        event = await op.events.get()
        if event is None:
            raise SandboxGone(GONE)
        if event[0].get("ev") == "error":
            raise _guest_error(event[0])
        return event

    async def _request(self, header: dict[str, Any]) -> dict[str, Any]:
        mid, op = self._open()
        try:
            await self._send({**header, "id": mid})
            return (await self._next(op))[0]
        finally:
            del self._ops[mid]

    # ----- processes ------------------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        return await self._request({"op": "ping"})

    async def exec(self, argv: list[str] | None = None, *, shell: str | None = None,
                   env: dict[str, str] | None = None, cwd: str | None = None,
                   timeout: float | None = None, pty: tuple[int, int] | None = None,
                   background: bool = False, stdin: bool = False) -> ExecHandle:
        """Start a command; output streams through the returned handle.

        ``pty`` is (rows, cols); under a pty stdout and stderr are one ``pty`` stream and stdin
        is always open. ``timeout`` kills the command's whole process group.
        """
        if (argv is None) == (shell is None):
            raise ConfigError("exec needs either argv or shell (not both)")
        header: dict[str, Any] = {"op": "exec", "env": env, "cwd": cwd, "timeout": timeout,
                                  "background": background, "stdin": stdin}
        header.update({"argv": argv} if argv is not None else {"shell": shell})
        if pty is not None:
            header["pty"] = {"rows": pty[0], "cols": pty[1]}
        mid, op = self._open()
        try:
            await self._send({**header, "id": mid})
            started = (await self._next(op))[0]
        except BaseException:
            del self._ops[mid]
            raise
        pid = _parse(lambda: int(started["pid"]))
        return ExecHandle(self, mid, op, pid, pty=pty is not None,
                          stdin=stdin or pty is not None)

    async def ps(self) -> list[ProcessInfo]:
        reply = await self._request({"op": "ps"})
        return _parse(lambda: [
            ProcessInfo(pid=int(p["pid"]), argv=[str(a) for a in p["argv"]],
                        running=bool(p["running"]),
                        exit_code=None if p["exit_code"] is None else int(p["exit_code"]))
            for p in reply["processes"]])

    async def kill(self, pid: int, sig: int = 15) -> None:
        """Signal the process group of a process this sandbox's agent started."""
        await self._request({"op": "kill", "pid": pid, "sig": sig})

    async def wait_pid(self, pid: int) -> ExitStatus:
        reply = await self._request({"op": "wait", "pid": pid})
        return _parse(_exit_status, reply)

    # ----- files ----------------------------------------------------------------------------

    async def read_file(self, path: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes in chunks, streamed (relative paths are under /workspace)."""
        mid, op = self._open()
        finished = False
        try:
            await self._send({"op": "read", "id": mid, "path": path})
            while True:
                header, data = await self._next(op)
                if header["ev"] == "end":
                    finished = True
                    return
                self._credit(mid, op, len(data))
                yield data
        finally:
            del self._ops[mid]
            if not finished:  # the caller stopped early (after an error this is a no-op)
                self._post({"op": "cancel", "id": mid})

    async def read_bytes(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read_file(path)])

    async def write_file(self, path: str, data: bytes | AsyncIterable[bytes], *,
                         mode: int = 0o644, mkdirs: bool = True) -> None:
        """Replace ``path`` atomically: a failed write leaves what was there."""
        mid, op = self._open()
        try:
            await self._send({"op": "write", "id": mid, "path": path, "mode": mode,
                              "mkdirs": mkdirs})
            async for chunk in _chunks(data):
                if not await op.window.take(len(chunk)):
                    break  # the guest already answered (an error, read below)
                await self._send({"op": "data", "id": mid}, chunk)
            else:
                await self._send({"op": "end", "id": mid})
            await self._next(op)
        except BaseException:
            self._post({"op": "cancel", "id": mid})
            raise
        finally:
            del self._ops[mid]

    async def list_dir(self, path: str) -> list[FileInfo]:
        mid, op = self._open()
        try:
            await self._send({"op": "list", "id": mid, "path": path})
            entries: list[FileInfo] = []
            while (header := (await self._next(op))[0])["ev"] == "entries":
                entries.extend(_parse(lambda: [_file_info(e) for e in header["entries"]]))
            return entries
        finally:
            del self._ops[mid]

    async def stat(self, path: str) -> FileInfo:
        """Like lstat: a symlink is reported as itself."""
        reply = await self._request({"op": "stat", "path": path})
        return _parse(lambda: _file_info(reply["entry"]))

    async def mkdir(self, path: str, parents: bool = True) -> None:
        await self._request({"op": "mkdir", "path": path, "parents": parents})

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._request({"op": "remove", "path": path, "recursive": recursive})

    async def rename(self, src: str, dst: str) -> None:
        await self._request({"op": "rename", "src": src, "dst": dst})


async def _chunks(data: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    pieces: AsyncIterable[bytes] = _single(data) if isinstance(data, bytes) else data
    async for piece in pieces:
        for start in range(0, len(piece), protocol.CHUNK):
            yield piece[start:start + protocol.CHUNK]


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


class ExecHandle:
    """A running command. Iterate it for `Output` chunks as they come; the last item is its
    `ExitStatus`. Output not consumed holds back only this command (flow control)."""

    def __init__(self, client: GuestClient, mid: int, op: _Op, pid: int, *, pty: bool,
                 stdin: bool) -> None:
        self.pid = pid
        self._client = client
        self._mid = mid
        self._op = op
        self._pty = pty
        self._stdin = stdin
        self._status: ExitStatus | None = None

    def __aiter__(self) -> AsyncIterator[Output | ExitStatus]:
        return self._events()

    async def _events(self) -> AsyncIterator[Output | ExitStatus]:
        while not isinstance(item := await self._next_item(), ExitStatus):
            yield item
        yield item

    async def _next_item(self) -> Output | ExitStatus:
        """The next output chunk, or the exit status (again, once the command has ended)."""
        while self._status is None:
            try:
                header, data = await self._client._next(self._op)
            except BaseException:
                self._client._ops.pop(self._mid, None)
                raise
            ev = header["ev"]
            if ev == "exit":
                self._status = _parse(_exit_status, header)
                self._client._ops.pop(self._mid, None)
            elif ev in ("stdout", "stderr", "pty"):
                self._client._credit(self._mid, self._op, len(data))
                return Output(ev, data)
        return self._status

    async def write_stdin(self, data: bytes) -> None:
        """Send input; data for a command that has already ended is dropped."""
        if not self._stdin:
            raise ConfigError("this command was started without stdin=True")
        for start in range(0, len(data), protocol.CHUNK):
            chunk = data[start:start + protocol.CHUNK]
            if not await self._op.window.take(len(chunk)):
                return
            await self._client._send({"op": "stdin", "id": self._mid}, chunk)

    async def close_stdin(self) -> None:
        """End of input (under a pty: ^D)."""
        if self._status is None and not self._op.window.closed:
            await self._client._send({"op": "stdin_close", "id": self._mid})

    async def signal(self, sig: int) -> None:
        """Signal the command's process group."""
        if self._status is None and not self._op.window.closed:
            await self._client._send({"op": "signal", "id": self._mid, "sig": sig})

    async def resize(self, rows: int, cols: int) -> None:
        if not self._pty:
            raise ConfigError("resize needs a command started with a pty")
        if self._status is None and not self._op.window.closed:
            await self._client._send({"op": "resize", "id": self._mid, "rows": rows,
                                      "cols": cols})

    async def wait(self) -> ExitStatus:
        """Wait for the exit, discarding output not yet consumed."""
        while not isinstance(item := await self._next_item(), ExitStatus):
            pass
        return item

    async def collect(self) -> tuple[bytes, bytes, ExitStatus]:
        """(stdout, stderr, exit); under a pty all output is in stdout."""
        out: list[bytes] = []
        err: list[bytes] = []
        while not isinstance(item := await self._next_item(), ExitStatus):
            (err if item.stream == "stderr" else out).append(item.data)
        return b"".join(out), b"".join(err), item
