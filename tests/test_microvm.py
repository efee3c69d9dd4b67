"""The microvm tier: a guest kernel of its own, its memory size, files, networking, cleanup.

The boot tests need the assets: run ``scripts/microvm-assets`` once (a few minutes; it builds
the kernel, initramfs and /usr image under /var/lib/sealbox/microvm).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import RUN_ROOT

from sealbox._sys import cgroups, netns, tap
from sealbox.engine.engine import Engine, netns_name
from sealbox.engine.spec import ExecRequest, SandboxSpec, SandboxState
from sealbox.runtimes import microvm
from sealbox.runtimes.base import LaunchSpec, Limits
from sealbox.runtimes.microvm_image import Assets, sandbox_archive

needs_assets = pytest.mark.skipif(
    Assets.load() is None, reason="microvm assets missing: run scripts/microvm-assets")


def test_sandbox_archive_unpacks_with_parents() -> None:
    archive = sandbox_archive({"a/b/c.txt": b"hello", "top": b"\x00\xff"})
    r = subprocess.run(["busybox", "cpio", "-t"], input=archive, capture_output=True,
                       check=True)
    assert r.stdout.decode().split() == ["a", "a/b", "a/b/c.txt", "top"]


def test_guest_config_survives_any_env_value(tmp_path: Path) -> None:
    odd = "it's \"quoted\"\n$HOME `x` \\ ; rm -rf /"
    spec = LaunchSpec(sandbox_id="sbtest", netns="none", run_dir=tmp_path / "run",
                      limits=Limits(disk_bytes=1 << 30, pids=64), env={"ODD": odd},
                      hostname="host-1")
    microvm.prepare_run_dir(spec)
    config = microvm.guest_files(spec, tap.GuestNet("10.0.0.2/30", "10.0.0.1"))
    script = tmp_path / "config.sh"
    script.write_bytes(config[".init/sandbox/config.sh"])
    r = subprocess.run(
        ["busybox", "sh", "-c", (f'. {script}; printf "%s\\0" "$SBX_HOSTNAME" "$SBX_ADDRESS" '
                                 '"$SBX_GATEWAY" "$SBX_DISK" "$SBX_NPROC" "$@"')],
        capture_output=True, check=True)
    values = r.stdout.decode().split("\0")[:-1]
    assert values[:5] == ["host-1", "10.0.0.2/30", "10.0.0.1", str(1 << 30), "64"]
    assert f"ODD={odd}" in values
    assert values[-7:] == ["/usr/bin/python3", "-I", "/.sealbox/agent.py", "--serial",
                           "/dev/virtio-ports/sealbox", "--pids-events",
                           "/.init/cgroup/sandbox/pids.events"]


@needs_assets
@pytest.mark.slow
def test_probe_explains_accelerator() -> None:
    probe = microvm.MicrovmRuntime().probe()
    assert probe.ok, probe.detail
    assert probe.detail.startswith(("qemu microvm, KVM", "qemu microvm, TCG"))


def _host_qemu_pids(sandbox_id: str) -> list[int]:
    return cgroups.Cgroup(sandbox_id).pids() if cgroups.Cgroup(sandbox_id).exists() else []


@needs_assets
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_guest_kernel_memory_files_and_network(engine: Engine) -> None:
    info = await engine.create(SandboxSpec(runtime="microvm", memory="384MiB", cpus=1))
    sid = info.id
    try:
        r = await engine.run(sid, ExecRequest(cmd="uname -r; grep MemTotal /proc/meminfo; "
                                                  "id -u; pwd; hostname; echo $SEALBOX_SANDBOX_ID"))
        assert r.exit_code == 0, r.stderr
        release, _, mem_kb, _, uid, cwd, host, env_id = r.stdout.split()
        assert release != os.uname().release and release.endswith("-cloud-amd64")
        # The guest kernel keeps some of the VM's RAM for itself.
        assert 0.8 * 384 * 1024 < int(mem_kb) <= 384 * 1024
        assert (uid, cwd, host, env_id) == ("1000", "/workspace", sid, sid)

        guest = engine.guest(sid)
        payload = os.urandom(200_000)
        await guest.write_file("/workspace/blob.bin", payload)
        assert await guest.read_bytes("/workspace/blob.bin") == payload
        r = await engine.run(sid, ExecRequest(cmd="sha256sum /workspace/blob.bin"))
        import hashlib
        assert r.stdout.split()[0] == hashlib.sha256(payload).hexdigest()

        # The sandbox address moved onto the guest's card; the namespace only switches frames.
        r = await engine.run(sid, ExecRequest(cmd="ip -4 -o addr show dev eth0; ip route"))
        assert r.exit_code == 0 and " inet 10." in r.stdout and "default via" in r.stdout, r
        assert tap.has_tap(netns_name(sid))
        assert tap.guest_net(netns_name(sid)) is None
    finally:
        await engine.kill(sid)
    assert not netns.exists(netns_name(sid))
    assert not _host_qemu_pids(sid)


ESCAPE_PIDS_CGROUP = (
    "for t in 'echo 100000 > /.init/cgroup/sandbox/pids.max' "
    "'echo $$ > /.init/cgroup/cgroup.procs' 'echo max > /.init/cgroup/sandbox/pids.max' "
    "'mkdir /.init/cgroup/mine' 'umount /.init/cgroup' "
    # Guest root's control port (clock, network, randomness) is not the sandbox user's.
    "'echo sync > /dev/virtio-ports/sealbox-ctl' 'head -c1 /dev/virtio-ports/sealbox-ctl' "
    "'echo 1 2 3 > /dev/vport0p2'; do "
    "sh -c \"$t\" 2>/dev/null && echo \"ESCAPED: $t\"; done; "
    "test -c /dev/virtio-ports/sealbox-ctl && echo ctl-present; "
    "cat /.init/cgroup/sandbox/pids.max; grep -c . /.init/cgroup/sandbox/cgroup.procs >/dev/null"
    " && grep -qx \"$$\" /.init/cgroup/sandbox/cgroup.procs && echo inside")


@needs_assets
@pytest.mark.timeout(300)
@pytest.mark.parametrize("memory", ["512MiB", "256MiB"], ids=["restored", "cold-boot"])
async def test_pids_limit_is_a_guest_cgroup_the_sandbox_cannot_leave(engine: Engine,
                                                                     memory: str) -> None:
    """Restored from the snapshot template (512 MiB) or booted cold (256 MiB), the sandbox's
    processes sit in a pids cgroup whose limit they can read but not raise or leave, and guest
    root's control port is out of their reach."""
    info = await engine.create(SandboxSpec(runtime="microvm", memory=memory, pids=64))
    try:
        r = await engine.run(info.id, ExecRequest(cmd=ESCAPE_PIDS_CGROUP))
        assert "ESCAPED" not in r.stdout, r
        assert r.stdout.split() == ["ctl-present", "64", "inside"], r
    finally:
        await engine.kill(info.id)


