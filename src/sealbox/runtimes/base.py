"""The interface every isolation tier implements, and what the engine hands it.

A tier knows how to start, stop, pause and limit a sandbox. It knows nothing about HTTP,
secrets or users: the engine prepares the network namespace and the files to show inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from sealbox.errors import SandboxError
from sealbox.guest.client import GuestClient


@dataclass(frozen=True)
class Probe:
    """Whether a tier works on this host; ``detail`` says how, or why not."""

    ok: bool
    detail: str
    auto_skip: str | None = None
    """Works when asked for by name, but `auto` passes it over, for this reason (CPU
    emulation making every start take seconds, a known defect of the installed version)."""


@dataclass(frozen=True)
class Limits:
    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    disk_bytes: int | None = None


@dataclass(frozen=True)
class HostMount:
    """A host directory shown inside the sandbox (a volume the engine mounted on the host)."""

    host_path: Path
    sandbox_path: str
    """Absolute, normalised, validated by the engine (never /, /proc, /dev, /etc, ...)."""
    read_only: bool = False


@dataclass(frozen=True)
class VolumeDisk:
    """A volume's image file, for a tier that attaches it as a disk of its own (microvm)."""

    image: Path
    sandbox_path: str
    read_only: bool = False


@dataclass
class LaunchSpec:
    sandbox_id: str
    netns: str
    """Name of the network namespace the engine prepared (``/run/netns/NAME``)."""
    run_dir: Path
    """Host-side directory private to this sandbox; removed by the engine when it ends."""
    limits: Limits
    env: dict[str, str] = field(default_factory=dict)
    hostname: str = "sealbox"
    workspace: Path | None = None
    """Host directory mounted read-write at /workspace; None means a private, size-limited one."""
    ro_files: dict[str, Path] = field(default_factory=dict)
    """Sandbox path -> host file shown read-only (resolv.conf, CA bundle, hosts)."""
    mounts: list[HostMount] = field(default_factory=list)
    """Volumes, bind-mounted after every other mount (so they may sit under /workspace)."""
    disks: list[VolumeDisk] = field(default_factory=list)
    """Volumes for a tier with ``volume_disks``: image files, never mounted on the host."""
    layer: Path | None = None
    """A template's read-only tree (usr/, etc/, opt/, var/) overlaid on the system dirs."""
    restore: Path | None = None
    """A checkpoint (`RunningSandbox.checkpoint`) to restore instead of booting: the same
    processes and memory, on this launch's network namespace and files."""


@dataclass(frozen=True)
class ExitInfo:
    """How a sandbox ended; ``limit`` names the limit that ended it, if one did."""

    code: int | None
    limit: str | None = None
    detail: str = ""


class RunningSandbox(Protocol):
    sandbox_id: str

    async def connect(self) -> GuestClient:
        """Open the guest channel (waits until the guest agent answers)."""
        ...

    def limit_events(self) -> dict[str, int]:
        """How often each limit has bitten so far: {'memory': OOM kills, 'pids': refused forks}."""
        ...

    async def wait(self) -> ExitInfo: ...

    async def kill(self) -> None:
        """End every process of the sandbox and remove what the tier created. Idempotent."""
        ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    can_checkpoint: bool
    """Whether `checkpoint` can save processes and memory to disk (so a pause frees them)."""

    async def checkpoint(self, dest: Path, *, keep_running: bool = False) -> None:
        """Stop the sandbox and save it into DEST (a new directory) for `LaunchSpec.restore`;
        `kill` then frees it, unless KEEP_RUNNING (a fork: the saved copy becomes another
        sandbox, which must not share this one's identity or randomness). On failure it runs
        on."""
        ...


class NoCheckpoint:
    """For tiers that cannot save processes: pause freezes them in place instead."""

    can_checkpoint = False

    async def checkpoint(self, dest: Path, *, keep_running: bool = False) -> None:
        raise SandboxError("this tier cannot save processes and memory to disk")


class Runtime(Protocol):
    name: str
    strength: int
    """Higher is stronger isolation; ``auto`` picks the strongest that probes ok."""
    volume_disks: bool
    """Takes volumes as image files (`LaunchSpec.disks`) rather than host mounts."""
    host_tasks: int
    """About how many processes and threads one sandbox takes on the host."""

    def probe(self) -> Probe: ...

    async def start(self, spec: LaunchSpec) -> RunningSandbox: ...

    def remove_leftovers(self, sandbox_id: str) -> None:
        """Remove what this tier may have left of a sandbox whose owner died (beyond the cgroup,
        network namespace and run directory, which the engine removes)."""
        ...


class Launchable(Protocol):
    async def launch(self) -> None: ...

    async def kill(self) -> None: ...


L = TypeVar("L", bound=Launchable)


async def kill_child(proc: asyncio.subprocess.Process | None) -> None:
    """SIGKILL PROC and wait for it. `Process.kill` would poll first, and so reap a child that
    already died (say, its cgroup was killed) before asyncio's watcher does: the watcher then
    warns "Unknown child process pid" and the exit code is lost. Until asyncio reaps it, the
    pid is still our child's (a zombie at worst), so a plain kill(2) is safe."""
    if proc is None:
        return
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


async def launched(sandbox: L) -> L:
    """SANDBOX launched, or killed (nothing left) if launching failed or was cancelled."""
    try:
        await sandbox.launch()
    except BaseException:
        await sandbox.kill()
        raise
    return sandbox
