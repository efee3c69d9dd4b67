"""microvm fork and memory snapshots are copy-on-write.

A saved VM's RAM is a file that each VM restored from it maps privately: the child of a fork
starts without loading its parent's memory, reads it from the saved file's pages, and copies
only the pages it writes; sandboxes made from one memory snapshot share every page neither
wrote. The file is opened read-only and mapped private, so no guest write reaches it.

Read from the host side: the QEMU process's mapping of the saved file in /proc/PID/smaps
(how much of it is resident, shared with another process, or privately copied).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from pathlib import Path

import pytest
from conftest import gone

from sealbox._sys.cgroups import Cgroup
from sealbox.engine.engine import Engine
from sealbox.engine.spec import ExecRequest, SandboxSpec
from sealbox.runtimes import registry

MIB = 1 << 20
BIG = 96
"""MiB of random bytes the parent keeps in guest memory (/tmp is a tmpfs in guest RAM)."""
STATE = "state.bin"
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (?P<perms>\S+) \S+ \S+ \S+\s+(?P<path>.*)$")
COUNTER = re.compile(r"^(\w+):\s+(\d+) kB$")


@pytest.fixture(autouse=True)
def _microvm() -> None:
    probe = registry.get("microvm").probe()
    if not probe.ok:
        pytest.skip(f"microvm tier unavailable here: {probe.detail}")


async def sh(engine: Engine, sandbox_id: str, cmd: str) -> str:
    result = await engine.run(sandbox_id, ExecRequest(cmd=["sh", "-c", cmd], timeout=120))
    assert result.exit_code == 0, (cmd, result.stdout, result.stderr)
    return result.stdout


def qemu_pid(sandbox_id: str) -> int:
    pids = Cgroup(sandbox_id).pids()
    assert len(pids) == 1, pids  # the VMM is all a microvm sandbox runs on the host
    return pids[0]


def ram_mapping(pid: int) -> dict[str, int | str]:
    """The QEMU's mapping of a saved state file: its permissions and smaps counters (KiB)."""
    found: dict[str, int | str] = {}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if header := MAPPING.match(line):
            if found:
                break
            if STATE in header["path"]:
                found = {"perms": header["perms"], "path": header["path"]}
        elif found and (counter := COUNTER.match(line)):
            found[counter[1]] = int(counter[2])
    assert found, f"QEMU {pid} maps no saved state"
    return found


def state_fds(pid: int) -> list[Path]:
    """QEMU's descriptors of the saved state file, each checked to be read-only."""
    fds = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if STATE in os.readlink(fd):
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split()[3], 8)
            assert flags & os.O_ACCMODE == os.O_RDONLY, (fd, oct(flags))
            fds.append(fd)
    assert fds, f"QEMU {pid} holds no descriptor of its saved state"
    return fds


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def fill(engine: Engine, sandbox_id: str) -> str:
    return await sh(engine, sandbox_id, f"head -c {BIG}M /dev/urandom > /tmp/big && "
                                        "sha256sum < /tmp/big")


async def test_fork_maps_the_parent_copy_on_write(engine: Engine) -> None:
    parent = await engine.create(SandboxSpec(runtime="microvm", timeout=300))
    ids: list[str] = []
    try:
        big = await fill(engine, parent.id)
        child = await engine.fork(parent.id)
        ids.append(child.id)
        pid = qemu_pid(child.id)
        before = ram_mapping(pid)
        # Private, never shared: guest writes stay in the child.
        assert str(before["perms"]).endswith("p"), before
        saved = state_fds(pid)[0]
        saved_digest = digest(saved)

        # The child reads all of the parent's data, through the mapping and without copying.
        assert await sh(engine, child.id, "sha256sum < /tmp/big") == big
        read = ram_mapping(pid)
        assert int(read["Rss"]) >= BIG * 1024, read
        assert int(read["Private_Dirty"]) < BIG * 1024 // 2, read

        # Writing copies: the child's pages grow, the saved file and the parent stay as they were.
        await sh(engine, child.id, f"dd if=/dev/urandom of=/tmp/big bs=1M count={BIG} "
                                   "conv=notrunc 2>/dev/null")
        written = ram_mapping(pid)
        assert int(written["Private_Dirty"]) - int(read["Private_Dirty"]) >= BIG * 1024 * 9 // 10
        assert digest(saved) == saved_digest
        changed = await sh(engine, child.id, "sha256sum < /tmp/big")
        assert changed != big
        assert await sh(engine, parent.id, "sha256sum < /tmp/big") == big

        # A VM restored privately saves again: a fork of the fork gets the child's data.
        grandchild = await engine.fork(child.id)
        ids.append(grandchild.id)
        assert await sh(engine, grandchild.id, "sha256sum < /tmp/big") == changed
        assert ram_mapping(qemu_pid(grandchild.id))["path"] != before["path"]
    finally:
        for sandbox_id in (parent.id, *ids):
            await engine.kill(sandbox_id)
    assert all(gone(sandbox_id) == [] for sandbox_id in (parent.id, *ids))


