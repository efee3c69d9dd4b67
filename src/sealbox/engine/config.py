"""Installation-wide settings for an engine (embedded in the CLI or behind the server)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sealbox.egress.gateway import ResolvePin

RUN_ROOT = Path("/run/sealbox")


def default_data_dir() -> Path:
    env = os.environ.get("SEALBOX_DATA_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "sealbox"


@dataclass
class EngineConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    max_timeout: float | None = None
    """Longest sandbox lifetime a caller may ask for; None = no cap."""
    subnet: str = "10.77.0.0/16"
    resolve: list[ResolvePin] = field(default_factory=list)
    upstream_ca: list[Path] = field(default_factory=list)
    allow_host_workspace: bool = True
    """Whether a spec may mount a host directory (the server turns this off)."""
    run_root: Path = RUN_ROOT
    max_sandboxes: int | None = None
    """Most sandboxes (pool members included) alive at once; None = no cap."""
    volume_quota: int | None = None
    """Most bytes of volumes (their size limits, summed) one tenant may have; None = no cap."""
    host_task_reserve: int | None = None
    """Processes and threads of the host's limit (kernel.pid_max, threads-max) kept free: a
    sandbox that would take them is refused, so running ones never fail to make a thread.
    None = a tenth of the limit."""
    start_pools: bool = False
    """Start the warm pools kept in the store when the engine starts (the server does; a
    one-shot CLI run must not boot a pool it would kill a moment later)."""
