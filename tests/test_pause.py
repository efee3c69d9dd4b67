"""Pause and resume: frozen processes keep their state, the timeout clock stops, and a paused
sandbox survives its server being SIGKILLed (with its files; processes where the tier can)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sealbox import AsyncSandbox, Sandbox
from sealbox.engine.config import EngineConfig
from sealbox.engine.engine import Engine
from sealbox.engine.spec import ExecRequest, SandboxSpec, SandboxState, VolumeMount
from sealbox.engine.volumes import VolumeCreate
from sealbox.errors import ConflictError, SandboxError, SandboxGone
from support.counter import counted_in, counter, until_counted
from support.server import ADMIN_KEY, Server, start_server

from conftest import gone, sandbox_processes

pytestmark = pytest.mark.privileged
TIERS = ["namespace", "gvisor"]
COUNTER = counter("/data")
COUNT_SLEEPS = ("python3 -c 'import os; print(sum(open(f\"/proc/{p}/cmdline\", \"rb\").read()"
                ".startswith(b\"sleep\") for p in os.listdir(\"/proc\") if p.isdigit()))'")
SEALBOX = str(Path(sys.executable).parent / "sealbox")


def sigkill_and_restart(server: Server, data: Path) -> Server:
    """The server dies without any clean-up, and a new one starts on the same data dir."""
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    return start_server(data)


def cli_resume(server: Server, sid: str) -> str:
    """What `sealbox resume SID` prints, run against SERVER (it must succeed)."""
    env = {**os.environ, "SEALBOX_URL": server.url, "SEALBOX_API_KEY": ADMIN_KEY}
    r = subprocess.run([SEALBOX, "resume", sid], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    return r.stdout


def read_counter(path: Path) -> int:
    for _ in range(50):
        text = path.read_text().strip() if path.exists() else ""
        if text:  # never mid-write: the shell truncates then writes
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"no counter value in {path}")


def wait_counter_above(path: Path, value: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            now = int(path.read_text().strip())
            if now > value:
                return now
        time.sleep(0.05)
    raise AssertionError(f"counter in {path} did not pass {value}")


@pytest.mark.parametrize("runtime", TIERS)
async def test_counter_keeps_counting_from_where_it_was(engine: Engine, runtime: str,
                                                        data_dir: Path) -> None:
    # The counter writes into a volume so the host can read it while the sandbox is frozen.
    engine.volumes.create(VolumeCreate(name="count", size="16MiB"))
    count_file = engine.volumes.mountpoint("count") / "c"
    info = await engine.create(SandboxSpec(runtime=runtime, timeout=120,
                                           volumes=[VolumeMount(name="count", path="/data")]))
    await engine.run(info.id, ExecRequest(cmd=COUNTER, background=True))
    wait_counter_above(count_file, 5)
    paused = await engine.pause(info.id)
    assert paused.state == SandboxState.paused and paused.paused_at is not None
    at_pause = read_counter(count_file)
    time.sleep(1.0)  # ten ticks of the counter, were it running
    assert read_counter(count_file) == at_pause
    with pytest.raises(SandboxError, match="paused"):
        await engine.run(info.id, ExecRequest(cmd="true"))
    with pytest.raises(SandboxError, match="paused"):
        await engine.pause(info.id)
    resumed = await engine.resume(info.id)
    assert resumed.state == SandboxState.running and resumed.paused_at is None
    assert resumed.resumed_processes is True
    assert not (data_dir / "paused" / info.id).exists()  # secrets at rest only while paused
    after = wait_counter_above(count_file, at_pause)
    # The same shell kept its variable: it continued from where it was, not from 1.
    assert at_pause < after <= at_pause + 50
    with pytest.raises(SandboxError, match="not paused"):
        await engine.resume(info.id)
    await engine.kill(info.id)
    assert gone(info.id) == []


async def test_timeout_clock_stops_while_paused(engine: Engine) -> None:
    info = await engine.create(SandboxSpec(runtime="namespace", timeout=3))
    assert info.expires_at is not None
    await engine.pause(info.id)
    time.sleep(5)  # longer than the whole timeout
    resumed = await engine.resume(info.id)
    assert resumed.state == SandboxState.running
    assert resumed.expires_at is not None and resumed.expires_at > info.expires_at
    r = await engine.run(info.id, ExecRequest(cmd="echo alive"))
    assert r.stdout == "alive\n"
    ended = await engine.wait(info.id)
    assert ended.state == SandboxState.killed
    assert ended.end_reason == "sandbox timeout reached (limit 3s)"
    assert gone(info.id) == []


@pytest.mark.parametrize("runtime", [*TIERS, "microvm"])
async def test_kill_while_paused_cleans_everything(engine: Engine, runtime: str,
                                                   data_dir: Path) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime))
    await engine.run(info.id, ExecRequest(cmd="sleep 600", background=True))
    await engine.run(info.id, ExecRequest(cmd="echo x > /workspace/f"))
    await engine.pause(info.id)
    assert (data_dir / "paused" / info.id).is_dir()
    killed = await engine.kill(info.id)
    assert killed.state == SandboxState.killed
    assert gone(info.id) == []
    assert not (data_dir / "paused" / info.id).exists()


@pytest.mark.parametrize("runtime", TIERS)
def test_paused_sandbox_survives_server_sigkill(tmp_path: Path, runtime: str) -> None:
    data = tmp_path / "data"
    secret_value = "real-secret-never-stored-9f8e7d"
    server = start_server(data)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.url, timeout=90, headers=auth) as c:
        r = c.post("/v1/sandboxes", json={
            "runtime": runtime, "timeout": "10m", "memory": "256MiB", "env": {"K": "v"},
            "allow_net": ["api.example.com"],
            "secrets": {"TOKEN": {"value": secret_value, "hosts": ["api.example.com"]}},
        })
        assert r.status_code == 201, r.text
        created = r.json()
        sid = created["id"]
        c.post(f"/v1/sandboxes/{sid}/exec", json={
            "cmd": "mkdir -p /workspace/sub && echo hello > /workspace/sub/f && "
                   "head -c 3000000 /dev/urandom > /workspace/blob && sha256sum /workspace/blob"
                   " > /workspace/sum && ln -s /root /workspace/rootlink && "
                   "ln -s ../../../../etc /workspace/sub/up"}).raise_for_status()
        c.post(f"/v1/sandboxes/{sid}/exec",
               json={"cmd": "sleep 600", "background": True}).raise_for_status()
        paused = c.post(f"/v1/sandboxes/{sid}/pause").json()
        assert paused["state"] == "paused" and paused["paused_at"]
    saved = data / "paused" / sid / "resume.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    # Encrypted at rest: neither the value nor the secret's name is readable in the file.
    assert secret_value.encode() not in saved.read_bytes()
    assert b"TOKEN" not in saved.read_bytes()
    # The host keeps the sandbox's files as one opaque tar: nothing it wrote is unpacked here.
    assert sorted(p.name for p in saved.parent.iterdir()) == ["resume.json", "workspace.tar"]
    restarted = sigkill_and_restart(server, data)
    try:
        # Still there, still paused; what the dead server ran is cleaned up meanwhile.
        with httpx.Client(base_url=restarted.url, timeout=90, headers=auth) as c:
            info = c.get(f"/v1/sandboxes/{sid}").json()
            assert info["state"] == "paused", info
            assert "processes" in info["resume_note"]
            assert [i["id"] for i in c.get("/v1/sandboxes").json()] == [sid]
            r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"})
            assert r.status_code == 409 and "resume it first" in r.json()["error"]["message"]
        assert gone(sid) == []
        assert secret_value.encode() not in (data / "state.db").read_bytes()
        # `sealbox resume` says plainly that processes did not come back.
        assert "processes NOT restored" in cli_resume(restarted, sid)
        with Sandbox.connect(sid, url=restarted.url, api_key=ADMIN_KEY) as sb:
            assert sb.info.state == SandboxState.running
            assert sb.info.resumed_processes is False
            assert sb.info.memory == 256 * 1024**2 and sb.info.allow_net == ["api.example.com"]
            assert sb.info.created_at.isoformat().startswith(created["created_at"][:19])
            assert sb.exec("cat /workspace/sub/f").stdout == "hello\n"
            assert sb.exec("sha256sum -c /workspace/sum").exit_code == 0
            r1 = sb.exec("readlink /workspace/rootlink /workspace/sub/up")
            assert r1.stdout == "/root\n../../../../etc\n"
            # Policy and secrets are back: the placeholder, never the value, is in the env.
            r2 = sb.exec("echo $K $TOKEN; " + COUNT_SLEEPS)
            assert r2.stdout.startswith("v ") and secret_value not in r2.stdout
            assert r2.stdout.split()[1] == sb.info.secrets["TOKEN"].placeholder
            assert r2.stdout.split()[-1] == "0"  # the sleep did not survive: as reported
        assert not (data / "paused" / sid).exists()
        assert gone(sid) == []
    finally:
        assert restarted.stop()


def test_cli_and_sdk_pause_resume(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    env = {**os.environ, "SEALBOX_URL": server.url, "SEALBOX_API_KEY": ADMIN_KEY}
    try:
        sb = Sandbox.create(runtime="namespace", url=server.url, api_key=ADMIN_KEY)
        try:
            r = subprocess.run([SEALBOX, "pause", sb.id], capture_output=True, text=True, env=env)
            assert r.returncode == 0 and f"paused {sb.id}" in r.stdout, r.stderr
            r = subprocess.run([SEALBOX, "exec", sb.id, "--", "true"], capture_output=True,
                               text=True, env=env)
            assert r.returncode == 1 and "paused" in r.stderr and "Traceback" not in r.stderr
            again = Sandbox.resume(sb.id, url=server.url, api_key=ADMIN_KEY)
            assert again.id == sb.id and again.info.resumed_processes is True
            assert again.exec("echo ok").stdout == "ok\n"
            again.disconnect()
            assert sb.pause().state == SandboxState.paused
            assert sb.resume().state == SandboxState.running
            r = subprocess.run([SEALBOX, "resume", "sbnosuchsandbox"], capture_output=True,
                               text=True, env=env)
            assert r.returncode == 1 and "no sandbox" in r.stderr
        finally:
            sb.close()
    finally:
        assert server.stop()


@pytest.mark.parametrize("runtime", [*TIERS, "microvm"])
async def test_paused_sandbox_outlives_engine_shutdown_with_its_volume(
        data_dir: Path, runtime: str) -> None:
    """A graceful shutdown (SIGTERM, embedded engine closed) keeps a paused sandbox resumable,
    with its volume claim; nothing stays mounted meanwhile. Its processes end, except on
    microvm, which paused to disk with them (and with the volume's disk)."""
    first = Engine(EngineConfig(data_dir=data_dir))
    await first.start()
    first.volumes.create(VolumeCreate(name="keep", size="16MiB"))
    vol = first.volumes.mountpoint("keep")
    try:
        info = await first.create(SandboxSpec(
            runtime=runtime, timeout=600, volumes=[VolumeMount(name="keep", path="/data")]))
        await first.run(info.id, ExecRequest(cmd="echo v > /data/f && echo w > /workspace/f"))
        await first.run(info.id, ExecRequest(cmd="sleep 600", background=True))
        await first.pause(info.id)
    finally:
        await first.close()
    assert gone(info.id) == [] and not vol.exists()
    second = Engine(EngineConfig(data_dir=data_dir))
    await second.start()
    try:
        assert second.get(info.id).state == SandboxState.paused
        # The paused sandbox still holds its volume: no other writer meanwhile.
        with pytest.raises(ConflictError):
            await second.create(SandboxSpec(runtime=runtime,
                                            volumes=[VolumeMount(name="keep", path="/d")]))
        resumed = await second.resume(info.id)
        kept = runtime == "microvm"
        assert resumed.resumed_processes is kept and resumed.volumes == info.volumes
        r = await second.run(info.id, ExecRequest(cmd="cat /data/f /workspace/f; " + COUNT_SLEEPS))
        assert r.stdout == f"v\nw\n{int(kept)}\n", r
        r = await second.run(info.id, ExecRequest(cmd="echo again >> /data/f && cat /data/f"))
        assert r.stdout == "v\nagain\n", r
        await second.kill(info.id)
        assert not vol.exists() and gone(info.id) == []
    finally:
        await second.close()


def test_microvm_paused_to_disk_survives_server_sigkill_with_its_processes(
        tmp_path: Path) -> None:
    """microvm pauses to disk: nothing of the sandbox stays on the host while paused, and a
    server that dies (SIGKILL) and starts again resumes the same processes and memory."""
    data = tmp_path / "data"
    secret_value = "real-secret-never-in-the-vm-5c4b3a"
    server = start_server(data)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.url, timeout=120, headers=auth) as c:
        r = c.post("/v1/sandboxes", json={
            "runtime": "microvm", "timeout": "10m", "env": {"K": "v"},
            "allow_net": ["api.example.com"],
            "secrets": {"TOKEN": {"value": secret_value, "hosts": ["api.example.com"]}}})
        assert r.status_code == 201, r.text
        sid, placeholder = r.json()["id"], r.json()["secrets"]["TOKEN"]["placeholder"]
        c.post(f"/v1/sandboxes/{sid}/exec",
               json={"cmd": counter(), "background": True}).raise_for_status()
        r = c.post(f"/v1/sandboxes/{sid}/exec", json={
            "cmd": until_counted() + "; head -c 2000000 /dev/urandom > /tmp/blob; "
                   "sha256sum /tmp/blob"})
        blob_sum = r.json()["stdout"]
        assert blob_sum, r.text
        paused = c.post(f"/v1/sandboxes/{sid}/pause").json()
        assert paused["state"] == "paused" and paused["resume_note"] is None, paused
        # Freed while paused, even with its server alive: no VM, netns, cgroup or veth.
        assert gone(sid) == [] and not [p for p in sandbox_processes()
                                         if sid.encode() in Path(f"/proc/{p}/cmdline")
                                         .read_bytes()]
    saved = data / "paused" / sid
    assert sorted(p.name for p in saved.iterdir()) == ["checkpoint", "resume.json",
                                                       "workspace.tar"]
    assert saved.stat().st_mode & 0o777 == 0o700
    state = b"".join(f.read_bytes() for f in (saved / "checkpoint").iterdir())
    assert b"sealbox-secret-" in state  # the VM's memory is in there...
    assert secret_value.encode() not in state  # ...and the real value never was
    at_pause = counted_in(saved / "workspace.tar")
    restarted = sigkill_and_restart(server, data)
    try:
        with httpx.Client(base_url=restarted.url, timeout=120, headers=auth) as c:
            info = c.get(f"/v1/sandboxes/{sid}").json()
            assert info["state"] == "paused" and info["resume_note"] is None, info
        assert "processes and memory as they were" in cli_resume(restarted, sid)
        with Sandbox.connect(sid, url=restarted.url, api_key=ADMIN_KEY) as sb:
            assert sb.info.resumed_processes is True
            assert sb.info.secrets["TOKEN"].placeholder == placeholder
            after = int(sb.exec("cat /workspace/c").stdout)
            assert at_pause <= after < at_pause + 40, (at_pause, after)  # not from 1 again
            assert sb.exec("sha256sum /tmp/blob").stdout == blob_sum  # memory-only tmpfs
            assert sb.exec("echo $K $TOKEN").stdout == f"v {placeholder}\n"
        assert not saved.exists()
        with httpx.Client(base_url=restarted.url, timeout=120, headers=auth) as c:
            c.delete(f"/v1/sandboxes/{sid}").raise_for_status()
        assert gone(sid) == []
    finally:
        assert restarted.stop()