@needs_assets
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_killing_qemu_ends_the_sandbox_and_leaves_nothing(engine: Engine) -> None:
    info = await engine.create(SandboxSpec(runtime="microvm"))
    sid = info.id
    pids = _host_qemu_pids(sid)
    assert len(pids) == 1
    assert Path(f"/proc/{pids[0]}/exe").resolve().name.startswith("qemu-system")
    os.kill(pids[0], signal.SIGKILL)
    ended = await asyncio.wait_for(engine.wait(sid), 30)
    assert ended.state in (SandboxState.stopped, SandboxState.failed)
    assert not netns.exists(netns_name(sid))
    assert not cgroups.Cgroup(sid).exists()
    assert not (RUN_ROOT / sid).exists()
    assert not Path(f"/proc/{pids[0]}").exists()


@needs_assets
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_runtime_kill_removes_tap_and_files() -> None:
    """Driven without the engine: kill() alone must undo what the tier set up in the netns."""
    ns, peer = "sealbox-mvmtest", "sealbox-mvmpeer"
    # Where the engine puts run dirs: QEMU's unprivileged uid must reach its socket there.
    spec = LaunchSpec(sandbox_id="sbmvmtest", netns=ns, run_dir=RUN_ROOT / "sbmvmtest",
                      limits=Limits(memory_bytes=256 << 20))
    # A refused connection proves the path: the peer's kernel answered through br0 and tap0.
    probe = ("import socket\ntry: socket.create_connection(('10.99.0.1', 9), timeout=10)\n"
             "except ConnectionRefusedError: print('refused')")
    sb = None
    try:
        await asyncio.to_thread(_veth_pair, ns, peer)
        sb = await microvm.MicrovmRuntime().start(spec)
        client = await sb.connect()
        handle = await client.exec(["python3", "-c", probe])
        out, err, _ = await handle.collect()
        assert out == b"refused\n", (out, err)
        handle = await client.exec(["cat", "/proc/cmdline"])
        assert b"panic=-1" in (await handle.collect())[0]
        assert tap.has_tap(ns)
        await client.close()
        await sb.kill()
        exit_info = await sb.wait()
        assert exit_info.code is not None
        assert not tap.has_tap(ns)
        assert not cgroups.Cgroup(spec.sandbox_id).exists()
        assert not (spec.run_dir / "private").exists()
    finally:
        if sb is not None:
            await sb.kill()
        for name in (ns, peer):
            await asyncio.to_thread(netns.delete, name)
        shutil.rmtree(spec.run_dir, ignore_errors=True)


def _veth_pair(ns: str, peer: str) -> None:
    """NS gets eth0 = 10.99.0.2/30 with a default route to PEER's end, as the engine sets up."""
    for name in (ns, peer):
        netns.create(name)
    for cmd in (f"-n {ns} link add eth0 type veth peer name gw0 netns {peer}",
                f"-n {ns} addr add 10.99.0.2/30 dev eth0", f"-n {ns} link set eth0 up",
                f"-n {ns} route add default via 10.99.0.1",
                f"-n {peer} addr add 10.99.0.1/30 dev gw0", f"-n {peer} link set gw0 up"):
        subprocess.run(["ip", *cmd.split()], check=True)


def test_probe_refuses_a_qemu_without_mapped_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved VMs are mapped copy-on-write, which needs QEMU 9.0: an older one is refused with
    what to do, before anything boots."""
    if shutil.which(microvm.QEMU) is None:
        pytest.skip(f"{microvm.QEMU} is not installed")
    real = microvm.qemu_version()
    assert real is not None and real >= microvm.MIN_QEMU, real  # what setup installs
    monkeypatch.setattr(microvm, "qemu_version", lambda: (7, 2))
    probe, accel = microvm._probe_uncached()
    assert not probe.ok and accel is None
    assert "QEMU 7.2 is too old" in probe.detail and "bookworm-backports" in probe.detail