async def test_sandboxes_from_one_memory_snapshot_share_its_pages(engine: Engine) -> None:
    source = await engine.create(SandboxSpec(runtime="microvm", timeout=300))
    made: list[str] = []
    try:
        big = await fill(engine, source.id)
        await engine.snapshot(source.id, "cow-env")
        for _ in range(2):
            made.append((await engine.create(SandboxSpec(runtime="microvm", timeout=300,
                                                         template="cow-env"))).id)
        for sandbox_id in made:
            assert await sh(engine, sandbox_id, "sha256sum < /tmp/big") == big
        maps = [ram_mapping(qemu_pid(sandbox_id)) for sandbox_id in made]
        assert maps[0]["path"] == maps[1]["path"]  # one file, the snapshot's
        # A tenant's memory: the file is QEMU-readable only through the descriptor it is
        # handed, since a directory above it is root's alone.
        closed = [d for d in Path(str(maps[0]["path"])).parents
                  if d.stat().st_uid == 0 and d.stat().st_mode & 0o077 == 0]
        assert closed, maps[0]["path"]
        for m in maps:
            # Each page of the data is resident once, in both VMs.
            assert int(m["Shared_Clean"]) >= BIG * 1024, m
            assert int(m["Private_Dirty"]) < BIG * 1024 // 2, m
        # Removing the snapshot while they run unlinks the file; its pages stay theirs, even
        # read back from disk once the page cache is dropped.
        engine.remove_template("cow-env")
        assert not Path(str(maps[0]["path"])).exists()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        for sandbox_id in made:
            assert await sh(engine, sandbox_id, "sha256sum < /tmp/big") == big
    finally:
        for sandbox_id in (source.id, *made):
            await engine.kill(sandbox_id)
    assert all(gone(sandbox_id) == [] for sandbox_id in (source.id, *made))


async def test_a_guest_cannot_plant_the_ram_header(engine: Engine) -> None:
    """The saved file holds guest memory, and host root reads it to find where guest RAM
    starts. A guest that fills its memory with copies of that header, pointing elsewhere,
    changes nothing: the real one comes first in QEMU's stream."""
    source = await engine.create(SandboxSpec(runtime="microvm", timeout=300))
    made = None
    try:
        # QEMU's block name and size, then a header claiming the pages start at 0.
        fake = (bytes([len(b"sealbox-ram")]) + b"sealbox-ram" + (512 * MIB).to_bytes(8, "big")
                + (1).to_bytes(4, "big") + (4096).to_bytes(8, "big") + (0).to_bytes(8, "big")
                + (0).to_bytes(8, "big"))
        # 16 MiB of it in guest memory, and a file to know the copy by.
        await sh(engine, source.id, "python3 -c \"open('/tmp/planted', 'wb').write("
                                    f"bytes.fromhex('{fake.hex()}') * {16 * MIB // len(fake)})\""
                                    "; echo marker > /tmp/m")
        snap = await engine.snapshot(source.id, "planted")
        saved = engine.templates.dir(snap.hash) / "checkpoint"
        with open(saved / STATE, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            planted = sum(1 for _ in re.finditer(re.escape(fake), m))
        assert planted > 100_000  # the guest's copies are in the file, after the real one
        assert json.loads((saved / "ram.json").read_text())["offset"] == MIB
        made = (await engine.create(SandboxSpec(runtime="microvm", timeout=300,
                                                template="planted"))).id
        assert await sh(engine, made, "cat /tmp/m") == "marker\n"
    finally:
        await engine.kill(source.id)
        if made:
            await engine.kill(made)
