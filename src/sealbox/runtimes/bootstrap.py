"""A Debian root filesystem made by debootstrap, in a sandbox of its own.

debootstrap unpacks packages with many owners (root, shadow, mail, …), chroots into the new
tree and runs maintainer scripts there. It runs here as uid 0 of a user namespace that maps
65,536 ids onto an unprivileged host range (`enter_userns_root`), so chown and chroot work
while every file it writes belongs to unprivileged host ids and host root's files stay out of
its reach. bubblewrap (run by that namespace's root, so it makes no namespace of users itself)
gives it the host's /usr read-only, its own /proc, a /dev of the usual device nodes for the
new tree (mknod is not allowed in a user namespace), the gateway's resolv.conf and CA bundle,
only the capabilities dpkg needs (`CAPABILITIES`), and the sandboxes' seccomp filter (no mount,
no unshare). Its network is the build's netns, behind the egress gateway.

`seal_rootfs` then makes the tree a template base: ids shifted back (the range's first id
becomes root), set-id bits and file capabilities dropped, no device files, fifos or sockets,
and no top-level link leading out of the tree. The host walks it with lstat and lchown only:
the tree was written by maintainer scripts, and its symlinks are never followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sealbox._sys import overlay
from sealbox._sys.cgroups import Cgroup
from sealbox._sys.spawn import enter_userns_root
from sealbox.runtimes.base import kill_child
from sealbox.runtimes.build import drop_privileges
from sealbox.runtimes.layers import SYSTEM_DIRS
from sealbox.runtimes.namespace import masking_args
from sealbox.runtimes.seccomp import bpf_program

ID_COUNT = 65536
ID_BASE = 0x60000000
ID_SLOTS = 4096
"""Each build gets one of ID_SLOTS ranges of ID_COUNT ids from ID_BASE: far above the
namespace tier's uids (2,000,000..3,000,000) and any account's."""
TARGET = "/target"
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
                "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP",
                "CAP_SETFCAP", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE", "CAP_MKNOD")
"""What dpkg and maintainer scripts need as root (Docker's default set, less raw sockets and
binding low ports): no CAP_SYS_ADMIN or CAP_NET_ADMIN, so no namespace of any kind can be made
from it (and with it no netfilter or mount code reachable that only they open)."""
PACKAGES = ("python3", "ca-certificates")
"""Every sandbox runs the guest agent with the image's python3 and shows the gateway's CA
bundle at /etc/ssl/certs: a base without them could not start."""


def id_base_for(sandbox_id: str) -> int:
    digest = int.from_bytes(hashlib.sha256(sandbox_id.encode()).digest()[:4], "big")
    return ID_BASE + (digest % ID_SLOTS) * ID_COUNT


@dataclass
class Bootstrap:
    sandbox_id: str
    netns: str
    target: Path
    """An empty host directory the tree is made in (on the build's size-limited disk)."""
    run_dir: Path
    """The build's run dir (traversable by the sandbox's ids), where the target is shown."""
    suite: str
    mirror: str
    check_signature: bool = True
    ro_files: dict[str, Path] = field(default_factory=dict)
    memory_bytes: int | None = None
    pids: int = 4096

    @property
    def shown_target(self) -> Path:
        return self.run_dir / "bootstrap-target"

    def script(self) -> str:
        """debootstrap, then what no image should carry: the downloaded packages and the
        build host's name and resolver."""
        options = ["--variant=minbase", f"--include={','.join(PACKAGES)}"]
        if not self.check_signature:
            options.append("--no-check-gpg")
        trusted = "" if self.check_signature else "[trusted=yes] "
        suite, mirror = shlex.quote(self.suite), shlex.quote(self.mirror)
        source = shlex.quote(f"deb {trusted}{self.mirror} {self.suite} main")
        return (
            f"debootstrap {' '.join(options)} {suite} {TARGET} {mirror} && "
            f"rm -f {TARGET}/var/cache/apt/archives/*.deb && "
            f"rm -rf {TARGET}/var/lib/apt/lists/* && "
            f"echo sealbox > {TARGET}/etc/hostname && : > {TARGET}/etc/resolv.conf && "
            f"echo '127.0.0.1 localhost' > {TARGET}/etc/hosts && "
            f"echo {source} > {TARGET}/etc/apt/sources.list"
        )

    def bwrap_args(self, seccomp_fd: int, argv: list[str]) -> list[str]:
        args = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session", "--hostname", "sealbox-build",
                "--clearenv", "--cap-drop", "ALL"]
        for cap in CAPABILITIES:
            args += ["--cap-add", cap]
        for top in SYSTEM_DIRS:
            p = Path("/") / top
            if p.is_symlink():
                args += ["--symlink", os.readlink(p), str(p)]
            elif p.is_dir():
                args += ["--ro-bind", str(p), str(p)]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/var",
                 "--tmpfs", "/run"]
        args += masking_args()
        for inside, host in self.ro_files.items():
            args += ["--ro-bind", str(host), inside]
        # The new tree's /dev holds the usual nodes already, so debootstrap makes none; its
        # /proc is mounted here (a mount inside is refused by the filter).
        args += ["--bind", str(self.shown_target), TARGET, "--dev", f"{TARGET}/dev",
                 "--ro-bind", "/dev/null", f"{TARGET}/dev/console", "--proc", f"{TARGET}/proc"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
               "DEBIAN_FRONTEND": "noninteractive",
               # debootstrap's "in a container" path: no test mknod, device nodes kept.
               "container": "lxc"}
        for k, v in env.items():
            args += ["--setenv", k, v]
        return args + ["--chdir", "/", "--seccomp", str(seccomp_fd), *argv]


