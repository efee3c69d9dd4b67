"""Contract tests of issue 2 that span parts: crashes, bad input, big data, escapes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from sealbox import Sandbox
from sealbox._sys import cgroups
from sealbox.engine.engine import Engine
from sealbox.engine.spec import ExecRequest, SandboxSpec
from sealbox.errors import ConfigError, NotFoundError, SandboxError
from support.server import ADMIN_KEY, start_server

from conftest import gone


def test_server_killed_with_sigkill_then_restarted_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    ids = []
    for _ in range(2):
        r = httpx.post(f"{server.url}/v1/sandboxes", json={"runtime": "namespace"}, headers=auth,
                       timeout=60)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    httpx.post(f"{server.url}/v1/sandboxes/{ids[0]}/exec", headers=auth, timeout=60,
               json={"cmd": "sleep 600", "background": True}).raise_for_status()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    # The sandboxes' processes die with the server (no orphan keeps running)...
    def running() -> list[int]:
        return [p for sid in ids for p in cgroups.Cgroup(sid).pids()]

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running() == []
    # ...and what the kernel does not clean, the next start does.
    restarted = start_server(data)
    try:
        for sid in ids:
            assert gone(sid) == [], sid
            r = httpx.get(f"{restarted.url}/v1/sandboxes/{sid}", headers=auth)
            assert r.json()["state"] == "killed"
            assert "owner process died" in r.json()["end_reason"]
    finally:
        assert restarted.stop()


async def test_command_not_found_and_huge_output(engine: Engine) -> None:
    info = await engine.create(SandboxSpec(runtime="namespace"))
    r = await engine.run(info.id, ExecRequest(cmd="no-such-command-here"))
    assert r.exit_code == 127 and "not found" in r.stderr
    with pytest.raises(NotFoundError):
        await engine.run(info.id, ExecRequest(cmd=["/no/such/program"]))
    # 512 MiB to stdout: the engine keeps the first 16 MiB and says it dropped the rest.
    r = await engine.run(info.id, ExecRequest(cmd="head -c 536870912 /dev/zero; echo done >&2"))
    assert r.exit_code == 0 and r.truncated
    assert len(r.stdout) == 16 * 1024 * 1024
    assert r.stderr == "done\n"


def test_hundred_megabyte_file_round_trip(tmp_path: Path) -> None:
    blob = os.urandom(1024 * 1024)
    digest = hashlib.sha256(blob * 100).hexdigest()

    def chunks() -> bytes:
        return blob * 100

    with Sandbox.create(runtime="namespace", disk="512MiB", memory="1GiB") as sb:
        sb.files.write("/workspace/big.bin", chunks())
        r = sb.exec("sha256sum /workspace/big.bin")
        assert r.stdout.split()[0] == digest
        h = hashlib.sha256()
        for part in sb.files.read_stream("/workspace/big.bin"):
            h.update(part)
        assert h.hexdigest() == digest


def test_file_api_cannot_escape(tmp_path: Path) -> None:
    with Sandbox.create(runtime="namespace") as sb:
        sb.exec("ln -s /etc/shadow /workspace/shadow; ln -s / /workspace/root")
        try:  # masked inside (an empty device): nothing of the host's file either way
            assert sb.files.read("/workspace/shadow") == b""
        except ConfigError as exc:
            assert "shadow" in exc.message
        with pytest.raises((ConfigError, SandboxError)):
            sb.files.write("/workspace/../etc/passwd", b"owned")
        with pytest.raises((ConfigError, SandboxError)):
            sb.files.write("/workspace/root/usr/bin/evil", b"x")
        assert not Path("/usr/bin/evil").exists()
        host_marker = tmp_path / "host-only"
        host_marker.write_text("secret")
        with pytest.raises(NotFoundError):
            sb.files.read(str(host_marker))


def test_host_processes_are_invisible_and_unsignalable() -> None:
    with Sandbox.create(runtime="namespace") as sb:
        r = sb.exec(f"ps -e -o pid= | wc -l; kill -0 {os.getpid()} 2>&1; echo rc=$?")
        lines = r.stdout.split("\n")
        assert int(lines[0]) <= 5  # bwrap's init, the agent, this shell, ps, wc
        assert "rc=1" in r.stdout


async def test_cancelled_creates_leave_nothing(engine: Engine) -> None:
    """A create cancelled at any point (a client gone, a pool refill at shutdown) removes all
    it made, also what a worker thread was still making when the cancel came."""
    from conftest import leftovers

    before = await asyncio.to_thread(leftovers)  # pyroute2 runs its own loop
    cancelled = 0
    for delay in (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08):
        task = asyncio.create_task(engine.create(SandboxSpec(runtime="namespace")))
        await asyncio.sleep(delay)
        if task.cancel():
            cancelled += 1
        try:
            info = await task
        except asyncio.CancelledError:
            continue
        await engine.kill(info.id)  # finished before the cancel landed
    assert cancelled, "every create finished before its cancel: the test proved nothing"
    assert await asyncio.to_thread(leftovers) == before
    assert all(i.state.value in ("failed", "killed") for i in engine.list(include_ended=True))
