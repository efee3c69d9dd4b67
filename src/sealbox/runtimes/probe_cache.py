"""Probe answers remembered across processes until reboot (or a changed key).

Some probes boot a VM or wait out a hanging platform: seconds a `sealbox run` should not pay
every time. The cache lives on /run (tmpfs), so a reboot or a new binary probes afresh.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_DIR = Path("/run/sealbox/probes")


def cached(name: str, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    path = CACHE_DIR / f"{name}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        if data.get("_key") == key:
            return data
    except (OSError, ValueError):
        pass
    data = {**compute(), "_key": key}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return data


def file_key(*paths: str | Path) -> str:
    """Identifies the installed versions of PATHS plus the running kernel."""
    parts = [os.uname().release]
    for p in paths:
        try:
            st = os.stat(p)
            parts.append(f"{p}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append(f"{p}:missing")
    return "|".join(parts)
