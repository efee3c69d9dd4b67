"""The seccomp filter every namespace-tier sandbox runs under.

In the spirit of Docker's default profile: allow by default, EPERM for syscalls that reach
kernel-wide state (modules, kexec, bpf, perf, keyrings, mounts, namespaces, clocks, swap,
reboot, io_uring). Nested user namespaces are also refused by bwrap's --disable-userns.
"""

from __future__ import annotations

import errno
import tempfile
from functools import lru_cache

import pyseccomp

DENIED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
    "get_kernel_syms", "get_mempolicy", "init_module", "io_uring_enter", "io_uring_register",
    "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl",
    "lookup_dcookie", "mbind", "mount", "mount_setattr", "move_mount", "move_pages",
    "name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open",
    "pivot_root", "process_vm_readv", "process_vm_writev", "query_module", "quotactl",
    "reboot", "request_key", "set_mempolicy", "setns", "settimeofday", "swapoff", "swapon",
    "sysfs", "_sysctl", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vm86",
    "vm86old",
)


@lru_cache(maxsize=1)
def bpf_program() -> bytes:
    """The compiled filter, as bwrap's --seccomp FD expects it."""
    flt = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in DENIED:
        try:
            flt.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            # Not a syscall on this architecture (vm86 outside i386, …): nothing to deny.
            continue
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()
