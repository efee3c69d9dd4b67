"""The namespace tier holds: filesystem view, users, capabilities, seccomp, limits, cleanup."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import RUN_ROOT

from sealbox._sys import cgroups, netns
from sealbox.engine.engine import Engine, netns_name
from sealbox.engine.spec import ExecRequest, SandboxSpec, SandboxState
from sealbox.errors import SandboxGone
from sealbox.runtimes.namespace import HOST_UID_BASE, HOST_UID_SPAN


async def sh(engine: Engine, sid: str, script: str, **kw: object):  # type: ignore[no-untyped-def]
    return await engine.run(sid, ExecRequest(cmd=script, **kw))  # type: ignore[arg-type]


async def new(engine: Engine, **spec: object) -> str:
    info = await engine.create(SandboxSpec(runtime="namespace", **spec))  # type: ignore[arg-type]
    return info.id


async def test_exec_and_identity(engine: Engine) -> None:
    sid = await new(engine)
    r = await sh(engine, sid, "python3 -c 'print(6*7)'; id -u; hostname; pwd; echo $SEALBOX_SANDBOX_ID")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["42", "1000", sid, "/workspace", sid]


async def test_runs_as_unprivileged_host_uid_without_capabilities(engine: Engine) -> None:
    sid = await new(engine)
    r = await sh(engine, sid, "grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status")
    caps = dict(line.split(":\t") for line in r.stdout.splitlines() if line.startswith("Cap"))
    assert caps["CapEff"].strip() == "0000000000000000"
    assert caps["CapPrm"].strip() == "0000000000000000"
    # Seen from the host, every process of the sandbox runs as its own unprivileged uid.
    pids = cgroups.Cgroup(sid).pids()
    assert pids
    for pid in pids:
        host_uid = Path(f"/proc/{pid}").stat().st_uid
        assert HOST_UID_BASE <= host_uid < HOST_UID_BASE + HOST_UID_SPAN


async def test_host_secrets_and_private_dirs_are_invisible(engine: Engine, tmp_path: Path) -> None:
    marker = Path("/tmp") / f"sealbox-host-marker-{os.getpid()}"
    marker.write_text("host-only")
    try:
        sid = await new(engine)
        r = await sh(engine, sid, textwrap.dedent(f"""
            ls -A /root 2>&1; echo "--"; ls -A /home; echo "--"
            cat /etc/shadow | wc -c; echo "--"
            test -e {marker} && echo MARKER-VISIBLE; echo "--"
            ls -A /run; echo "--"
            test -e /var/run/docker.sock && echo DOCKER; test -e {engine.config.data_dir} && echo DATA
            ls /etc/ssh 2>/dev/null | wc -l
        """))
        parts = [p.strip() for p in r.stdout.split("--")]
        assert "No such file" in parts[0]
        assert parts[1] == ""
        assert parts[2] == "0"
        assert "MARKER-VISIBLE" not in r.stdout
        assert parts[4] == "sealbox"  # only the gateway's CA certificate lives there
        assert "DOCKER" not in r.stdout and "DATA" not in r.stdout
        assert parts[5].splitlines()[-1] == "0"
    finally:
        marker.unlink()


async def test_system_dirs_are_read_only_and_workspace_writable(engine: Engine) -> None:
    sid = await new(engine)
    r = await sh(engine, sid, "touch /usr/x 2>&1; touch /etc/x 2>&1; touch /x 2>&1;"
                              " echo hi > /workspace/f && cat /workspace/f; echo t > /tmp/t && cat /tmp/t")
    assert r.stdout.count("Read-only file system") == 3, r.stdout
    assert r.stdout.strip().endswith("hi\nt")


@pytest.mark.parametrize("script", [
    "unshare --user true",
    "unshare --mount true",
    "unshare --net true",
    "mount -t tmpfs none /tmp",
    "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True);"
    " sys.exit(0 if l.syscall(250, 0, 0, 0, 0)==0 else 1)'",  # keyctl
    "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True);"
    " sys.exit(0 if l.syscall(321, 0, 0, 0)>=0 else 1)'",  # bpf
    "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True);"
    " sys.exit(0 if l.syscall(298, 0, 0, -1, -1, 0)>=0 else 1)'",  # perf_event_open
    "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True);"
    " sys.exit(0 if l.syscall(246, 0, 0, 0, 0)==0 else 1)'",  # kexec_load
])
async def test_dangerous_syscalls_are_refused(engine: Engine, script: str) -> None:
    sid = await new(engine)
    r = await sh(engine, sid, script)
    assert r.exit_code != 0, f"{script!r} succeeded inside the sandbox"


async def test_only_loopback_without_egress(engine: Engine) -> None:
    sid = await new(engine)
    r = await sh(engine, sid, "python3 -c \"import socket; print(socket.if_nameindex())\"")
    names = {n for _, n in eval(r.stdout)}
    assert "lo" in names
    assert names <= {"lo", "eth0"}


async def test_memory_limit_kills_and_says_so(engine: Engine) -> None:
    sid = await new(engine, memory="128MiB")
    r = await sh(engine, sid, "python3 -c 'x = bytearray(600*1024*1024); print(len(x))'")
    assert r.exit_code != 0
    assert r.limit is not None and "out of memory" in r.limit and "128 MiB" in r.limit
    again = await sh(engine, sid, "echo still-alive")
    assert again.stdout == "still-alive\n"


async def test_pids_limit_contains_fork_bomb(engine: Engine) -> None:
    sid = await new(engine, pids=40)
    r = await sh(engine, sid, "for i in $(seq 100); do sleep 5 & done; wait", timeout=20)
    assert r.limit is not None and "process limit" in r.limit
    assert "Resource temporarily unavailable" in r.stderr or "fork" in r.stderr
    assert len(cgroups.Cgroup(sid).pids()) <= 40


async def test_cpu_quota_is_enforced(engine: Engine) -> None:
    sid = await new(engine, cpus=0.2)
    await sh(engine, sid, "timeout 1 sh -c 'while :; do :; done'; true")
    cg = cgroups.Cgroup(sid)
    if cgroups.is_v2():
        stat = (cgroups.ROOT / cgroups.GROUP / sid / "cpu.stat").read_text()
    else:
        stat = (cgroups.ROOT / "cpu" / cgroups.GROUP / sid / "cpu.stat").read_text()
    throttled = int(dict(line.split() for line in stat.splitlines())["nr_throttled"])
    assert throttled > 0, stat
    assert cg.exists()


async def test_disk_quota(engine: Engine) -> None:
    sid = await new(engine, disk="20MiB")
    r = await sh(engine, sid, "dd if=/dev/zero of=/workspace/big bs=1M count=50 2>&1; "
                              "du -m /workspace/big | cut -f1")
    assert "No space left on device" in r.stdout
    assert int(r.stdout.split()[-1]) <= 20


async def test_timeout_ends_sandbox_and_cleans_up(engine: Engine) -> None:
    sid = await new(engine, timeout=2)
    with pytest.raises(SandboxGone):
        await sh(engine, sid, "sleep 30")
    info = await engine.wait(sid)
    assert info.state == SandboxState.killed
    assert info.end_reason is not None and "timeout" in info.end_reason
    assert_gone(sid)


def assert_gone(sid: str) -> None:
    assert not netns.exists(netns_name(sid))
    assert not cgroups.Cgroup(sid).exists()
    assert not (RUN_ROOT / sid).exists()


async def test_kill_leaves_nothing(engine: Engine) -> None:
    sid = await new(engine)
    await engine.run(sid, ExecRequest(cmd="sleep 1000 & sleep 1000 & echo started", background=False))
    pids = cgroups.Cgroup(sid).pids()
    assert len(pids) >= 3
    await engine.kill(sid)
    assert_gone(sid)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/status").read_text().find("zombie") >= 0


async def test_sandboxes_cannot_see_each_other(engine: Engine) -> None:
    a, b = await new(engine), await new(engine)
    await engine.run(a, ExecRequest(cmd="sleep 100 & echo x > /workspace/secret-a"))
    r = await sh(engine, b, "ps -e -o comm | grep -c sleep; ls /workspace")
    assert r.stdout.split()[0] == "0"
    assert "secret-a" not in r.stdout


def test_dead_owner_is_reconciled(data_dir: Path) -> None:
    """A CLI/server killed with SIGKILL leaves state; the next engine start removes all of it."""
    script = textwrap.dedent(f"""
        import asyncio, os, sys
        from pathlib import Path
        from sealbox.engine.config import EngineConfig
        from sealbox.engine.engine import Engine
        from sealbox.engine.spec import SandboxSpec
        async def main():
            e = Engine(EngineConfig(data_dir=Path({str(data_dir)!r})))
            await e.start()
            info = await e.create(SandboxSpec(runtime="namespace"))
            print(info.id, flush=True)
            os.kill(os.getpid(), 9)
        asyncio.run(main())
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    sid = r.stdout.strip()
    assert sid.startswith("sb"), r.stderr
    # --die-with-parent ends the processes; namespace, cgroup and run dir are still there.
    assert netns.exists(netns_name(sid))

    async def restart() -> list[str]:
        e = Engine(__import__("sealbox.engine.config", fromlist=["EngineConfig"]).EngineConfig(
            data_dir=data_dir))
        await e.start()
        try:
            return [i.id for i in e.list(include_ended=True) if i.state == SandboxState.killed]
        finally:
            await e.close()

    killed = asyncio.run(restart())
    assert sid in killed
    assert_gone(sid)
