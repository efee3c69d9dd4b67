"""The host's limit of tasks (processes and threads), which every tier's sandboxes share.

gVisor's sandboxes take about a hundred threads each: on a host left at the kernel's default
`kernel.pid_max` of 32,768 the tasks run out long before memory does, and then sandboxes that
were running fail to make a thread and die. The engine refuses a new sandbox before that.
"""

from __future__ import annotations

from pathlib import Path


def task_limit() -> int:
    """How many tasks the host can hold: the lower of pid_max and threads-max."""
    values = []
    for name in ("pid_max", "threads-max"):
        try:
            values.append(int(Path(f"/proc/sys/kernel/{name}").read_text()))
        except (OSError, ValueError):
            continue
    return min(values) if values else 4_194_304


def tasks_in_use() -> int:
    """Tasks on the host now (the total of /proc/loadavg's running/total field)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    except (OSError, ValueError, IndexError):
        return 0


def refusal(needed: int, reserve: int | None) -> str | None:
    """Why a sandbox taking NEEDED tasks must not start now (None: it may). RESERVE tasks of
    the limit stay free (default: a tenth of it)."""
    limit = task_limit()
    keep = limit // 10 if reserve is None else reserve
    used = tasks_in_use()
    if used + needed <= limit - keep:
        return None
    return (f"the host is near its limit of processes and threads ({used} of {limit} in use, "
            f"{keep} kept free; a sandbox of this tier takes about {needed}): kill sandboxes, "
            "or have the operator raise it (sysctl -w kernel.pid_max=4194304)")