async def run(spec: Bootstrap, write: Callable[[bytes], None],
              argv: list[str] | None = None) -> int:
    """Run debootstrap (or ARGV, in the same sandbox) and stream its output to WRITE.
    Returns the exit code; nothing of the sandbox is left when this returns or is cancelled."""
    spec.target.mkdir(parents=True, exist_ok=True)
    first_id = id_base_for(spec.sandbox_id)
    os.chown(spec.target, first_id, first_id)
    cgroup = Cgroup(spec.sandbox_id)
    proc = None
    rfd, wfd = os.pipe()
    try:
        cgroup.create(None, spec.memory_bytes, spec.pids)
        # The target's parents are not this namespace's root's to enter: it is shown in the
        # run dir (which its uid may pass through) instead.
        overlay.bind(spec.target, spec.shown_target)
        os.write(wfd, bpf_program())
        os.close(wfd)
        wfd = -1
        command = argv or ["/bin/sh", "-c", spec.script()]
        proc = await asyncio.create_subprocess_exec(
            "bwrap", *spec.bwrap_args(rfd, command),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(rfd,), start_new_session=True,
            preexec_fn=enter_userns_root(spec.netns, cgroup, first_id, ID_COUNT))
        os.close(rfd)
        rfd = -1
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            write(chunk)
        return await proc.wait()
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)
        await asyncio.to_thread(cgroup.kill_all)
        await kill_child(proc)
        await asyncio.to_thread(cgroup.remove)
        await asyncio.to_thread(overlay.unmount_all, spec.shown_target)
        if spec.shown_target.is_dir():
            spec.shown_target.rmdir()


def seal_rootfs(root: Path, first_id: int) -> None:
    """Make ROOT (written by `run` for FIRST_ID) a safe, read-only base (module docstring)."""
    for base, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            _seal(os.path.join(base, name), first_id)
    _seal(str(root), first_id)
    os.chmod(root, 0o755)
    for entry in root.iterdir():
        # Top-level links are recreated on the host side of some tiers (gVisor's bundle),
        # where an absolute or climbing target would lead out: a merged-/usr system needs
        # only links like bin -> usr/bin.
        if entry.is_symlink() and not _inside_link(os.readlink(entry)):
            entry.unlink()


def _inside_link(target: str) -> bool:
    return not target.startswith("/") and ".." not in Path(target).parts


def _seal(path: str, first_id: int) -> None:
    st = os.lstat(path)
    mode = st.st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        os.unlink(path)
        return
    os.lchown(path, _shifted(st.st_uid, first_id), _shifted(st.st_gid, first_id))
    if not stat.S_ISLNK(mode):
        drop_privileges(path, mode)


def _shifted(host_id: int, first_id: int) -> int:
    inside = host_id - first_id
    # Anything outside the range (which the sandbox could not have made) becomes root's.
    return inside if 0 <= inside < ID_COUNT else 0
