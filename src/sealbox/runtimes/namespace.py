"""The `namespace` tier: bubblewrap with user, pid, mount, ipc, uts, cgroup and network
namespaces, a seccomp filter, no capabilities, cgroup limits, and an unprivileged host uid.

It does not defend against kernel bugs reachable through allowed syscalls: the sandbox shares
the host kernel. Use the gvisor or microvm tier for a separate kernel.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
from functools import lru_cache
from pathlib import Path

from sealbox._sys.cgroups import Cgroup
from sealbox._sys.spawn import enter_sandbox
from sealbox.errors import RuntimeUnavailable, SandboxError
from sealbox.guest.client import GuestClient
from sealbox.runtimes.base import (
    ExitInfo,
    LaunchSpec,
    NoCheckpoint,
    Probe,
    kill_child,
    launched,
)
from sealbox.runtimes.layers import SYSTEM_DIRS, mount_layer, system_root, unmount_layer
from sealbox.runtimes.seccomp import bpf_program

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
GUEST_FILES = ("agent.py", "protocol.py")
SANDBOX_UID = 1000
# Host uids for sandboxes: a range no login user has; one per sandbox so two sandboxes never
# share file ownership or signal rights on the host.
HOST_UID_BASE = 2_000_000
HOST_UID_SPAN = 1_000_000
MASKED_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers")
MASKED_DIRS = ("/etc/ssh", "/etc/sudoers.d", "/etc/ssl/private")


def isolation_args(uid: int, hostname: str) -> list[str]:
    """bwrap's namespaces and identity for a sandbox (or a template build) running as UID."""
    return [
        "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session",
        "--uid", str(uid), "--gid", str(uid), "--hostname", hostname, "--clearenv",
    ]


def masked(root: Path = Path("/")) -> tuple[list[str], list[str]]:
    """The credential files and dirs the read-only /etc (the host's, or ROOT's) would show."""
    return ([p for p in MASKED_FILES if (root / p.lstrip("/")).exists()],
            [p for p in MASKED_DIRS if (root / p.lstrip("/")).is_dir()])


def masking_args(root: Path = Path("/")) -> list[str]:
    """Hide the credential files and directories that the read-only /etc would show."""
    files, dirs = masked(root)
    args: list[str] = []
    for path in files:
        args += ["--ro-bind", "/dev/null", path]
    for path in dirs:
        args += ["--tmpfs", path]
    return args


def host_uid_for(sandbox_id: str) -> int:
    digest = int.from_bytes(hashlib.sha256(sandbox_id.encode()).digest()[:4], "big")
    return HOST_UID_BASE + digest % HOST_UID_SPAN


