"""Shared fixtures and the session-level leak check (invariant 5: nothing survives a sandbox)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sealbox._sys import cgroups, netns
from sealbox._sys import volumes as sysvol
from sealbox.engine.config import EngineConfig
from sealbox.engine.engine import NETNS_PREFIX, Engine, netns_name
from sealbox.runtimes.namespace import HOST_UID_BASE, HOST_UID_SPAN

RUN_ROOT = Path("/run/sealbox")


def sandbox_processes() -> list[int]:
    """Live PIDs running as a sandbox host uid.

    Zombies are dead: an orphaned sandbox process killed with its parent waits for PID 1 to
    reap it, and PID 1 of these CI containers never does (systemd on a real host would).
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat().st_uid
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if HOST_UID_BASE <= uid < HOST_UID_BASE + HOST_UID_SPAN and state != "Z":
            pids.append(int(entry.name))
    return pids


def gone(sid: str) -> list[str]:
    """What of sandbox SID is still on the host (empty once it is all gone)."""
    left = []
    if netns.exists(netns_name(sid)):
        left.append("netns")
    if cgroups.Cgroup(sid).exists():
        left.append("cgroup")
    if (RUN_ROOT / sid).exists():
        left.append("run dir")
    return left


def leftovers() -> dict[str, list[str]]:
    found = {
        "netns": netns.list_names(NETNS_PREFIX),
        "veth": netns.host_links("sbx"),
        "cgroups": cgroups.list_names(),
        "run_dirs": sorted(p.name for p in RUN_ROOT.glob("sb*")) if RUN_ROOT.is_dir() else [],
        "runsc_state": sorted(p.name for p in (RUN_ROOT / "runsc").glob("sb*"))
        if (RUN_ROOT / "runsc").is_dir() else [],
        "processes": [str(p) for p in sandbox_processes()],
        "volume_mounts": sysvol.mounts_under(RUN_ROOT / "volumes"),
        "loop_devices": sysvol.leaked_loops(),
    }
    return {k: v for k, v in found.items() if v}


@pytest.fixture(scope="session", autouse=True)
def no_leaks() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.exit("the sealbox test suite needs root (namespaces, nftables, cgroups)", 2)
    before = leftovers()
    yield
    after = leftovers()
    leaked = {k: sorted(set(v) - set(before.get(k, []))) for k, v in after.items()}
    leaked = {k: v for k, v in leaked.items() if v}
    if leaked:
        pytest.fail(f"sandbox resources leaked by the test session: {leaked}", pytrace=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
async def engine(data_dir: Path) -> AsyncIterator[Engine]:
    eng = Engine(EngineConfig(data_dir=data_dir))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()
