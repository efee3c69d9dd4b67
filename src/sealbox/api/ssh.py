"""The SSH gateway: ``ssh SANDBOX_ID@HOST -p PORT`` lands inside that sandbox.

The username is the sandbox id. A client authenticates with a public key its tenant registered
(``POST /v1/ssh-keys``; an admin's keys open every sandbox) or with a short-lived token from
``POST /v1/sandboxes/ID/ssh-token`` as the password. Another tenant's sandbox, an unknown id and
a wrong key all fail the same way.

What a session can do, each mapped onto the engine, never onto the host:

* a shell (with a PTY and window resizes) or ``ssh host CMD`` with its exit status — guest exec;
* SFTP and scp — an `SFTPServer` whose every operation is a guest file operation (the asyncssh
  default implementation, which would touch the host's files, is overridden in full);
* ``-L`` local forwarding — a host-initiated TCP connection to the sandbox's own address;
  ``localhost`` means the sandbox; any other destination is refused. ``-R``, agent and X11
  forwarding are refused.

A connection closes when its sandbox ends. The host key is made once, in
``DATA_DIR/ssh_host_ed25519_key`` (mode 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import posixpath
import secrets
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import asyncssh

from sealbox.engine.engine import Engine
from sealbox.engine.spec import SandboxState
from sealbox.errors import (
    ConfigError,
    NotFoundError,
    SandboxGone,
    SealboxError,
)
from sealbox.guest.client import ExecHandle, ExitStatus, FileInfo, GuestClient

log = logging.getLogger("sealbox.ssh")

HOST_KEY_FILE = "ssh_host_ed25519_key"
KEYS_DB = "ssh_keys.db"
TOKEN_TTL = 600.0
MAX_TOKEN_TTL = 3600.0
WATCH_INTERVAL = 1.0
DEFAULT_SHELL = ["/bin/bash", "-l"]
HOME = "/workspace"
_LIVE = (SandboxState.running, SandboxState.paused, SandboxState.creating)
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "ip6-localhost"})
_PASS_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "COLORTERM")


# ----- keys and tokens ------------------------------------------------------------------------

@dataclass(frozen=True)
class SshKey:
    fingerprint: str
    algorithm: str
    comment: str
    public_key: str
    created_at: float


def parse_public_key(text: str) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"public_key is not an OpenSSH public key: {exc}") from None


class SshKeyStore:
    """Tenants' public keys (public material, so stored as is) in ``DATA_DIR/ssh_keys.db``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS ssh_keys (tenant TEXT NOT NULL, admin INTEGER NOT NULL,"
            " fingerprint TEXT NOT NULL, algorithm TEXT NOT NULL, comment TEXT NOT NULL,"
            " public_key TEXT NOT NULL, created_at REAL NOT NULL,"
            " PRIMARY KEY (tenant, fingerprint))")
        os.chmod(path, 0o600)

    def add(self, tenant: str, admin: bool, public_key: str) -> SshKey:
        key = parse_public_key(public_key)
        comment = (key.get_comment() or "")[:200]
        key.set_comment(None)
        entry = SshKey(fingerprint=key.get_fingerprint("sha256"), algorithm=key.get_algorithm(),
                       comment=comment, public_key=key.export_public_key().decode().strip(),
                       created_at=time.time())
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO ssh_keys VALUES (?,?,?,?,?,?,?)",
                (tenant, int(admin), entry.fingerprint, entry.algorithm, entry.comment,
                 entry.public_key, entry.created_at))
        return entry

    def list(self, tenant: str) -> list[SshKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT fingerprint, algorithm, comment, public_key, created_at FROM ssh_keys"
                " WHERE tenant=? ORDER BY created_at", (tenant,)).fetchall()
        return [SshKey(*row) for row in rows]

    def remove(self, tenant: str, fingerprint: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM ssh_keys WHERE tenant=? AND fingerprint=?",
                                   (tenant, fingerprint))
        return cur.rowcount > 0

    def may_open(self, owner: str | None, key: asyncssh.SSHKey) -> bool:
        """Whether KEY is registered by OWNER or by an admin."""
        fingerprint = key.get_fingerprint("sha256")
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, admin, public_key FROM ssh_keys WHERE fingerprint=?",
                (fingerprint,)).fetchall()
        mine = key.export_public_key().decode().split()[:2]
        return any((tenant == owner or admin) and stored.split()[:2] == mine
                   for tenant, admin, stored in rows)

    def close(self) -> None:
        self._db.close()