@lru_cache(maxsize=1)
def _probe() -> Probe:
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return Probe(False, "bubblewrap is not installed (apt-get install bubblewrap)")
    if not Path("/usr/bin/python3").exists():
        return Probe(False, "/usr/bin/python3 is missing: the guest agent needs it")
    try:
        r = subprocess.run(
            [bwrap, "--unshare-user", "--unshare-pid", "--disable-userns", "--ro-bind", "/", "/",
             "--proc", "/proc", "true"],
            capture_output=True, text=True, timeout=10, user=HOST_UID_BASE, group=HOST_UID_BASE,
            extra_groups=[],
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe(False, f"bwrap failed to start: {exc}")
    if r.returncode != 0:
        return Probe(False, f"bwrap cannot create an unprivileged user namespace: {r.stderr.strip()}")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    return Probe(True, version)


def prepare_run_dir(spec: LaunchSpec) -> None:
    """Files every tier shows inside: the guest agent and generated /etc entries."""
    run = spec.run_dir
    run.mkdir(parents=True, exist_ok=True)
    run.chmod(0o711)
    guest = run / "guest"
    guest.mkdir(exist_ok=True)
    for name in GUEST_FILES:
        shutil.copyfile(GUEST_DIR / name, guest / name)
        (guest / name).chmod(0o644)
    guest.chmod(0o755)
    etc = run / "etc"
    etc.mkdir(exist_ok=True)
    etc.chmod(0o755)
    files = {
        "passwd": f"root:x:0:0:root:/root:/bin/sh\nuser:x:{SANDBOX_UID}:{SANDBOX_UID}:"
        "sandbox user:/workspace:/bin/bash\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nuser:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
        "hostname": f"{spec.hostname}\n",
        "hosts": f"127.0.0.1 localhost\n127.0.1.1 {spec.hostname}\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text)
        (etc / name).chmod(0o644)
    for host_path in spec.ro_files.values():
        host_path.chmod(0o644)


def sandbox_env(spec: LaunchSpec) -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/workspace", "USER": "user", "LANG": "C.UTF-8", "TERM": "xterm-256color",
        "SEALBOX_SANDBOX_ID": spec.sandbox_id, **spec.env,
    }


class NamespaceRuntime:
    name = "namespace"
    strength = 10
    volume_disks = False
    host_tasks = 8  # bwrap twice, the agent and what it starts

    def probe(self) -> Probe:
        return _probe()

    async def start(self, spec: LaunchSpec) -> NamespaceSandbox:
        probe = self.probe()
        if not probe.ok:
            raise RuntimeUnavailable(f"namespace tier unavailable: {probe.detail}")
        return await launched(NamespaceSandbox(spec))

    def remove_leftovers(self, sandbox_id: str) -> None:
        """Nothing beyond the cgroup and run directory, which the engine removes."""


class NamespaceSandbox(NoCheckpoint):
    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.sandbox_id = spec.sandbox_id
        self.cgroup = Cgroup(spec.sandbox_id)
        self.proc: asyncio.subprocess.Process | None = None
        self._listener: socket.socket | None = None
        self._private = spec.run_dir / "private"
        self._killed = False
        self._layer: dict[str, Path] = {}
        """Template layer: sandbox dir -> host dir bound read-only in its place."""

    @property
    def socket_path(self) -> Path:
        return self._private / "agent.sock"

    def _uid(self) -> int:
        if self.spec.workspace is not None:
            # A caller's own directory is written as its owner, as Docker bind mounts do.
            return self.spec.workspace.stat().st_uid
        return host_uid_for(self.sandbox_id)

    def _bwrap_args(self, listen_fd: int, seccomp_fd: int) -> list[str]:
        spec = self.spec
        disk = str(spec.limits.disk_bytes) if spec.limits.disk_bytes else None
        args = isolation_args(SANDBOX_UID, spec.hostname)
        root = system_root(spec)
        for top in SYSTEM_DIRS:
            p, src = Path("/") / top, root / top
            if src.is_symlink():
                args += ["--symlink", os.readlink(src), str(p)]
            elif src.is_dir():
                args += ["--ro-bind", str(self._layer.get(str(p), p)), str(p)]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run", "--dir", "/var"]
        if "/var" in self._layer:
            args += ["--ro-bind", str(self._layer["/var"]), "/var"]
        for path in ("/tmp", "/var/tmp") + (() if spec.workspace else ("/workspace",)):
            args += (["--size", disk] if disk else []) + ["--tmpfs", path]
        if spec.workspace:
            args += ["--bind", str(spec.workspace), "/workspace"]
        args += ["--perms", "0755", "--dir", "/home"]
        args += masking_args(root)
        etc = spec.run_dir / "etc"
        for name in ("passwd", "group", "hostname", "hosts"):
            args += ["--ro-bind", str(etc / name), f"/etc/{name}"]
        for inside, host in spec.ro_files.items():
            args += ["--ro-bind", str(host), inside]
        args += ["--ro-bind", str(spec.run_dir / "guest"), "/.sealbox"]
        for m in spec.mounts:
            # bwrap creates the mount point; symlinks inside the volume resolve in the
            # sandbox's own mount namespace, never on the host.
            args += ["--ro-bind" if m.read_only else "--bind", str(m.host_path), m.sandbox_path]
        for k, v in sandbox_env(spec).items():
            args += ["--setenv", k, v]
        args += ["--remount-ro", "/", "--chdir", "/workspace", "--seccomp", str(seccomp_fd)]
        return args + ["/usr/bin/python3", "-I", "-S", "/.sealbox/agent.py", "--listen-fd",
                       str(listen_fd)]

    async def launch(self) -> None:
        spec = self.spec
        prepare_run_dir(spec)
        self._layer = mount_layer(spec)
        self._private.mkdir(mode=0o700, exist_ok=True)
        lim = spec.limits
        self.cgroup.create(lim.cpus, lim.memory_bytes, lim.pids)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(64)
        self._listener = listener
        rfd, wfd = os.pipe()
        try:
            os.write(wfd, bpf_program())
            os.close(wfd)
            uid = self._uid()
            log = open(self._private / "bwrap.log", "wb")
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    "bwrap", *self._bwrap_args(listener.fileno(), rfd),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(listener.fileno(), rfd),
                    preexec_fn=enter_sandbox(spec.netns, self.cgroup, uid, uid),
                    start_new_session=True,
                )
            finally:
                log.close()
        finally:
            os.close(rfd)

    def _bwrap_error(self) -> str:
        try:
            return (self._private / "bwrap.log").read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    async def connect(self) -> GuestClient:
        if self.proc is None or self.proc.returncode is not None:
            raise SandboxError(f"sandbox is not running: {self._bwrap_error() or 'it exited'}")
        connect = asyncio.ensure_future(GuestClient.connect_unix(self.socket_path, timeout=15.0))
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled (a warm-pool boot stopped): leave no connect attempt running behind.
            connect.cancel()
            exited.cancel()
            raise
        if connect in done:
            exited.cancel()
            return connect.result()
        connect.cancel()
        raise SandboxError(f"sandbox exited during start: {self._bwrap_error() or 'no output'}")

    def limit_events(self) -> dict[str, int]:
        return {"memory": self.cgroup.oom_kills(), "pids": self.cgroup.pids_max_hits()}

    def _limit_hit(self) -> str | None:
        events = self.limit_events()
        return next((name for name, n in events.items() if n > 0), None)

    async def wait(self) -> ExitInfo:
        assert self.proc is not None, "launch() first"
        code = await self.proc.wait()
        return ExitInfo(code=code, limit=self._limit_hit(), detail=self._bwrap_error())

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        loop = asyncio.get_running_loop()
        if self.cgroup.exists():
            await loop.run_in_executor(None, self.cgroup.kill_all)
        await kill_child(self.proc)
        await loop.run_in_executor(None, self.cgroup.remove)
        if self._listener is not None:
            self._listener.close()
        await loop.run_in_executor(None, unmount_layer, self.spec.run_dir)

    async def pause(self) -> None:
        self.cgroup.freeze(True)

    async def resume(self) -> None:
        self.cgroup.freeze(False)
