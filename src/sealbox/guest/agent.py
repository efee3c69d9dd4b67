"""The sealbox guest agent: exec, files and PTY for the host, over one multiplexed byte stream.

It runs inside every sandbox as ``python3 /.sealbox/agent.py --listen-fd N`` (or ``--listen-unix
PATH``, ``--serial PATH``, ``--stdio``) with nothing but the standard library and its sibling
``protocol.py``, which documents the wire protocol. Bad input from the host is answered with an
``error`` event and never stops the agent.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Run as a sandbox's agent, which never speaks TLS: asyncio then skips loading the ssl
    # module and its libraries, part of every sandbox's start (~10x dearer under gVisor).
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import asyncio
import errno
import fcntl
import os
import pty
import shutil
import signal
import socket
import stat
import struct
import tempfile
import termios
import traceback
import tty
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

if __package__:
    from sealbox.guest import protocol
else:  # run as a script from /.sealbox/, next to protocol.py (-I leaves the script dir off path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import protocol  # type: ignore[import-not-found, no-redef]

# After the main process exits, output still in flight is delivered; a pipe that a leftover
# grandchild holds open but stays silent this long no longer holds up the exit event.
EXIT_GRACE = 0.2
KEEP_FINISHED = 1024
LIST_BATCH = 256

_ERRNO_CODES = {
    errno.ENOENT: "not_found", errno.EEXIST: "exists", errno.EACCES: "permission",
    errno.EPERM: "permission", errno.EROFS: "permission", errno.EISDIR: "is_directory",
    errno.ENOTDIR: "not_directory", errno.ENOTEMPTY: "invalid", errno.EINVAL: "invalid",
    errno.ENAMETOOLONG: "invalid", errno.ELOOP: "invalid", errno.EXDEV: "invalid",
}


def log(message: str) -> None:
    print(f"sealbox-agent[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


class OpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def os_error(exc: OSError) -> OpError:
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return OpError(_ERRNO_CODES.get(exc.errno or 0, "io"), f"{where}{exc.strerror or exc}")


# ----- message fields (a wrong type is the host's bug: "invalid", never a crash) -------------

def get_str(msg: dict[str, Any], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value or "\0" in value:
        raise OpError("invalid", f"{key!r} must be a non-empty string without NUL")
    return value


def get_int(msg: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    value = msg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise OpError("invalid", f"{key!r} must be an integer from {lo} to {hi}")
    return value


def get_bool(msg: dict[str, Any], key: str, default: bool) -> bool:
    value = msg.get(key, default)
    if not isinstance(value, bool):
        raise OpError("invalid", f"{key!r} must be true or false")
    return value


def get_argv(msg: dict[str, Any]) -> list[str]:
    argv, shell = msg.get("argv"), msg.get("shell")
    if (argv is None) == (shell is None):
        raise OpError("invalid", "exec needs exactly one of 'argv' and 'shell'")
    if shell is not None:
        return ["/bin/sh", "-c", get_str(msg, "shell")]
    if (not isinstance(argv, list) or not argv
            or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]):
        raise OpError("invalid", "'argv' must be a non-empty list of strings")
    return argv


def get_env(msg: dict[str, Any]) -> dict[str, str]:
    env = msg.get("env") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k
            and "\0" not in k + v for k, v in env.items()):
        raise OpError("invalid", "'env' must map variable names to strings")
    return dict(os.environ) | env


def get_timeout(msg: dict[str, Any]) -> float | None:
    value = msg.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise OpError("invalid", "'timeout' must be a positive number of seconds")
    return float(value)


def winsize(msg: dict[str, Any]) -> bytes:
    rows = get_int(msg, "rows", None, 1, 0xFFFF)
    cols = get_int(msg, "cols", None, 1, 0xFFFF)
    return struct.pack("HHHH", rows, cols, 0, 0)


def file_entry(name: str, path: str, st: os.stat_result) -> dict[str, Any]:
    kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
    return {"name": name, "path": path, "type": kind, "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime}


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


# ----- streams ------------------------------------------------------------------------------

class _Pipe(asyncio.StreamReaderProtocol):
    def connection_lost(self, exc: Exception | None) -> None:
        # A pty master reports EIO once the last terminal fd closes: that is its end of file,
        # and passing it on as an error would drop output still buffered in the reader.
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            exc = None
        super().connection_lost(exc)


async def open_read(fd: int) -> tuple[asyncio.StreamReader, asyncio.ReadTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=protocol.CHUNK)
    transport, _ = await loop.connect_read_pipe(lambda: _Pipe(reader), os.fdopen(fd, "rb", 0))
    return reader, transport


async def open_write(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.connect_write_pipe(
        lambda: _Pipe(asyncio.StreamReader()), os.fdopen(fd, "wb", 0))
    return asyncio.StreamWriter(transport, proto, None, loop)


# ----- processes ----------------------------------------------------------------------------

class Proc:
    """A process the agent started (``ps``, ``kill``, ``wait`` see these)."""

    def __init__(self, pid: int, argv: list[str]) -> None:
        self.pid = pid
        self.argv = argv
        self.returncode: int | None = None
        self.timed_out = False
        self.done = asyncio.Event()

    def exit_event(self, mid: int) -> dict[str, Any]:
        rc = self.returncode
        return {"ev": "exit", "id": mid, "code": rc if rc is not None and rc >= 0 else None,
                "signal": -rc if rc is not None and rc < 0 else None, "timed_out": self.timed_out}

    def info(self) -> dict[str, Any]:
        rc = self.returncode
        return {"pid": self.pid, "argv": self.argv, "running": not self.done.is_set(),
                "exit_code": None if rc is None else rc if rc >= 0 else 128 - rc}


class PumpState:
    def __init__(self) -> None:
        self.chunks = 0
        self.waiting = False  # blocked on the process, not on the host: may be cut at exit
        self.finished = False


class Agent:
    def __init__(self, workspace: str, pids_events: str | None = None) -> None:
        self.workspace = workspace
        self.pids_events = pids_events
        self.procs: dict[int, Proc] = {}
        self.tasks: set[asyncio.Task[None]] = set()  # background execs outlive connections

    def refused_forks(self) -> int:
        """Forks the sandbox's pids cgroup has refused so far (where the agent knows it)."""
        if self.pids_events is None:
            return 0
        try:
            with open(self.pids_events) as f:
                return next((int(v) for k, v in (line.split() for line in f) if k == "max"), 0)
        except (OSError, ValueError):
            return 0

    def path(self, msg: dict[str, Any], key: str = "path") -> str:
        return os.path.join(self.workspace, get_str(msg, key))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def add_proc(self, proc: Proc) -> None:
        self.procs[proc.pid] = proc
        if len(self.procs) > KEEP_FINISHED:
            for old in [p for p in self.procs.values() if p.done.is_set()][:len(self.procs) // 2]:
                del self.procs[old.pid]

    def running(self, msg: dict[str, Any]) -> Proc:
        pid = get_int(msg, "pid", None, 1, 2**31)
        proc = self.procs.get(pid)
        if proc is None:
            raise OpError("not_found", f"no process {pid} was started by this agent")
        return proc

    async def serve_listener(self, sock: socket.socket) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await Connection(self, reader, writer).serve()
        server = await asyncio.start_unix_server(handle, sock=sock)
        async with server:
            await server.serve_forever()

    async def serve_fds(self, rfd: int, wfd: int) -> None:
        reader, transport = await open_read(rfd)
        try:
            await Connection(self, reader, await open_write(wfd)).serve()
        finally:
            transport.close()

    async def serve_serial(self, path: str, fd: int | None = None) -> None:
        """One host at a time; reopen the port whenever the host side goes away. FD is the
        port already open (a restored microVM's identity step: closing a virtio port drops
        what the host has sent meanwhile)."""
        while True:
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
                except OSError as exc:
                    log(f"cannot open {path}: {exc}")
                    await asyncio.sleep(0.5)
                    continue
            if os.isatty(fd):
                tty.setraw(fd, termios.TCSANOW)  # TCSAFLUSH would drop what the host sent
            await self.serve_fds(fd, os.dup(fd))
            fd = None
            await asyncio.sleep(0.1)


# ----- one connection -----------------------------------------------------------------------

class Op:
    """An operation that outlives the message that started it."""

    task: asyncio.Task[None] | None = None

    def follow(self, kind: str, msg: dict[str, Any], data: bytes) -> None:
        if kind == "cancel" and self.task is not None:
            self.task.cancel()

    def abandon(self) -> None:
        """The connection is gone."""
        if self.task is not None:
            self.task.cancel()


class StreamOp(Op):
    def __init__(self) -> None:
        self.window = protocol.Window()

    def follow(self, kind: str, msg: dict[str, Any], data: bytes) -> None:
        if kind == "credit":
            self.window.give(get_int(msg, "bytes", None, 0, 2**40))
        else:
            super().follow(kind, msg, data)


class Connection:
    def __init__(self, agent: Agent, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.agent = agent
        self.reader = reader
        self.writer = writer
        self.ops: dict[int, Op] = {}
        self.closed = False

    def send_nowait(self, header: dict[str, Any], data: bytes = b"") -> None:
        """For small control frames; bulk data goes through `send` and waits for the host."""
        if not self.closed:
            self.writer.write(protocol.encode(header, data))

    async def send(self, header: dict[str, Any], data: bytes = b"") -> None:
        if self.closed:
            return
        self.writer.write(protocol.encode(header, data))
        try:
            await self.writer.drain()
        except ConnectionError:
            self.closed = True

    def error(self, mid: int, exc: OpError, final: bool = True) -> None:
        self.send_nowait({"ev": "error", "id": mid, "code": exc.code, "message": exc.message,
                          **({} if final else {"final": False})})

    async def serve(self) -> None:
        try:
            while True:
                try:
                    frame = await protocol.read_frame(self.reader)
                except protocol.ProtocolError as exc:
                    self.error(0, OpError("invalid", f"protocol violation, disconnecting: {exc}"))
                    break
                except ConnectionError:
                    break
                if frame is None:
                    break
                self.dispatch(*frame)
        finally:
            self.closed = True
            for op in list(self.ops.values()):
                op.abandon()
            self.ops.clear()
            self.writer.close()

    def dispatch(self, msg: dict[str, Any], data: bytes) -> None:
        mid = msg.get("id")
        if not isinstance(mid, int) or isinstance(mid, bool) or not 1 <= mid < 2**63:
            self.error(0, OpError("invalid", "message without a positive integer 'id'"))
            return
        kind = msg.get("op")
        op = self.ops.get(mid)
        try:
            if not isinstance(kind, str):
                raise OpError("invalid", "message without a string 'op'")
            if kind in STARTERS:
                if op is not None:
                    raise OpError("invalid", f"operation id {mid} is already in use")
                STARTERS[kind](self, mid, msg)
            elif kind in FOLLOW_UPS:
                if op is not None:
                    try:
                        op.follow(kind, msg, data)
                    except (OpError, OSError) as exc:  # a bad follow-up does not end the op
                        self.error(mid, exc if isinstance(exc, OpError) else os_error(exc),
                                   final=False)
                elif kind in ("signal", "resize"):
                    raise OpError("invalid", f"no running operation {mid}")
                # other follow-ups may race with the end of their operation: dropped
            else:
                raise OpError("invalid", f"unknown op {kind[:100]!r}")
        except OpError as exc:
            self.error(mid, exc)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the agent
            traceback.print_exc()
            self.error(mid, OpError("io", f"agent error: {exc!r}"))

    def start(self, mid: int, op: Op, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` as operation `mid`: its OpError becomes the terminal error event."""
        async def run() -> None:
            try:
                await work()
            except OpError as exc:
                self.error(mid, exc)
            except OSError as exc:
                self.error(mid, os_error(exc))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                self.error(mid, OpError("io", f"agent error: {exc!r}"))
            finally:
                if self.ops.get(mid) is op:
                    del self.ops[mid]
        self.ops[mid] = op
        op.task = self.agent.spawn(run())

    # ----- simple operations: answered at once ------------------------------------------

    def op_ping(self, mid: int, msg: dict[str, Any]) -> None:
        self.send_nowait({"ev": "ok", "id": mid, "version": protocol.VERSION,
                          "python": sys.version.split()[0], "pid": os.getpid()})

    def op_ps(self, mid: int, msg: dict[str, Any]) -> None:
        self.send_nowait({"ev": "ok", "id": mid,
                          "processes": [p.info() for p in self.agent.procs.values()]})

    def op_kill(self, mid: int, msg: dict[str, Any]) -> None:
        proc = self.agent.running(msg)
        sig = get_int(msg, "sig", signal.SIGTERM, 1, 64)
        if not proc.done.is_set():
            killpg(proc.pid, sig)
        self.send_nowait({"ev": "ok", "id": mid})

    def fs(self, mid: int, action: Callable[[], dict[str, Any] | None]) -> None:
        try:
            result = action()
        except OSError as exc:
            raise os_error(exc) from None
        self.send_nowait({"ev": "ok", "id": mid, **(result or {})})

    def op_stat(self, mid: int, msg: dict[str, Any]) -> None:
        path = self.agent.path(msg)
        self.fs(mid, lambda: {"entry": file_entry(os.path.basename(path), path, os.lstat(path))})

    def op_mkdir(self, mid: int, msg: dict[str, Any]) -> None:
        path = self.agent.path(msg)
        if get_bool(msg, "parents", False):
            self.fs(mid, lambda: os.makedirs(path, exist_ok=True))
        else:
            self.fs(mid, lambda: os.mkdir(path))

    def op_remove(self, mid: int, msg: dict[str, Any]) -> None:
        path = self.agent.path(msg)
        recursive = get_bool(msg, "recursive", False)
        if os.path.realpath(path) == "/":
            raise OpError("invalid", "refusing to remove /")

        def remove() -> None:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
            elif recursive:
                shutil.rmtree(path)
            else:
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if exc.errno == errno.ENOTEMPTY:
                        raise OpError("invalid", f"{path}: directory not empty "
                                      "(remove it with recursive)") from None
                    raise
        self.fs(mid, remove)

    def op_rename(self, mid: int, msg: dict[str, Any]) -> None:
        src, dst = self.agent.path(msg, "src"), self.agent.path(msg, "dst")
        self.fs(mid, lambda: os.rename(src, dst))

    # ----- streaming operations ---------------------------------------------------------

    def op_wait(self, mid: int, msg: dict[str, Any]) -> None:
        proc = self.agent.running(msg)

        async def wait() -> None:
            await proc.done.wait()
            self.send_nowait(proc.exit_event(mid))
        self.start(mid, Op(), wait)

    def op_list(self, mid: int, msg: dict[str, Any]) -> None:
        path = self.agent.path(msg)

        async def listing() -> None:
            batch: list[dict[str, Any]] = []
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while listing
                    batch.append(file_entry(entry.name, entry.path, st))
                    if len(batch) == LIST_BATCH:
                        await self.send({"ev": "entries", "id": mid, "entries": batch})
                        batch = []
            await self.send({"ev": "entries", "id": mid, "entries": batch})
            self.send_nowait({"ev": "end", "id": mid})
        self.start(mid, Op(), listing)

    def op_read(self, mid: int, msg: dict[str, Any]) -> None:
        path = self.agent.path(msg)
        try:
            # O_NONBLOCK: opening a FIFO must not block the whole agent.
            f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0)
        except OSError as exc:
            raise os_error(exc) from None
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            f.close()
            if stat.S_ISDIR(mode):
                raise OpError("is_directory", f"{path}: is a directory")
            raise OpError("invalid", f"{path}: not a regular file")
        op = StreamOp()

        async def read() -> None:
            with f:
                size = 0
                while chunk := f.read(protocol.CHUNK):
                    if not await op.window.take(len(chunk)):
                        return
                    await self.send({"ev": "data", "id": mid}, chunk)
                    size += len(chunk)
            self.send_nowait({"ev": "end", "id": mid, "size": size})
        self.start(mid, op, read)

    def op_write(self, mid: int, msg: dict[str, Any]) -> None:
        path = self.agent.path(msg)
        mode = get_int(msg, "mode", 0o644, 0, 0o7777)
        mkdirs = get_bool(msg, "mkdirs", True)
        try:
            parent = os.path.dirname(path)
            if mkdirs:
                os.makedirs(parent, exist_ok=True)
            if os.path.isdir(path):
                raise OpError("is_directory", f"{path}: is a directory")
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".sealbox-partial-")
        except OSError as exc:
            raise os_error(exc) from None
        self.ops[mid] = WriteOp(self, mid, path, mode, fd, tmp)

    def op_exec(self, mid: int, msg: dict[str, Any]) -> None:
        exec_op = ExecOp(self, mid, msg)
        self.start(mid, exec_op, exec_op.run)


class WriteOp(Op):
    def __init__(self, conn: Connection, mid: int, path: str, mode: int, fd: int,
                 tmp: str) -> None:
        self.conn, self.mid, self.path, self.mode, self.tmp = conn, mid, path, mode, tmp
        self.file = os.fdopen(fd, "wb")

    def follow(self, kind: str, msg: dict[str, Any], data: bytes) -> None:
        try:
            if kind == "data":
                self.file.write(data)
                self.conn.send_nowait({"ev": "credit", "id": self.mid, "bytes": len(data)})
                return
            if kind == "end":
                self.file.close()
                os.chmod(self.tmp, self.mode)
                os.rename(self.tmp, self.path)
                self.conn.ops.pop(self.mid)
                self.conn.send_nowait({"ev": "ok", "id": self.mid})
            elif kind == "cancel":
                self.abandon()
        except OSError as exc:
            self.abandon()
            self.conn.error(self.mid, os_error(exc))

    def abandon(self) -> None:
        self.conn.ops.pop(self.mid, None)
        self.file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class ExecOp(StreamOp):
    def __init__(self, conn: Connection, mid: int, msg: dict[str, Any]) -> None:
        super().__init__()
        self.conn, self.mid = conn, mid
        self.argv = get_argv(msg)
        self.env = get_env(msg)
        cwd = msg.get("cwd")
        if not isinstance(cwd, str | None):
            raise OpError("invalid", "'cwd' must be a string")
        self.cwd = os.path.join(conn.agent.workspace, cwd or ".")
        self.timeout = get_timeout(msg)
        self.background = get_bool(msg, "background", False)
        self.want_stdin = get_bool(msg, "stdin", False)
        self.pty = winsize(msg["pty"]) if isinstance(msg.get("pty"), dict) else None
        if msg.get("pty") is not None and self.pty is None:
            raise OpError("invalid", "'pty' must be {rows, cols}")
        self.stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.proc: Proc | None = None
        self.master: int | None = None

    def follow(self, kind: str, msg: dict[str, Any], data: bytes) -> None:
        if kind == "stdin":
            self.stdin.put_nowait(data)
        elif kind == "stdin_close":
            self.stdin.put_nowait(None)
        elif kind == "signal":
            sig = get_int(msg, "sig", None, 1, 64)
            if self.proc is not None and not self.proc.done.is_set():
                killpg(self.proc.pid, sig)
        elif kind == "resize":
            if self.master is None:
                raise OpError("invalid", "resize needs a process started with a pty")
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, winsize(msg))
        else:
            super().follow(kind, msg, data)

    def abandon(self) -> None:
        self.window.close()  # from now on output is read and discarded
        if not self.background and self.proc is not None and not self.proc.done.is_set():
            killpg(self.proc.pid, signal.SIGKILL)

    async def run(self) -> None:
        if not os.path.isdir(self.cwd):
            raise OpError("not_found", f"working directory {self.cwd} does not exist")
        child: list[int] = []  # fds that belong to the child only
        outputs: list[tuple[str, int]] = []
        stdin_fd: int | None = None
        preexec: Callable[[], None] | None = None
        if self.pty is not None:
            # Reader, writer and resize each own a descriptor of the master: each closes its own.
            self.master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, self.pty)
            child = [slave]
            stdio: tuple[int, int, int] = (slave, slave, slave)
            outputs = [("pty", os.dup(self.master))]
            stdin_fd = os.dup(self.master)
            self.env.setdefault("TERM", "xterm-256color")
            preexec = set_controlling_tty
        else:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            in_r, stdin_fd = os.pipe() if self.want_stdin else (os.open(os.devnull, os.O_RDONLY),
                                                                   None)
            child = [in_r, out_w, err_w]
            stdio = (in_r, out_w, err_w)
            outputs = [("stdout", out_r), ("stderr", err_r)]
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], cwd=self.cwd,
                env=self.env, start_new_session=True, preexec_fn=preexec)
        except OSError as exc:
            for fd in [fd for _, fd in outputs] + [stdin_fd, self.master]:
                if fd is not None:
                    os.close(fd)
            self.master = None
            if isinstance(exc, FileNotFoundError):
                raise OpError("not_found", f"{self.argv[0]}: command not found") from None
            raise os_error(exc) from None
        finally:
            for fd in child:
                os.close(fd)
        refused = self.conn.agent.refused_forks()
        proc = self.proc = Proc(process.pid, self.argv)
        self.conn.agent.add_proc(proc)
        self.conn.send_nowait({"ev": "started", "id": self.mid, "pid": proc.pid})
        timer = None
        if self.timeout is not None:
            timer = asyncio.get_running_loop().call_later(self.timeout, self.expire)
        feeder = asyncio.ensure_future(self.feed_stdin(stdin_fd)) if stdin_fd is not None else None
        states = [PumpState() for _ in outputs]
        pumps = [asyncio.ensure_future(self.pump(name, fd, state))
                 for (name, fd), state in zip(outputs, states, strict=True)]
        try:
            proc.returncode = await process.wait()
            await self.drain_pumps(pumps, states)
        finally:
            if timer is not None:
                timer.cancel()
            if feeder is not None:
                feeder.cancel()
            for task in pumps:
                task.cancel()
            if self.master is not None:
                os.close(self.master)
                self.master = None
            proc.done.set()
        event = proc.exit_event(self.mid)
        if self.conn.agent.refused_forks() > refused:
            event["limit"] = "pids"
        self.conn.send_nowait(event)

    def expire(self) -> None:
        if self.proc is not None:
            self.proc.timed_out = True
            killpg(self.proc.pid, signal.SIGKILL)

    async def drain_pumps(self, pumps: list[asyncio.Task[None]], states: list[PumpState]) -> None:
        pending = set(pumps)
        while pending:
            before = sum(s.chunks for s in states)
            _, pending = await asyncio.wait(pending, timeout=EXIT_GRACE)
            live = [s for s in states if not s.finished]
            if pending and sum(s.chunks for s in states) == before and all(
                    s.waiting for s in live):
                return

    async def pump(self, name: str, fd: int, state: PumpState) -> None:
        reader, transport = await open_read(fd)
        try:
            while True:
                state.waiting = True
                chunk = await reader.read(protocol.CHUNK)
                state.waiting = False
                if not chunk:
                    return
                state.chunks += 1
                if await self.window.take(len(chunk)):
                    await self.conn.send({"ev": name, "id": self.mid}, chunk)
        finally:
            state.finished = True
            transport.close()

    async def feed_stdin(self, fd: int) -> None:
        writer = await open_write(fd)
        try:
            while (data := await self.stdin.get()) is not None or self.pty is not None:
                if not writer.is_closing():
                    writer.write(b"\x04" if data is None else data)  # ^D: end of input on a tty
                    try:
                        await writer.drain()
                    except ConnectionError:
                        pass  # the process closed its stdin; keep granting credit
                if data is not None:
                    self.conn.send_nowait({"ev": "credit", "id": self.mid, "bytes": len(data)})
        finally:
            writer.close()


def set_controlling_tty() -> None:
    """Runs in the child after setsid(): make the pty (its stdin) the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


STARTERS: dict[str, Callable[[Connection, int, dict[str, Any]], None]] = {
    "ping": Connection.op_ping, "exec": Connection.op_exec, "ps": Connection.op_ps,
    "kill": Connection.op_kill, "wait": Connection.op_wait, "read": Connection.op_read,
    "write": Connection.op_write, "list": Connection.op_list, "stat": Connection.op_stat,
    "mkdir": Connection.op_mkdir, "remove": Connection.op_remove, "rename": Connection.op_rename,
}
FOLLOW_UPS = frozenset({"stdin", "stdin_close", "signal", "resize", "credit", "data", "end",
                        "cancel"})


USAGE = ("usage: agent.py (--listen-fd FD | --listen-unix PATH | --serial PATH | --stdio) "
         "[--workspace DIR] [--pids-events PATH]\n"
         "  --listen-fd FD       an inherited listening unix socket\n"
         "  --listen-unix PATH   listen on a new unix socket at this path\n"
         "  --serial PATH        a character device (virtio-serial port) as the stream\n"
         "  --stdio              one connection on stdin/stdout\n"
         "  --workspace DIR      base of relative paths (default /workspace)\n"
         "  --pids-events PATH   the sandbox's pids cgroup's pids.events: a command during "
         "which it counts a refused fork ends with limit 'pids'")
_VALUED = ("--listen-fd", "--listen-unix", "--serial", "--workspace", "--pids-events")
_MODES = ("--listen-fd", "--listen-unix", "--serial", "--stdio")


def parse_args(argv: list[str]) -> dict[str, str]:
    """Option -> value ("" for --stdio). Not argparse: importing it is a measurable part of
    every sandbox's start, and this command line is written by sealbox, not typed."""
    opts: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg == "--stdio":
            opts[arg] = ""
        elif arg in _VALUED and (value := next(args, None)) is not None:
            opts[arg] = value
        else:
            sys.exit(f"agent.py: bad argument {arg!r}\n{USAGE}")
    if sum(mode in opts for mode in _MODES) != 1:
        sys.exit(f"agent.py: give exactly one of {', '.join(_MODES)}\n{USAGE}")
    if "--listen-fd" in opts and not opts["--listen-fd"].isdigit():
        sys.exit(f"agent.py: --listen-fd takes a number\n{USAGE}")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    agent = Agent(os.path.abspath(opts.get("--workspace", "/workspace")),
                  opts.get("--pids-events"))
    if "--listen-fd" in opts:
        run = agent.serve_listener(socket.socket(fileno=int(opts["--listen-fd"])))
    elif "--listen-unix" in opts:
        path = opts["--listen-unix"]
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(64)
        run = agent.serve_listener(sock)
    elif "--serial" in opts:
        run = agent.serve_serial(opts["--serial"])
    else:
        run = agent.serve_fds(0, 1)
    try:
        asyncio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
