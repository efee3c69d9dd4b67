"""The fork-to-exec step of a sandbox's first process: join its netns and cgroup, drop root."""

from __future__ import annotations

import ctypes
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


CLONE_NEWUSER = 0x10000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_userns_root(netns_name: str, cgroup: Cgroup, first_id: int,
                      count: int) -> Callable[[], None]:
    """A preexec_fn: join the netns and cgroup, then become uid/gid 0 of a new user namespace
    that maps 0..COUNT-1 to the host ids FIRST_ID.. (all unprivileged on the host), so that
    dpkg may give files to many owners while no host root is involved. Creating further user
    namespaces from it is refused (its max_user_namespaces is 0)."""

    def _preexec() -> None:
        netns.enter(netns_name)
        cgroup.join()
        parent = os.getpid()
        ready, mapped = os.pipe()
        # Only a process with CAP_SETUID in the parent namespace may write a map of more than
        # its own uid: a helper that stays outside writes it.
        helper = os.fork()
        if helper == 0:
            code = 1
            try:
                os.close(mapped)
                if os.read(ready, 1) == b"u":
                    for name in ("uid_map", "gid_map"):
                        with open(f"/proc/{parent}/{name}", "w") as f:
                            f.write(f"0 {first_id} {count}\n")
                    code = 0
            finally:
                os._exit(code)
        os.close(ready)
        failed = _libc.unshare(CLONE_NEWUSER)
        err = ctypes.get_errno()
        os.write(mapped, b"u" if failed == 0 else b"x")
        os.close(mapped)
        _, status = os.waitpid(helper, 0)
        if failed:
            raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
        if status != 0:
            raise OSError("writing the user namespace's id maps failed")
        os.setresgid(0, 0, 0)
        os.setgroups([])
        os.setresuid(0, 0, 0)
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0\n")

    return _preexec
