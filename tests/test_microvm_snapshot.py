"""Snapshot fast start of the microvm tier: restored VMs work, differ, and fall back to cold boots.

The VM tests need the assets (``scripts/microvm-assets``); the first one builds the template
(one cold boot) under /var/lib/sealbox/microvm/templates.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import RUN_ROOT
from test_microvm import _veth_pair

from sealbox._sys import netns
from sealbox.engine.engine import Engine
from sealbox.engine.spec import ExecRequest, SandboxSpec
from sealbox.runtimes import microvm, microvm_snapshot
from sealbox.runtimes.base import LaunchSpec, Limits
from sealbox.runtimes.microvm_image import Assets

needs_vm = pytest.mark.skipif(
    Assets.load() is None or shutil.which(microvm.QEMU) is None,
    reason="microvm assets or QEMU missing: run scripts/microvm-assets")


def _started(sandbox_id: str) -> str:
    """How the VM started, as the tier recorded it at the top of its console log."""
    return (RUN_ROOT / sandbox_id / "private" / "console.log").read_text().splitlines()[0]


def test_template_key_follows_its_inputs(tmp_path: Path) -> None:
    f = tmp_path / "kernel"
    f.write_bytes(b"a")
    key = microvm_snapshot.template_key(["qemu", "-m", "512M"], [f])
    assert key == microvm_snapshot.template_key(["qemu", "-m", "512M"], [f])
    assert key != microvm_snapshot.template_key(["qemu", "-m", "384M"], [f])
    f.write_bytes(b"bb")
    assert key != microvm_snapshot.template_key(["qemu", "-m", "512M"], [f])


def test_other_sizes_and_the_switch_mean_cold_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    assets = Assets(Path("/k"), Path("/i"), Path("/u"), "6.1")
    accel = microvm.Accel("tcg", (), "")
    template, why = microvm.template_for(assets, accel, 384 << 20, 1)
    assert template is None and "no snapshot for 384 MiB/1 vCPU" in why
    monkeypatch.setenv(microvm_snapshot.SNAPSHOT_ENV, "0")
    template, why = microvm.template_for(assets, accel, microvm.DEFAULT_MEMORY, 1)
    assert template is None and why == "SEALBOX_MICROVM_SNAPSHOT=0"


@needs_vm
@pytest.mark.timeout(300)
async def test_restored_vms_run_commands_and_do_not_share_randomness(engine: Engine) -> None:
    ids: list[str] = []
    try:
        for _ in range(2):
            ids.append((await engine.create(SandboxSpec(runtime="microvm"))).id)
        seen = []
        for sid in ids:
            assert _started(sid).startswith("sealbox: restored from template"), _started(sid)
            r = await engine.run(sid, ExecRequest(
                cmd="uname -r; cat /proc/sys/kernel/random/uuid; "
                    "head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"))
            assert r.exit_code == 0, r.stderr
            release, uuid, noise = r.stdout.split()
            assert release != os.uname().release and release.endswith("-cloud-amd64")
            seen.append((uuid, noise))
            payload = os.urandom(100_000)
            guest = engine.guest(sid)
            await guest.write_file("/workspace/blob.bin", payload)
            assert await guest.read_bytes("/workspace/blob.bin") == payload
            r = await engine.run(sid, ExecRequest(cmd="sha256sum blob.bin"))
            assert r.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
        (uuid_a, noise_a), (uuid_b, noise_b) = seen
        assert uuid_a != uuid_b and noise_a != noise_b
    finally:
        for sid in ids:
            await engine.kill(sid)


@needs_vm
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_restored_vm_takes_identity_limits_clock_and_network() -> None:
    """Driven without the engine, on a namespace whose peer answers: frames cross the tap the
    restored VM was given, and every per-sandbox setting is this sandbox's, not the template's."""
    ns, peer = "sealbox-snaptest", "sealbox-snappeer"
    spec = LaunchSpec(sandbox_id="sbsnaptest", netns=ns, run_dir=RUN_ROOT / "sbsnaptest",
                      limits=Limits(disk_bytes=64 << 20, pids=77), env={"GREETING": "hi there"},
                      hostname="snap-host")
    probe = ("import socket\ntry: socket.create_connection(('10.99.0.1', 9), timeout=10)\n"
             "except ConnectionRefusedError: print('refused')")
    sb = None
    try:
        await asyncio.to_thread(_veth_pair, ns, peer)
        sb = await microvm.MicrovmRuntime().start(spec)
        assert sb.boot.startswith("restored from template"), sb.boot
        client = await sb.connect()
        handle = await client.exec(["python3", "-c", probe])
        assert (await handle.collect())[0] == b"refused\n"
        handle = await client.exec(["sh", "-c", "hostname; echo $GREETING; "
                                    "cat /.init/cgroup/sandbox/pids.max; date +%s; "
                                    "df -k /workspace | tail -1; ip -4 -o addr show dev eth0; "
                                    "cat /etc/hostname; id -u; ls /.init"])
        out, err, _ = await handle.collect()
        lines = out.decode().splitlines()
        assert lines[:3] == ["snap-host", "hi there", "77"], (out, err)
        assert abs(int(lines[3]) - time.time()) < 30
        assert lines[4].split()[1] == str(64 << 10)
        assert "inet 10.99.0.2/30" in lines[5]
        assert lines[6:8] == ["snap-host", "1000"]
        assert "sandbox" not in lines[8:] and "modules" not in lines[8:]
        await client.close()
    finally:
        if sb is not None:
            await sb.kill()
        for name in (ns, peer):
            await asyncio.to_thread(netns.delete, name)
        shutil.rmtree(spec.run_dir, ignore_errors=True)


@needs_vm
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_switch_off_boots_cold(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(microvm_snapshot.SNAPSHOT_ENV, "0")
    sid = (await engine.create(SandboxSpec(runtime="microvm"))).id
    try:
        assert _started(sid) == "sealbox: cold boot (SEALBOX_MICROVM_SNAPSHOT=0)"
        r = await engine.run(sid, ExecRequest(cmd="uname -r"))
        assert r.exit_code == 0 and r.stdout.strip().endswith("-cloud-amd64")
    finally:
        await engine.kill(sid)
