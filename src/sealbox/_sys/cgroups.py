"""Per-sandbox cgroups on v1 (one hierarchy per controller) and v2 (unified).

The sandbox's first process joins with `join()` between fork and exec, so every descendant is
accounted and limited from its first instruction.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "sealbox"
_V1_CONTROLLERS = ("cpu", "memory", "pids", "freezer")


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


@dataclass
class Cgroup:
    """One sandbox's cgroup(s). Paths are per controller on v1, one directory on v2."""

    name: str

    @property
    def dirs(self) -> list[Path]:
        if is_v2():
            return [ROOT / GROUP / self.name]
        return [ROOT / c / GROUP / self.name for c in _V1_CONTROLLERS if (ROOT / c).is_dir()]

    def _dir(self, controller: str) -> Path:
        return ROOT / GROUP / self.name if is_v2() else ROOT / controller / GROUP / self.name

    def create(self, cpus: float | None, memory: int | None, pids: int | None) -> None:
        if is_v2():
            parent = ROOT / GROUP
            parent.mkdir(exist_ok=True)
            _write(ROOT / "cgroup.subtree_control", "+cpu +memory +pids")
            _write(parent / "cgroup.subtree_control", "+cpu +memory +pids")
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        period = 100_000
        if is_v2():
            d = self._dir("")
            if cpus:
                _write(d / "cpu.max", f"{int(cpus * period)} {period}")
            if memory:
                _write(d / "memory.max", str(memory))
                _write(d / "memory.swap.max", "0")
            if pids:
                _write(d / "pids.max", str(pids))
            return
        if cpus:
            _write(self._dir("cpu") / "cpu.cfs_period_us", str(period))
            _write(self._dir("cpu") / "cpu.cfs_quota_us", str(int(cpus * period)))
        if memory:
            mem = self._dir("memory")
            _write(mem / "memory.limit_in_bytes", str(memory))
            # No swap: memory+swap capped at the same value where the kernel accounts swap.
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(memory))
            _write(mem / "memory.swappiness", "0")
        if pids:
            _write(self._dir("pids") / "pids.max", str(pids))

    def join(self, pid: int = 0) -> None:
        """Move PID into the cgroup; 0 = the caller, which must be single-threaded (a child
        between fork and exec, where this is meant to run)."""
        if not pid and not is_v2():
            # The caller is one thread (between fork and exec): on v1, moving the current
            # thread through `tasks` skips the global threadgroup lock, whose RCU grace period
            # makes a `cgroup.procs` write take 10-25 ms here (the whole of a sandbox's spawn).
            for d in self.dirs:
                _write(d / "tasks", "0")
            return
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid or os.getpid()))

    def pids(self) -> list[int]:
        d = self._dir("pids") if not is_v2() else self._dir("")
        return [int(p) for p in _read(d / "cgroup.procs").split()]

    def oom_kills(self) -> int:
        if is_v2():
            return _counter(_read(self._dir("") / "memory.events"), "oom_kill")
        return _counter(_read(self._dir("memory") / "memory.oom_control"), "oom_kill")

    def pids_max_hits(self) -> int:
        return _counter(_read(self._dir("pids") / "pids.events"), "max")

    def freeze(self, frozen: bool) -> None:
        if is_v2():
            _write(self._dir("") / "cgroup.freeze", "1" if frozen else "0")
        else:
            _write(self._dir("freezer") / "freezer.state", "FROZEN" if frozen else "THAWED")

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup until it is empty (handles forks during the kill)."""
        if is_v2() and (self._dir("") / "cgroup.kill").exists():
            _write(self._dir("") / "cgroup.kill", "1")
        else:
            # Frozen tasks cannot fork away from the kill; thawed afterwards so SIGKILL lands.
            try:
                self.freeze(True)
            except OSError:
                pass
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.freeze(False)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)

    def exists(self) -> bool:
        return any(d.exists() for d in self.dirs)


def list_names() -> list[str]:
    """Names of all sealbox cgroups present (for reconciliation and leak checks)."""
    bases = [ROOT / GROUP] if is_v2() else [ROOT / c / GROUP for c in _V1_CONTROLLERS]
    names: set[str] = set()
    for b in bases:
        if b.is_dir():
            names.update(p.name for p in b.iterdir() if p.is_dir())
    return sorted(names)