class SshTokens:
    """Short-lived passwords, each for one sandbox, kept as SHA-256 hashes in memory."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, float]] = {}

    def issue(self, sandbox_id: str, ttl: float = TOKEN_TTL) -> tuple[str, float]:
        if not 0 < ttl <= MAX_TOKEN_TTL:
            raise ConfigError(f"ttl must be between 1 and {MAX_TOKEN_TTL:g} seconds")
        now = time.time()
        self._tokens = {h: v for h, v in self._tokens.items() if v[1] > now}
        token = "sbs_" + secrets.token_urlsafe(24)
        expires = now + ttl
        self._tokens[hashlib.sha256(token.encode()).hexdigest()] = (sandbox_id, expires)
        return token, expires

    def check(self, sandbox_id: str, password: str) -> bool:
        digest = hashlib.sha256(password.encode()).hexdigest()
        found = self._tokens.get(digest)
        return (found is not None and hmac.compare_digest(found[0], sandbox_id)
                and found[1] > time.time())


def load_host_key(data_dir: Path) -> asyncssh.SSHKey:
    path = data_dir / HOST_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519")
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    return key


# ----- the gateway ----------------------------------------------------------------------------

class SshGateway:
    def __init__(self, engine: Engine, keys: SshKeyStore, tokens: SshTokens) -> None:
        self.engine = engine
        self.keys = keys
        self.tokens = tokens
        self.port: int | None = None
        self.host: str | None = None
        self.host_key_line: str | None = None
        self._server: asyncssh.SSHAcceptor | None = None
        self._conns: set[_Connection] = set()

    async def start(self, host: str, port: int) -> None:
        host_key = await asyncio.to_thread(load_host_key, self.engine.config.data_dir)
        self._server = await asyncssh.create_server(
            lambda: _Connection(self), host, port, server_host_keys=[host_key],
            process_factory=self._session, sftp_factory=_SandboxSFTP, allow_scp=True,
            encoding=None, line_editor=False, agent_forwarding=False, x11_forwarding=False,
            keepalive_interval=30, login_timeout=30,
        )
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        self.host_key_line = host_key.export_public_key().decode().strip()
        log.info("SSH gateway listening on %s:%s", host, self.port)

    async def close(self) -> None:
        for conn in list(self._conns):
            conn.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # ----- sessions (shell, exec) -------------------------------------------------------

    async def _session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        owner = _owner(process.channel)
        sandbox_id = owner.sandbox_id
        try:
            if process.subsystem is not None:
                raise ConfigError(f"subsystem {process.subsystem!r} is not available")
            handle = await self._start(sandbox_id, process)
        except SealboxError as exc:
            process.stderr.write(f"sealbox: {exc.message}\r\n".encode())
            process.exit(255)
            return
        pump = asyncio.create_task(_stdin_to_guest(process, handle))
        status: ExitStatus | None = None
        try:
            async for item in handle:
                if isinstance(item, ExitStatus):
                    status = item
                    break
                out = process.stderr if item.stream == "stderr" else process.stdout
                out.write(item.data)
                await out.drain()
        except SandboxGone:
            process.stderr.write(f"sealbox: sandbox {sandbox_id} ended\r\n".encode())
        except (ConnectionError, asyncssh.Error):
            with contextlib.suppress(SealboxError):
                await handle.signal(signal.SIGKILL)  # the client hung up: end its processes
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if status is None:
            with contextlib.suppress(SealboxError):
                await handle.signal(signal.SIGKILL)
        with contextlib.suppress(OSError, asyncssh.Error):
            process.exit(status.exit_code if status is not None else 255)

    async def _start(self, sandbox_id: str, process: asyncssh.SSHServerProcess[bytes]
                     ) -> ExecHandle:
        guest = self.engine.guest(sandbox_id)
        term = process.get_terminal_type()
        env = {k: v for k, v in process.env.items() if k in _PASS_ENV}
        pty: tuple[int, int] | None = None
        if term:
            width, height, _, _ = process.get_terminal_size()
            pty = (height if height > 0 else 24, width if width > 0 else 80)
            env["TERM"] = term
        command = process.command
        argv = ["/bin/sh", "-c", command] if command else DEFAULT_SHELL
        # A sandbox from a warm pool gets its secrets' placeholders and env per command.
        env = {**self.engine.sandbox_env(sandbox_id), **env}
        handle = await guest.exec(argv, env=env or None, cwd=HOME, pty=pty, stdin=True)
        self.engine.events.write(sandbox_id, "exec", cmd=command or "(ssh shell)",
                                 pid=handle.pid, via="ssh")
        return handle

    # ----- port forwarding ----------------------------------------------------------------

    def forward(self, sandbox_id: str, dest_host: str, dest_port: int
                ) -> Callable[[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]],
                              Awaitable[None]]:
        try:
            address = self.engine.sandbox_address(sandbox_id)
        except SealboxError as exc:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.message) from None
        host = dest_host.strip("[]").lower()
        if host not in _LOCAL_NAMES and host not in (sandbox_id, address):
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"only the sandbox itself can be reached (localhost:PORT), not {dest_host}")
        if not 0 < dest_port < 65536:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "bad port")

        async def relay(reader: asyncssh.SSHReader[bytes],
                        writer: asyncssh.SSHWriter[bytes]) -> None:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(address, dest_port), 10)
            except (OSError, TimeoutError):
                writer.close()
                return
            try:
                await _pipe_both(reader, writer, up_reader, up_writer)
            finally:
                up_writer.close()
                writer.close()

        return relay

    def live(self, sandbox_id: str) -> bool:
        try:
            return self.engine.get(sandbox_id).state in _LIVE
        except SealboxError:
            return False


async def _pipe_both(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes],
                     up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
    async def client_to_sandbox() -> None:
        while data := await reader.read(65536):
            up_writer.write(data)
            await up_writer.drain()
        if up_writer.can_write_eof():
            up_writer.write_eof()

    async def sandbox_to_client() -> None:
        while data := await up_reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    tasks = [asyncio.create_task(client_to_sandbox()), asyncio.create_task(sandbox_to_client())]
    try:
        # Half-close: each direction ends on its own; an error in either ends both.
        for fut in asyncio.as_completed(tasks):
            try:
                await fut
            except (OSError, asyncssh.Error):
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stdin_to_guest(process: asyncssh.SSHServerProcess[bytes], handle: ExecHandle) -> None:
    while True:
        try:
            data = await process.stdin.read(65536)
        except asyncssh.TerminalSizeChanged as change:
            with contextlib.suppress(ConfigError):
                await handle.resize(max(change.height, 1), max(change.width, 1))
            continue
        except asyncssh.SignalReceived as sig:
            number = getattr(signal, "SIG" + sig.signal.upper(), None)
            if isinstance(number, int):
                await handle.signal(number)
            continue
        except asyncssh.BreakReceived:
            await handle.signal(signal.SIGINT)
            continue
        if not data:
            await handle.close_stdin()
            return
        await handle.write_stdin(data)


class _Connection(asyncssh.SSHServer):
    """One client connection: authentication, and what it may open."""

    def __init__(self, gateway: SshGateway) -> None:
        self.gateway = gateway
        self.sandbox_id = ""
        self._conn: asyncssh.SSHServerConnection | None = None
        self._watch: asyncio.Task[None] | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self.gateway._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway._conns.discard(self)
        if self._watch is not None:
            self._watch.cancel()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def begin_auth(self, username: str) -> bool:
        self.sandbox_id = username
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        try:
            owner = self.gateway.engine.get(username).owner
        except SealboxError:
            return False
        return self.gateway.keys.may_open(owner, key)

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return self.gateway.tokens.check(username, password)

    def auth_completed(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watch_sandbox())

    async def _watch_sandbox(self) -> None:
        """Sessions end when the sandbox ends."""
        while self.gateway.live(self.sandbox_id):
            await asyncio.sleep(WATCH_INTERVAL)
        self.close()

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        return self.gateway.forward(self.sandbox_id, dest_host, dest_port)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # no -R: nothing listens on the host on a sandbox's behalf

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False


def _owner(chan: asyncssh.SSHServerChannel[Any]) -> _Connection:
    owner = chan.get_connection().get_owner()
    if not isinstance(owner, _Connection) or not owner.sandbox_id:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no session")
    return owner


# ----- SFTP (and scp, which asyncssh runs over the same server) -------------------------------

def _sftp_error(exc: SealboxError) -> asyncssh.SFTPError:
    reason = exc.details.get("reason") if exc.details else None
    if isinstance(exc, NotFoundError):
        return asyncssh.SFTPNoSuchFile(exc.message)
    if reason == "permission":
        return asyncssh.SFTPPermissionDenied(exc.message)
    if reason == "exists":
        return asyncssh.SFTPFileAlreadyExists(exc.message)
    if reason == "not_directory":
        return asyncssh.SFTPNotADirectory(exc.message)
    if reason == "is_directory":
        return asyncssh.SFTPFileIsADirectory(exc.message)
    if isinstance(exc, SandboxGone):
        return asyncssh.SFTPConnectionLost(exc.message)
    return asyncssh.SFTPFailure(exc.message)


def _unsupported(what: str) -> NoReturn:
    raise asyncssh.SFTPOpUnsupported(f"{what} is not supported in a sealbox sandbox")


_TYPES = {"dir": (stat.S_IFDIR, asyncssh.FILEXFER_TYPE_DIRECTORY),
          "file": (stat.S_IFREG, asyncssh.FILEXFER_TYPE_REGULAR),
          "symlink": (stat.S_IFLNK, asyncssh.FILEXFER_TYPE_SYMLINK)}


def _attrs(info: FileInfo) -> asyncssh.SFTPAttrs:
    bits, kind = _TYPES.get(info.type, (0, asyncssh.FILEXFER_TYPE_SPECIAL))
    return asyncssh.SFTPAttrs(type=kind, size=info.size, permissions=bits | info.mode,
                              uid=1000, gid=1000, atime=int(info.mtime), mtime=int(info.mtime),
                              nlink=1)


class _ReadFile:
    """Sequential reads stream from the guest; a read behind the stream restarts it."""

    def __init__(self, guest: GuestClient, path: str) -> None:
        self.guest = guest
        self.path = path
        self._chunks: AsyncIterator[bytes] | None = None
        self._start = 0  # file offset of _buf[0]
        self._buf = bytearray()
        self._eof = False
        self.lock = asyncio.Lock()

    async def read(self, offset: int, size: int) -> bytes:
        if self._chunks is None or offset < self._start:
            await self.close()
            self._chunks = self.guest.read_file(self.path)
            self._start, self._buf, self._eof = 0, bytearray(), False
        assert self._chunks is not None
        while not self._eof and self._start + len(self._buf) < offset + size:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self._eof = True
            else:
                self._buf += chunk
            skip = min(offset - self._start, len(self._buf))
            if skip > 0:  # nothing before OFFSET will be asked for again (if it is: restart)
                del self._buf[:skip]
                self._start += skip
        skip = offset - self._start
        data = bytes(self._buf[skip:skip + size])
        return data

    async def close(self) -> None:
        if self._chunks is not None:
            chunks, self._chunks = self._chunks, None
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()


class _WriteFile:
    """Writes stream into one atomic guest write, which starts at the first write (or at
    close, for an empty file). They must come in order, or nearly: up to MAX_AHEAD bytes of
    pipelined writes are held until the gap fills. The file becomes exactly what was written.
    """

    MAX_AHEAD = 8 * 1024 * 1024

    def __init__(self, guest: GuestClient, path: str, mode: int, replace: bool) -> None:
        self.guest = guest
        self.path = path
        self.mode = mode
        self.replace = replace  # truncating or creating: closing with no writes empties it
        self.pos = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)
        self._ahead: dict[int, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    def _started(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.guest.write_file(self.path, self._chunks(), mode=self.mode))
        return self._task

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def _put(self, item: bytes | None) -> None:
        task = self._started()
        put = asyncio.ensure_future(self._queue.put(item))
        done, _ = await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            await self._failed(task)

    @staticmethod
    async def _failed(task: asyncio.Task[None]) -> NoReturn:
        try:
            await task
        except SealboxError as exc:
            raise _sftp_error(exc) from None
        raise asyncssh.SFTPFailure("the write ended early")

    async def write(self, offset: int, data: bytes) -> None:
        if offset < self.pos:
            _unsupported("rewriting part of a file")
        if offset > self.pos:
            if sum(map(len, self._ahead.values())) + len(data) > self.MAX_AHEAD:
                _unsupported("writing far ahead of the end of the file")
            self._ahead[offset] = data
            return
        await self._put(data)
        self.pos += len(data)
        while self.pos in self._ahead:
            data = self._ahead.pop(self.pos)
            await self._put(data)
            self.pos += len(data)

    async def close(self) -> None:
        if self._ahead:
            if self._task is not None:
                self._task.cancel()
            raise asyncssh.SFTPFailure("the file has a gap: some writes never arrived")
        if self._task is None and not self.replace:
            return  # opened without truncation and never written: leave the file as it was
        task = self._started()
        if not task.done():
            await self._put(None)
        try:
            await task
        except SealboxError as exc:
            raise _sftp_error(exc) from None


_File = _ReadFile | _WriteFile


class _SandboxSFTP(asyncssh.SFTPServer):
    """Every operation maps to the sandbox's guest agent. Nothing falls through to the
    default implementation, which works on the host's own files."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        super().__init__(chan)
        owner = _owner(chan)
        self._gateway = owner.gateway
        self._sandbox_id = owner.sandbox_id

    def _guest(self) -> GuestClient:
        try:
            return self._gateway.engine.guest(self._sandbox_id)
        except SealboxError as exc:
            raise _sftp_error(exc) from None

    @staticmethod
    def _path(path: bytes) -> str:
        text = path.decode("utf-8", "surrogateescape")
        if "\0" in text:
            raise asyncssh.SFTPBadMessage("NUL in path")
        return posixpath.normpath(posixpath.join(HOME, text)) if text else HOME

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        try:
            return await fn(*args, **kw)
        except SealboxError as exc:
            raise _sftp_error(exc) from None

    def map_path(self, path: bytes) -> bytes:
        raise asyncssh.SFTPOpUnsupported("no host paths here")

    def reverse_map_path(self, path: bytes) -> bytes:
        return path

    async def realpath(self, path: bytes) -> bytes:
        return self._path(path).encode("utf-8", "surrogateescape")

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> _File:
        name = self._path(path)
        guest = self._guest()
        reading = bool(pflags & asyncssh.FXF_READ)
        writing = bool(pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND))
        if reading and writing:
            _unsupported("opening a file for reading and writing")
        if not writing:
            info = await self._call(guest.stat, name)
            if info.type == "dir":
                raise asyncssh.SFTPFileIsADirectory(f"{name} is a directory")
            return _ReadFile(guest, name)
        existing: FileInfo | None = None
        with contextlib.suppress(NotFoundError):
            existing = await guest.stat(name)
        if existing is not None:
            if pflags & asyncssh.FXF_EXCL:
                raise asyncssh.SFTPFileAlreadyExists(f"{name} exists")
            if existing.type == "dir":
                raise asyncssh.SFTPFileIsADirectory(f"{name} is a directory")
            if pflags & asyncssh.FXF_APPEND and existing.size > 0:
                _unsupported("appending to a file")
        elif not pflags & asyncssh.FXF_CREAT:
            raise asyncssh.SFTPNoSuchFile(f"{name} does not exist")
        mode = (attrs.permissions & 0o7777) if attrs.permissions is not None else (
            existing.mode if existing is not None else 0o644)
        # Without truncation the client still writes the whole file from offset 0 (OpenSSH
        # then sets the size): the file becomes what was written. In-place edits of part of a
        # file are not supported (a write behind the current position is refused).
        return _WriteFile(guest, name, mode,
                          replace=existing is None or bool(pflags & asyncssh.FXF_TRUNC))

    def open56(self, path: bytes, desired_access: int, flags: int,
               attrs: asyncssh.SFTPAttrs) -> NoReturn:
        _unsupported("SFTP v5/v6 open")

    async def close(self, file_obj: object) -> None:
        if isinstance(file_obj, _ReadFile | _WriteFile):
            async with file_obj.lock:
                await file_obj.close()

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        if not isinstance(file_obj, _ReadFile):
            raise asyncssh.SFTPPermissionDenied("file not open for reading")
        async with file_obj.lock:
            return await self._call(file_obj.read, offset, size)  # type: ignore[no-any-return]

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        if not isinstance(file_obj, _WriteFile):
            raise asyncssh.SFTPPermissionDenied("file not open for writing")
        async with file_obj.lock:
            await file_obj.write(offset, data)
        return len(data)

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        # The guest reports links as themselves; good enough for sftp/scp clients.
        return _attrs(await self._call(self._guest().stat, self._path(path)))

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return await self.stat(path)

    async def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        if isinstance(file_obj, _WriteFile):
            return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, size=file_obj.pos,
                                      permissions=stat.S_IFREG | 0o644)
        if isinstance(file_obj, _ReadFile):
            return _attrs(await self._call(self._guest().stat, file_obj.path))
        raise asyncssh.SFTPInvalidHandle("unknown handle")

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Accepted and ignored: modes come with the write; times are not kept."""

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Accepted and ignored, as setstat."""

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        """Accepted and ignored, as setstat."""

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        name = self._path(path)
        guest = self._guest()
        entries: list[FileInfo] = await self._call(guest.list_dir, name)
        here: FileInfo = await self._call(guest.stat, name)
        for filename, info in [(".", here), ("..", here)] + [(e.name, e) for e in entries]:
            entry = asyncssh.SFTPName(filename.encode("utf-8", "surrogateescape"), b"",
                                      _attrs(info))
            self.format_longname(entry)
            yield entry

    async def remove(self, path: bytes) -> None:
        name = self._path(path)
        info: FileInfo = await self._call(self._guest().stat, name)
        if info.type == "dir":
            raise asyncssh.SFTPFileIsADirectory(f"{name} is a directory: use rmdir")
        await self._call(self._guest().remove, name)

    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        name = self._path(path)
        with contextlib.suppress(NotFoundError):
            await self._guest().stat(name)
            raise asyncssh.SFTPFileAlreadyExists(f"{name} exists")
        await self._call(self._guest().mkdir, name, parents=False)

    async def rmdir(self, path: bytes) -> None:
        name = self._path(path)
        info: FileInfo = await self._call(self._guest().stat, name)
        if info.type != "dir":
            raise asyncssh.SFTPNotADirectory(f"{name} is not a directory")
        if await self._call(self._guest().list_dir, name):
            raise asyncssh.SFTPDirNotEmpty(f"{name} is not empty")
        await self._call(self._guest().remove, name)

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        new = self._path(newpath)
        with contextlib.suppress(NotFoundError):
            await self._guest().stat(new)
            raise asyncssh.SFTPFileAlreadyExists(f"{new} exists")
        await self._call(self._guest().rename, self._path(oldpath), new)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._call(self._guest().rename, self._path(oldpath), self._path(newpath))

    def readlink(self, path: bytes) -> NoReturn:
        _unsupported("readlink")

    def symlink(self, oldpath: bytes, newpath: bytes) -> NoReturn:
        _unsupported("symlink")

    def link(self, oldpath: bytes, newpath: bytes) -> NoReturn:
        _unsupported("link")

    def lock(self, file_obj: object, offset: int, length: int, flags: int) -> NoReturn:
        _unsupported("lock")

    def unlock(self, file_obj: object, offset: int, length: int) -> NoReturn:
        _unsupported("unlock")

    def statvfs(self, path: bytes) -> NoReturn:
        _unsupported("statvfs")

    def fstatvfs(self, file_obj: object) -> NoReturn:
        _unsupported("fstatvfs")

    def fsync(self, file_obj: object) -> None:
        """Writes land atomically at close; nothing to do here."""

    def exit(self) -> None:
        """The session ends: report success as sftp-server does (OpenSSH's scp, in SFTP mode,
        fails without an exit status). Open files are dropped with the session."""
        with contextlib.suppress(OSError, asyncssh.Error):
            self.channel.exit(0)


# Names of SFTPServer methods that never touch the host's files (the test checks that every
# other public method is overridden above).
SAFE_INHERITED = frozenset({"channel", "connection", "env", "logger", "convert_attrs",
                            "format_user", "format_group", "format_longname"})

__all__ = ["SAFE_INHERITED", "SshGateway", "SshKey", "SshKeyStore", "SshTokens",
           "load_host_key", "parse_public_key"]
