"""The sandbox a template build runs in: the namespace tier, with the system dirs writable.

Writes to /usr, /etc, /opt and the package databases under /var land in an upper directory
that becomes the template's layer. Each is an overlay (host dir below, upper above) mounted by
host root, because bubblewrap 0.8 has no overlay support and an unprivileged overlay cannot
write below root-owned dirs. Inside, the build is uid 0 of its own user namespace (apt and dpkg
insist) which is still the sandbox's unprivileged host uid outside. So that this uid may create
and replace entries, every directory of the host dirs is first copied into the upper dir (as a
skeleton of empty dirs owned by that uid); a file is replaced by writing a new one and renaming
it over the old, as dpkg, apt and pip do. Rewriting a host file in place is refused.

The dirs below are the host's, or (for a template on a Debian base) those of a root filesystem
made by debootstrap (runtimes/bootstrap.py), whose python3 then runs the agent.

`finalize` turns the upper dir into a layer: no skeleton dirs left unchanged, no device files,
sockets or set-id bits, no file capabilities, everything owned by root.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import shutil
import stat
from pathlib import Path

from sealbox._sys import overlay
from sealbox.runtimes.base import LaunchSpec, launched
from sealbox.runtimes.layers import SYSTEM_DIRS
from sealbox.runtimes.namespace import (
    NamespaceSandbox,
    host_uid_for,
    isolation_args,
    masking_args,
    sandbox_env,
)

CAPTURED = ("usr", "etc", "opt", "var/lib/dpkg", "var/lib/apt", "var/cache/debconf")
# Lock files apt and dpkg open for writing: created in the upper dir so the build owns them.
LOCKS = ("var/lib/dpkg/lock", "var/lib/dpkg/lock-frontend", "var/lib/dpkg/triggers/Lock",
         "var/lib/apt/lists/lock")
COPIED = ("var/lib/dpkg", "var/lib/apt", "var/cache/debconf")
_OPAQUE = "trusted.overlay.opaque"


def within(root: Path, rel: str) -> Path | None:
    """ROOT/REL if it resolves inside ROOT: a tree made by a build (a Debian base) may hold
    symlinks to absolute paths, which the host must never follow to its own files."""
    path = root / rel
    real, top = os.path.realpath(path), os.path.realpath(root)
    return path if real == top or real.startswith(top.rstrip("/") + "/") else None


def make_skeleton(upper: Path, uid: int, root: Path = Path("/")) -> None:
    """Empty copies of every directory of the captured dirs of ROOT, owned by UID."""
    for part in CAPTURED:
        src = within(root, part)
        if src is None or not src.is_dir() or src.is_symlink():
            continue
        for base, dirs, _ in os.walk(src):
            rel = os.path.relpath(base, root)
            target = upper / rel
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, stat.S_IMODE(os.lstat(base).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
            os.lchown(target, uid, uid)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(base, d))]
        for parent in Path(part).parents:
            if str(parent) != ".":
                os.lchown(upper / parent, uid, uid)
    for part in COPIED:
        # Files dpkg, apt and debconf replace after hard-linking a backup (status-old): a
        # hard link to a file another uid owns is refused (protected_hardlinks), so the
        # build gets its own copy.
        src = within(root, part)
        if src is None or not src.is_dir():
            continue
        for entry in src.iterdir():
            if entry.is_file() and not entry.is_symlink():
                target = upper / part / entry.name
                shutil.copy2(entry, target)
                os.lchown(target, uid, uid)
    for lock in LOCKS:
        path = upper / lock
        if path.parent.is_dir():
            path.touch()
            os.lchown(path, uid, uid)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def finalize(upper: Path, root: Path = Path("/")) -> None:
    """Make the build's upper dir (over ROOT) a safe, read-only layer (module docstring)."""
    for base, dirs, files in os.walk(upper, topdown=False):
        for name in files + dirs:
            path = os.path.join(base, name)
            st = os.lstat(path)
            mode = st.st_mode
            if stat.S_ISREG(mode) and _unchanged_copy(upper, path, root):
                os.unlink(path)  # a state file or lock copied up for the build, never changed
                continue
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode) or _is_whiteout(st):
                if stat.S_ISREG(mode):
                    drop_privileges(path, mode)
                os.lchown(path, 0, 0)
            else:
                os.unlink(path)  # devices, fifos, sockets: never in a layer
                continue
            if stat.S_ISDIR(mode) and not os.listdir(path):
                rel = os.path.relpath(path, upper)
                below = within(root, rel)
                if below is not None and below.is_dir() and not _opaque(path):
                    os.rmdir(path)  # an unchanged skeleton dir
        if base != str(upper):
            os.chmod(base, stat.S_IMODE(os.lstat(base).st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
    os.lchown(upper, 0, 0)
    os.chmod(upper, 0o755)
    (upper / "var" / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(upper / "var", 0o755)


def drop_privileges(path: str, mode: int) -> None:
    """No set-uid/set-gid bit and no file capabilities on the file PATH (lstat mode MODE)."""
    if mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))
    if stat.S_ISREG(mode):
        try:
            os.removexattr(path, "security.capability", follow_symlinks=False)
        except OSError:
            pass


def _unchanged_copy(upper: Path, path: str, root: Path) -> bool:
    rel = os.path.relpath(path, upper)
    if rel not in LOCKS and os.path.dirname(rel) not in COPIED:
        return False
    host = within(root, rel)
    try:
        return host is not None and host.is_file() and filecmp.cmp(host, path, shallow=False)
    except OSError:
        return False


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, _OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


class BuildSandbox(NamespaceSandbox):
    """A namespace sandbox whose system dirs (ROOT's) write into ``scratch/upper``. SCRATCH
    is a size-limited filesystem (the build's disk limit), made by the engine."""

    def __init__(self, spec: LaunchSpec, scratch: Path, root: Path) -> None:
        super().__init__(spec)
        self.upper = scratch / "upper"
        self.work = scratch / "work"
        self.root = root

    def _uid(self) -> int:
        return host_uid_for(self.sandbox_id)

    def _root(self) -> Path:
        return self.spec.run_dir / "root"

    async def launch(self) -> None:
        await asyncio.to_thread(self._mount)
        await super().launch()

    def _mount(self) -> None:
        make_skeleton(self.upper, self._uid(), self.root)
        for part in CAPTURED:
            src = within(self.root, part)
            if src is not None and src.is_dir() and not src.is_symlink():
                (self.work / part).mkdir(parents=True, exist_ok=True)
                overlay.mount(self._root() / part, [src], self.upper / part, self.work / part)

    def _bwrap_args(self, listen_fd: int, seccomp_fd: int) -> list[str]:
        spec = self.spec
        disk = str(spec.limits.disk_bytes) if spec.limits.disk_bytes else None
        args = isolation_args(0, spec.hostname)
        root = self._root()
        for top in SYSTEM_DIRS:
            p, src = Path("/") / top, self.root / top
            if src.is_symlink():
                args += ["--symlink", os.readlink(src), str(p)]
            elif (root / top).is_dir():
                args += ["--bind", str(root / top), str(p)]
            elif src.is_dir():
                args += ["--ro-bind", str(src), str(p)]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run", "--tmpfs", "/var"]
        for part in CAPTURED:
            if part.startswith("var/") and (root / part).is_dir():
                args += ["--bind", str(root / part), "/" + part]
        args += ["--dir", "/var/cache/apt/archives/partial", "--dir", "/var/log"]
        for path in ("/tmp", "/var/tmp", "/workspace", "/root"):
            args += (["--size", disk] if disk else []) + ["--tmpfs", path]
        args += masking_args(self.root)
        etc = spec.run_dir / "etc"
        # The host's own passwd and group stay: dpkg checks the users and groups its
        # database names (shadow files are masked).
        for name in ("hostname", "hosts"):
            args += ["--ro-bind", str(etc / name), f"/etc/{name}"]
        for inside, host in spec.ro_files.items():
            args += ["--ro-bind", str(host), inside]
        args += ["--ro-bind", str(spec.run_dir / "guest"), "/.sealbox"]
        env = {**sandbox_env(spec), "HOME": "/root", "USER": "root",
               "DEBIAN_FRONTEND": "noninteractive"}
        for k, v in env.items():
            args += ["--setenv", k, v]
        args += ["--remount-ro", "/", "--chdir", "/workspace", "--seccomp", str(seccomp_fd)]
        return args + ["/usr/bin/python3", "-I", "-S", "/.sealbox/agent.py", "--listen-fd",
                       str(listen_fd)]

    async def kill(self) -> None:
        try:
            await super().kill()
        finally:
            await asyncio.to_thread(overlay.unmount_all, self._root())


async def start_build(spec: LaunchSpec, scratch: Path, root: Path = Path("/")) -> BuildSandbox:
    """A running build sandbox over ROOT's system dirs, or nothing left of it if starting
    failed."""
    return await launched(BuildSandbox(spec, scratch, root))
