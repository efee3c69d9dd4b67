"""The fork-to-exec step of a sandbox's first process: join its netns and cgroup, drop root."""

from __future__ import annotations

import os
from collections.abc import Callable

from sealbox._sys import netns
from sealbox._sys.cgroups import Cgroup


def enter_sandbox(netns_name: str, cgroup: Cgroup, uid: int, gid: int) -> Callable[[], None]:
    """A preexec_fn: runs in the child after fork, before exec, while still root."""

    def _preexec() -> None:
        netns.enter(netns_name)
        cgroup.join()
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return _preexec


def enter_netns(netns_name: str) -> Callable[[], None]:
    """A preexec_fn that only joins the network namespace (for runtimes that drop privileges
    themselves, such as runsc)."""

    def _preexec() -> None:
        netns.enter(netns_name)

    return _preexec