async def test_microvm_pause_to_disk_ends_a_running_command_clearly(engine: Engine) -> None:
    info = await engine.create(SandboxSpec(runtime="microvm", timeout=300))
    try:
        running = asyncio.ensure_future(engine.run(info.id, ExecRequest(cmd="sleep 120")))
        await asyncio.sleep(1)
        await engine.pause(info.id)
        with pytest.raises(SandboxGone, match="paused to disk while this command ran"):
            await running
        await engine.resume(info.id)
        r = await engine.run(info.id, ExecRequest(cmd=COUNT_SLEEPS))
        assert r.stdout == "0\n", r  # ended, as the error said: nothing runs on unseen
    finally:
        await engine.kill(info.id)
    assert gone(info.id) == []


async def test_async_sdk_pause_and_resume_by_id(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    opts = {"url": server.url, "api_key": ADMIN_KEY}
    try:
        async with await AsyncSandbox.create(runtime="namespace", timeout=60, **opts) as sb:
            await sb.exec("echo kept > /workspace/f")
            info = await sb.pause()
            assert info.state == SandboxState.paused and info.paused_at is not None
            again = await AsyncSandbox.resume(sb.id, **opts)
            try:
                assert again.info.state == SandboxState.running
                assert (await again.exec("cat /workspace/f")).stdout == "kept\n"
            finally:
                await again.disconnect()
    finally:
        assert server.stop()
