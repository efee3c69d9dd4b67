"""The guest agent, run for real as a subprocess on a unix socket, driven by the real client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealbox.errors import ConfigError, NotFoundError, SandboxGone
from sealbox.guest import protocol
from sealbox.guest.client import ExitStatus, GuestClient, Output

AGENT = Path(__file__).resolve().parent.parent / "src" / "sealbox" / "guest" / "agent.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def recv_frame(sock: socket.socket) -> tuple[dict[str, object], bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            more = sock.recv(n - len(buf))
            if not more:
                raise ConnectionError("agent closed the connection")
            buf += more
        return buf
    hlen, dlen = protocol.HEADER.unpack(exactly(protocol.HEADER.size))
    header = json.loads(exactly(hlen))
    return header, exactly(dlen)


def raw_request(path: Path, header: dict[str, object]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(protocol.encode(header))
        return recv_frame(sock)[0]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_dead(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class Agent:
    """A real agent process; on stop, every process group it started is killed too."""

    def __init__(self, base: Path, python: str = sys.executable) -> None:
        self.socket = base / "agent.sock"
        self.workspace = base / "ws"
        self.workspace.mkdir()
        self.proc = subprocess.Popen(
            [python, "-I", str(AGENT), "--listen-unix", str(self.socket),
             "--workspace", str(self.workspace)])
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "agent did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            started = raw_request(self.socket, {"op": "ps", "id": 1})["processes"]
            assert isinstance(started, list)
            for p in started:
                try:
                    os.killpg(p["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    yield a
    a.stop()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("guest"))
    yield a
    a.stop()


@pytest.fixture
async def client(agent: Agent) -> AsyncIterator[GuestClient]:
    c = await GuestClient.connect_unix(agent.socket, timeout=10)
    yield c
    await c.close()


# ----- exec ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    ([], "exactly one of"), (["--stdio", "--serial", "/dev/null"], "exactly one of"),
    (["--listen-fd"], "bad argument '--listen-fd'"), (["--listen-fd", "x"], "takes a number"),
    (["--bogus"], "bad argument '--bogus'"),
])
def test_agent_command_line_errors_are_clear(args: list[str], needle: str) -> None:
    r = subprocess.run([sys.executable, "-I", str(AGENT), *args], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and needle in r.stderr and "usage: agent.py" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no system python3")
async def test_system_python_runs_the_agent(tmp_path: Path) -> None:
    a = Agent(tmp_path, python=SYSTEM_PYTHON)
    try:
        c = await GuestClient.connect_unix(a.socket)
        info = await c.ping()
        assert info["version"] == protocol.VERSION and info["pid"] == a.proc.pid
        out, err, status = await (await c.exec(shell="echo $((6*7)); echo e >&2")).collect()
        assert (out, err, status) == (b"42\n", b"e\n", ExitStatus(0, None))
        await c.write_file("x/y.txt", b"hello")
        assert (a.workspace / "x" / "y.txt").read_bytes() == b"hello"
        await c.close()
    finally:
        a.stop()


async def test_exec_argv_shell_env_cwd_and_exit_codes(client: GuestClient, agent: Agent) -> None:
    out, err, status = await (await client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
                              ).collect()
    assert (out, err, status.code, status.exit_code) == (b"out\n", b"err\n", 3, 3)
    out, _, _ = await (await client.exec(shell="echo $FOO-$HOME", env={"FOO": "bar"})).collect()
    assert out == f"bar-{os.environ.get('HOME', '')}\n".encode()
    (agent.workspace / "sub").mkdir()
    out, _, _ = await (await client.exec(["pwd"])).collect()
    assert out.decode().strip() == str(agent.workspace)
    out, _, _ = await (await client.exec(["pwd"], cwd="sub")).collect()
    assert out.decode().strip() == str(agent.workspace / "sub")


async def test_exec_errors_are_reported_not_fatal(client: GuestClient) -> None:
    with pytest.raises(NotFoundError, match="no-such-program"):
        await client.exec(["no-such-program"])
    with pytest.raises(NotFoundError, match="working directory"):
        await client.exec(["true"], cwd="/nonexistent/dir")
    with pytest.raises(ConfigError):
        await client.exec(["true"], shell="true")
    assert (await (await client.exec(["true"])).wait()).code == 0


async def test_stdin_is_streamed(client: GuestClient) -> None:
    handle = await client.exec(["cat"], stdin=True)
    events = aiter(handle)
    await handle.write_stdin(b"first\n")
    item = await anext(events)
    assert item == Output("stdout", b"first\n")  # echoed back before stdin is closed
    await handle.write_stdin(b"x" * 300_000)
    await handle.close_stdin()
    rest = [i async for i in events]
    assert rest[-1] == ExitStatus(0, None)
    assert b"".join(i.data for i in rest if isinstance(i, Output)) == b"x" * 300_000


async def test_stdin_requires_opt_in(client: GuestClient) -> None:
    handle = await client.exec(["cat"])
    with pytest.raises(ConfigError):
        await handle.write_stdin(b"x")
    assert await handle.collect() == (b"", b"", ExitStatus(0, None))  # cat read /dev/null


async def test_signal_reaches_the_process(client: GuestClient) -> None:
    handle = await client.exec(["sleep", "30"])
    await handle.signal(signal.SIGTERM)
    status = await asyncio.wait_for(handle.wait(), 5)
    assert (status.code, status.signal, status.exit_code) == (None, 15, 143)


async def test_timeout_kills_the_whole_process_group(client: GuestClient) -> None:
    started = time.monotonic()
    handle = await client.exec(shell="sleep 100 & echo $!; wait", timeout=1)
    out, _, status = await handle.collect()
    assert status.timed_out and status.signal == signal.SIGKILL
    assert time.monotonic() - started < 5
    assert wait_dead(int(out)), "the background child survived the timeout"


async def test_output_streams_before_exit(client: GuestClient) -> None:
    handle = await client.exec(shell="for i in 1 2 3; do echo $i; sleep 0.4; done")
    seen: list[tuple[float, Output | ExitStatus]] = []
    async for item in handle:
        seen.append((time.monotonic(), item))
    chunks = [(t, i) for t, i in seen if isinstance(i, Output)]
    assert b"".join(i.data for _, i in chunks) == b"1\n2\n3\n"
    assert seen[-1][1] == ExitStatus(0, None)
    assert seen[-1][0] - chunks[0][0] > 0.6  # the first line came while the loop still ran


async def test_twenty_concurrent_execs_over_one_connection(client: GuestClient) -> None:
    async def run(i: int) -> bytes:
        handle = await client.exec(shell=f"sleep 1; echo {i}; echo {i} >&2")
        out, err, status = await handle.collect()
        assert status.code == 0 and out == err
        return out
    started = time.monotonic()
    results = await asyncio.gather(*(run(i) for i in range(20)))
    assert results == [f"{i}\n".encode() for i in range(20)]
    assert time.monotonic() - started < 8  # one after another would take 20 s


async def test_large_output_is_flow_controlled(client: GuestClient, agent: Agent) -> None:
    size = 50_000_000
    base = memory_kib(agent.proc.pid, "VmRSS")
    handle = await client.exec(["head", "-c", str(size), "/dev/zero"])
    events = aiter(handle)
    first = await anext(events)
    await asyncio.sleep(1.0)  # a stalled consumer: the agent must stop reading, not buffer
    assert memory_kib(agent.proc.pid, "VmRSS") - base < 20_000
    total = len(first.data) if isinstance(first, Output) else 0
    async for item in events:
        if isinstance(item, Output):
            total += len(item.data)
        else:
            assert item == ExitStatus(0, None)
    assert total == size
    assert memory_kib(agent.proc.pid, "VmHWM") - base < 40_000


async def test_pty(client: GuestClient) -> None:
    out, err, status = await (await client.exec(shell="tty; stty size; echo e >&2",
                                                pty=(24, 80))).collect()
    lines = out.decode().split()
    assert status.code == 0 and err == b""
    assert lines[0].startswith("/dev/pts/") and lines[1:3] == ["24", "80"] and lines[3] == "e"

    handle = await client.exec(shell="read line; stty size", pty=(24, 80))
    await handle.resize(40, 100)
    await handle.write_stdin(b"go\r")
    out, _, status = await asyncio.wait_for(handle.collect(), 10)
    assert status.code == 0 and b"40 100" in out
    with pytest.raises(ConfigError):
        await (await client.exec(["true"])).resize(1, 1)


async def test_background_ps_kill_wait(agent: Agent) -> None:
    first = await GuestClient.connect_unix(agent.socket)
    handle = await first.exec(["sleep", "60"], background=True)
    await first.close()
    with pytest.raises(SandboxGone):
        await first.ping()

    client = await GuestClient.connect_unix(agent.socket)
    try:
        [info] = [p for p in await client.ps() if p.pid == handle.pid]
        assert info.running and info.argv == ["sleep", "60"] and info.exit_code is None
        assert alive(handle.pid)
        waiter = asyncio.ensure_future(client.wait_pid(handle.pid))
        await client.kill(handle.pid, signal.SIGKILL)
        assert await asyncio.wait_for(waiter, 5) == ExitStatus(None, signal.SIGKILL)
        [info] = [p for p in await client.ps() if p.pid == handle.pid]
        assert not info.running and info.exit_code == 137
        with pytest.raises(NotFoundError):
            await client.kill(1)  # not ours
    finally:
        await client.close()


async def test_disconnect_mid_exec_kills_foreground_and_agent_keeps_serving(
        agent: Agent) -> None:
    first = await GuestClient.connect_unix(agent.socket)
    handle = await first.exec(shell="yes")  # floods output nobody reads any more
    await anext(aiter(handle))
    await first.close()
    assert await asyncio.to_thread(wait_dead, handle.pid)
    client = await GuestClient.connect_unix(agent.socket)
    try:
        assert (await (await client.exec(["echo", "still here"])).collect())[0] == b"still here\n"
    finally:
        await client.close()
    assert agent.proc.poll() is None


async def test_stdio_mode(agent: Agent) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(AGENT), "--stdio", "--workspace", str(agent.workspace),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    client = await GuestClient.from_streams(proc.stdout, proc.stdin)
    try:
        assert (await client.ping())["pid"] == proc.pid
        assert (await (await client.exec(["echo", "hi"])).collect())[0] == b"hi\n"
    finally:
        await client.close()
        assert await asyncio.wait_for(proc.wait(), 5) == 0  # exits when the stream ends


async def test_listen_fd_mode(agent: Agent) -> None:
    """How the namespace tier starts it: a listening socket inherited as a bare fd."""
    listener = socket.socket(socket.AF_UNIX)
    path = agent.socket.with_name("inherited.sock")
    listener.bind(str(path))
    listener.listen()
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-I", str(AGENT), "--listen-fd", str(listener.fileno()),
        "--workspace", str(agent.workspace), pass_fds=[listener.fileno()])
    listener.close()
    try:
        client = await GuestClient.connect_unix(path)
        assert (await client.ping())["pid"] == proc.pid
        await client.close()
    finally:
        proc.kill()
        await proc.wait()


async def test_serial_mode(agent: Agent) -> None:
    """How the microVM tier will use it: one character device as the whole channel."""
    master, slave = pty.openpty()
    tty.setraw(slave)  # before the agent starts: an echoing terminal would corrupt frames
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(AGENT), "--serial", os.ttyname(slave),
        "--workspace", str(agent.workspace))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(master, "rb", 0))
    transport, proto = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
        os.fdopen(os.dup(master), "wb", 0))
    client = await GuestClient.from_streams(
        reader, asyncio.StreamWriter(transport, proto, None, loop))
    try:
        assert (await asyncio.wait_for(client.ping(), 10))["pid"] == proc.pid
        assert (await (await client.exec(["echo", "serial"])).collect())[0] == b"serial\n"
        data = os.urandom(300_000)  # every byte value, through a raw terminal
        await client.write_file("s.bin", data)
        assert await client.read_bytes("s.bin") == data
    finally:
        await client.close()
        proc.kill()
        await proc.wait()
        os.close(slave)


# ----- files -----------------------------------------------------------------------------

async def test_file_roundtrip_and_metadata(client: GuestClient, agent: Agent) -> None:
    await client.write_file("a/b/c.txt", b"hello", mode=0o600)
    assert (agent.workspace / "a/b/c.txt").read_bytes() == b"hello"
    assert await client.read_bytes(str(agent.workspace / "a/b/c.txt")) == b"hello"
    info = await client.stat("a/b/c.txt")
    assert (info.name, info.type, info.size, info.mode) == ("c.txt", "file", 5, 0o600)
    os.symlink("b", agent.workspace / "a/link")
    await client.mkdir("a/d/e")
    listing = {f.name: f.type for f in await client.list_dir("a")}
    assert listing == {"b": "dir", "link": "symlink", "d": "dir"}
    await client.rename("a/b/c.txt", "a/d/moved.txt")
    assert await client.read_bytes("a/d/moved.txt") == b"hello"
    with pytest.raises(ConfigError, match="not empty"):
        await client.remove("a/d")
    await client.remove("a/d", recursive=True)
    assert not (agent.workspace / "a/d").exists()
    await client.remove("a/link")
    assert sorted(f.name for f in await client.list_dir("a")) == ["b"]


async def test_large_file_streams_both_ways(client: GuestClient, agent: Agent) -> None:
    block = os.urandom(1 << 20)

    async def source() -> AsyncIterator[bytes]:
        for i in range(20):
            yield bytes([i]) + block[1:]
    expected = hashlib.sha256()
    async for piece in source():
        expected.update(piece)
    await client.write_file("big.bin", source())
    assert (agent.workspace / "big.bin").stat().st_size == 20 << 20
    got = hashlib.sha256()
    chunks = 0
    async for chunk in client.read_file("big.bin"):
        assert len(chunk) <= protocol.CHUNK
        got.update(chunk)
        chunks += 1
    assert got.hexdigest() == expected.hexdigest() and chunks >= 320


async def test_file_errors(client: GuestClient, agent: Agent) -> None:
    with pytest.raises(NotFoundError):
        await client.read_bytes("missing.txt")
    (agent.workspace / "dir").mkdir()
    with pytest.raises(ConfigError) as exc_info:
        await client.read_bytes("dir")
    assert exc_info.value.details["reason"] == "is_directory"
    with pytest.raises(ConfigError) as exc_info:
        await client.write_file("dir", b"x")
    assert exc_info.value.details["reason"] == "is_directory"
    with pytest.raises(NotFoundError):
        await client.write_file("nope/x.txt", b"x", mkdirs=False)
    with pytest.raises(NotFoundError):
        await client.stat("missing")
    with pytest.raises(ConfigError) as exc_info:
        await client.mkdir("dir", parents=False)
    assert exc_info.value.details["reason"] == "exists"
    (agent.workspace / "file").write_bytes(b"")
    with pytest.raises(ConfigError) as exc_info:
        await client.list_dir("file")
    assert exc_info.value.details["reason"] == "not_directory"
    os.mkfifo(agent.workspace / "fifo")
    with pytest.raises(ConfigError, match="not a regular file"):
        await client.read_bytes("fifo")  # and the agent did not block on it
    assert (await client.ping())["version"] == protocol.VERSION


async def test_failed_write_keeps_the_old_file(client: GuestClient, agent: Agent) -> None:
    await client.write_file("keep.txt", b"original")

    async def broken() -> AsyncIterator[bytes]:
        yield b"partial" * 100_000
        raise RuntimeError("source failed")
    with pytest.raises(RuntimeError):
        await client.write_file("keep.txt", broken())
    await client.ping()  # the cancel has been processed by now (same stream, in order)
    assert (agent.workspace / "keep.txt").read_bytes() == b"original"
    assert sorted(p.name for p in agent.workspace.iterdir()) == ["keep.txt"]


async def test_early_stop_of_a_read_releases_it(client: GuestClient, agent: Agent) -> None:
    (agent.workspace / "f").write_bytes(b"z" * (5 << 20))
    reader = client.read_file("f")
    assert len(await anext(reader)) == protocol.CHUNK
    await reader.aclose()
    assert await client.read_bytes("f") == b"z" * (5 << 20)


async def test_channel_loss_is_sandbox_gone(agent: Agent) -> None:
    client = await GuestClient.connect_unix(agent.socket)
    handle = await client.exec(["sleep", "60"])
    agent.stop()
    with pytest.raises(SandboxGone, match="no longer running"):
        await asyncio.wait_for(handle.wait(), 5)
    assert client.closed
    with pytest.raises(SandboxGone):
        await client.stat("x")
    await client.close()


# ----- hostile input ---------------------------------------------------------------------

def test_oversized_frame_disconnects_with_a_clear_error(shared_agent: Agent) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(shared_agent.socket))
        sock.sendall(struct.pack(">II", protocol.MAX_HEADER + 1, 0))
        header, _ = recv_frame(sock)
        assert header["id"] == 0 and "too large" in str(header["message"])
        assert sock.recv(1) == b""  # disconnected
    assert raw_request(shared_agent.socket, {"op": "ping", "id": 7})["ev"] == "ok"


# Operations that cannot touch the host outside the agent's own processes and workspace.
SAFE_OPS = st.sampled_from(["ping", "ps", "read", "list", "stat", "wait", "kill", "signal",
                            "resize", "credit", "stdin", "stdin_close", "data", "end", "cancel",
                            "bogus", ""])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=200),
       messages=st.lists(st.tuples(SAFE_OPS, st.dictionaries(
           st.sampled_from(["id", "path", "pid", "sig", "rows", "cols", "bytes", "argv"]), JSON,
           max_size=4), st.binary(max_size=16)), max_size=5))
def test_garbage_never_kills_the_agent(shared_agent: Agent, garbage: bytes,
                                       messages: list[tuple[str, dict[str, object], bytes]]
                                       ) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(shared_agent.socket))
        for op, fields, data in messages:
            sock.sendall(protocol.encode({**fields, "op": op}, data))
        sock.sendall(protocol.encode({"op": "ping", "id": 2**40}))
        while True:  # well-framed nonsense is answered, and the connection stays usable
            header, _ = recv_frame(sock)
            if header.get("id") == 2**40 and header["ev"] == "ok":
                break
        sock.sendall(garbage)
    assert raw_request(shared_agent.socket, {"op": "ping", "id": 1})["ev"] == "ok"
    assert shared_agent.proc.poll() is None
