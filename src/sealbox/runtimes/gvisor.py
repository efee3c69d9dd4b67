"""The `gvisor` tier: runsc, a user-space kernel, on an OCI bundle built from the same view of
the host's system directories the namespace tier shows.

The sandbox runs in the network namespace the engine prepared, so the egress gateway applies
unchanged. The guest agent speaks over the container's
stdin/stdout. Limits are cgroups runsc creates from the bundle. It does not defend against bugs
in the gVisor Sentry combined with a host-kernel bug reachable from its seccomp-limited syscalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from sealbox._sys.cgroups import Cgroup
from sealbox._sys.spawn import enter_netns
from sealbox.errors import RuntimeUnavailable, SandboxError
from sealbox.guest.client import GuestClient
from sealbox.runtimes import probe_cache, seccomp
from sealbox.runtimes.base import (
    ExitInfo,
    LaunchSpec,
    NoCheckpoint,
    Probe,
    kill_child,
    launched,
)
from sealbox.runtimes.layers import (
    SYSTEM_DIRS,
    layer_binds,
    mount_layer,
    system_root,
    unmount_layer,
)
from sealbox.runtimes.namespace import SANDBOX_UID, masked, prepare_run_dir, sandbox_env

RUNSC_ROOT = Path("/run/sealbox/runsc")
RUNSC_THREADS = 256
PLATFORMS = ("systrap", "kvm", "ptrace")
"""Fastest first; the first that runs a probe container wins."""


def _runsc_base(platform: str) -> list[str]:
    # --network=host means "the namespace runsc runs in", which is the sandbox's own prepared
    # namespace. runsc 2022's netstack mode refuses to start on kernels >= 6.x (its
    # root-namespace check reads a sysctl that became per-namespace), so socket calls go to the
    # host kernel, confined to that namespace and still routed only to the gateway.
    return ["runsc", "--root", str(RUNSC_ROOT), f"--platform={platform}", "--network=host",
            "--oci-seccomp"]


def _statx_problem(platform: str) -> str | None:
    """runsc releases before 2023 answer statx(AT_NO_AUTOMOUNT) — what Debian 12's coreutils
    send — with EINVAL, so `ls -l` and `stat` fail inside. Usable on request; not for `auto`."""
    r = subprocess.run(["runsc", f"--platform={platform}", "--network=none", "do",
                        "/usr/bin/stat", "/"], capture_output=True, text=True, timeout=10)
    if r.returncode == 0:
        return None
    return "this runsc rejects statx: `ls -l` and `stat` fail inside (upgrade gVisor)"


def _try_platforms() -> Probe:
    errors = []
    for platform in PLATFORMS:
        try:
            r = subprocess.run(
                ["runsc", f"--platform={platform}", "--network=none", "do", "/bin/true"],
                capture_output=True, text=True, timeout=4,
            )
        except subprocess.TimeoutExpired:
            errors.append(f"{platform}: hung")
            continue
        if r.returncode == 0:
            return Probe(True, f"runsc, platform {platform}", auto_skip=_statx_problem(platform))
        errors.append(f"{platform}: {(r.stderr.strip().splitlines() or ['failed'])[-1][:120]}")
    return Probe(False, "runsc does not start here (" + "; ".join(errors) + ")")


@lru_cache(maxsize=1)
def _probe() -> Probe:
    runsc = shutil.which("runsc")
    if not runsc:
        return Probe(False, "runsc is not installed (apt-get install runsc)")

    def compute() -> dict[str, Any]:
        p = _try_platforms()
        return {"ok": p.ok, "detail": p.detail, "auto_skip": p.auto_skip}

    data = probe_cache.cached("gvisor", probe_cache.file_key(runsc), compute)
    return Probe(bool(data["ok"]), str(data["detail"]), data.get("auto_skip"))


def platform() -> str:
    return _probe().detail.rsplit(" ", 1)[-1]


class GvisorRuntime:
    name = "gvisor"
    strength = 20
    volume_disks = False
    host_tasks = 120  # runsc's sandbox and gofer: ~95 threads measured idle

    def probe(self) -> Probe:
        return _probe()

    async def start(self, spec: LaunchSpec) -> GvisorSandbox:
        probe = self.probe()
        if not probe.ok:
            raise RuntimeUnavailable(f"gvisor tier unavailable: {probe.detail}")
        return await launched(GvisorSandbox(spec))

    def remove_leftovers(self, sandbox_id: str) -> None:
        # runsc keeps container state under its root until `delete`.
        subprocess.run(["runsc", "--root", str(RUNSC_ROOT), "delete", "--force", sandbox_id],
                       capture_output=True, check=False)
        remove_state_locks(sandbox_id)


def remove_state_locks(sandbox_id: str) -> None:
    """`runsc delete` leaves its lock file ("ID_sandbox:ID.lock") in the root behind."""
    for lock in RUNSC_ROOT.glob(f"{sandbox_id}_sandbox*.lock"):
        lock.unlink(missing_ok=True)


def oci_spec(spec: LaunchSpec) -> dict[str, Any]:
    lim = spec.limits
    disk = [f"size={lim.disk_bytes}"] if lim.disk_bytes else []
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
    ]
    layer = layer_binds(spec)
    root = system_root(spec)
    for top in SYSTEM_DIRS:
        p = Path("/") / top
        if (root / top).is_dir() and not (root / top).is_symlink():
            mounts.append({"destination": str(p), "type": "bind",
                           "source": str(layer.get(str(p), p)), "options": ["rbind", "ro"]})
    if "/var" in layer:
        mounts.append({"destination": "/var", "type": "bind", "source": str(layer["/var"]),
                       "options": ["rbind", "ro"]})
    # The credential files, hidden as on the namespace tier.
    hidden_files, hidden_dirs = masked(root)
    mounts += [{"destination": path, "type": "bind", "source": "/dev/null",
                "options": ["bind", "ro"]} for path in hidden_files]
    mounts += [{"destination": path, "type": "tmpfs", "source": "tmpfs",
                "options": ["ro", "nosuid", "nodev", "mode=755"]} for path in hidden_dirs]
    for path in ("/tmp", "/var/tmp", "/run") + (() if spec.workspace else ("/workspace",)):
        mounts.append({"destination": path, "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777", *disk]})
    if spec.workspace:
        mounts.append({"destination": "/workspace", "type": "bind",
                       "source": str(spec.workspace), "options": ["rbind", "rw"]})
    etc = spec.run_dir / "etc"
    files = {f"/etc/{n}": etc / n for n in ("passwd", "group", "hostname", "hosts")}
    files.update(spec.ro_files)
    for inside, host in files.items():
        mounts.append({"destination": inside, "type": "bind", "source": str(host),
                       "options": ["bind", "ro"]})
    mounts.append({"destination": "/.sealbox", "type": "bind",
                   "source": str(spec.run_dir / "guest"), "options": ["rbind", "ro"]})
    for m in spec.mounts:
        mounts.append({"destination": m.sandbox_path, "type": "bind", "source": str(m.host_path),
                       "options": ["rbind", "ro" if m.read_only else "rw"]})
    resources: dict[str, Any] = {}
    if lim.memory_bytes:
        resources["memory"] = {"limit": lim.memory_bytes, "swap": lim.memory_bytes}
    if lim.cpus:
        resources["cpu"] = {"quota": int(lim.cpus * 100_000), "period": 100_000}
    if lim.pids:
        # The cgroup also holds runsc's Sentry and gofer threads: without headroom a small
        # limit stops the sandbox from starting at all.
        resources["pids"] = {"limit": lim.pids + RUNSC_THREADS}
    env = sandbox_env(spec)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID},
            "args": ["/usr/bin/python3", "-I", "-S", "/.sealbox/agent.py", "--stdio"],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/workspace",
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [],
                             "ambient": []},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                # No network entry: runsc is started inside the prepared namespace.
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            ],
            "resources": resources,
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [
                    {"names": list(seccomp.DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                ],
            },
            "cgroupsPath": f"/sealbox/{spec.sandbox_id}",
        },
    }


class GvisorSandbox(NoCheckpoint):
    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.sandbox_id = spec.sandbox_id
        self.bundle = spec.run_dir / "bundle"
        self.proc: asyncio.subprocess.Process | None = None
        self._killed = False
        self._platform = platform()
        self._seen: dict[str, int] = {}

    def _prepare(self) -> None:
        prepare_run_dir(self.spec)
        rootfs = self.bundle / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        root = system_root(self.spec)
        for top in SYSTEM_DIRS + ("proc", "dev", "tmp", "var", "run", "workspace", ".sealbox",
                                   "home"):
            p = root / top
            target = rootfs / top
            if p.is_symlink():
                if not target.is_symlink():
                    target.symlink_to(os.readlink(p))
            else:
                target.mkdir(exist_ok=True)
        (rootfs / "var" / "tmp").mkdir(exist_ok=True)
        for m in self.spec.mounts:
            # The root is read-only inside: a volume's mount point must exist in the bundle.
            (rootfs / m.sandbox_path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        mount_layer(self.spec)
        (self.bundle / "config.json").write_text(json.dumps(oci_spec(self.spec)))
        # Made here, runsc joins the cgroup without owning it, so it does not remove it when
        # the sandbox dies: the counters that say which limit ended it outlive runsc.
        lim = self.spec.limits
        Cgroup(self.sandbox_id).create(lim.cpus, lim.memory_bytes,
                                       lim.pids + RUNSC_THREADS if lim.pids else None)

    async def launch(self) -> None:
        self._prepare()
        RUNSC_ROOT.mkdir(parents=True, exist_ok=True)
        log = open(self.spec.run_dir / "runsc.log", "wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *_runsc_base(self._platform), "run", "--bundle", str(self.bundle),
                self.sandbox_id, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True, limit=1 << 22, preexec_fn=enter_netns(self.spec.netns),
            )
        finally:
            log.close()

    def _log(self) -> str:
        try:
            return (self.spec.run_dir / "runsc.log").read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    async def connect(self) -> GuestClient:
        if self.proc is None or self.proc.stdout is None or self.proc.stdin is None:
            raise SandboxError("sandbox is not running")
        try:
            client = await GuestClient.from_streams(self.proc.stdout, self.proc.stdin)
            await asyncio.wait_for(client.ping(), timeout=30)
        except (TimeoutError, SandboxError) as exc:
            raise SandboxError(f"gVisor sandbox did not start: {self._log() or exc}") from None
        return client

    def limit_events(self) -> dict[str, int]:
        # Remembered at their highest: the engine removes the cgroup when the sandbox ends.
        cg = Cgroup(self.sandbox_id)
        now = {"memory": cg.oom_kills(), "pids": cg.pids_max_hits()}
        self._seen = {k: max(v, self._seen.get(k, 0)) for k, v in now.items()}
        return dict(self._seen)

    async def wait(self) -> ExitInfo:
        if self.proc is None:
            raise SandboxError("sandbox was never started")
        code = await self.proc.wait()
        limit = next((k for k, v in self.limit_events().items() if v > 0), None)
        return ExitInfo(code=code, limit=limit, detail=self._log())

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        base = _runsc_base(self._platform)
        for args in (["kill", "--all", self.sandbox_id, "KILL"],
                     ["delete", "--force", self.sandbox_id]):
            # From inside the sandbox's network namespace (see _runsc); if that is gone
            # already, the cgroup kill and remove_leftovers finish the job.
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                p = await asyncio.create_subprocess_exec(
                    *base, *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    preexec_fn=enter_netns(self.spec.netns))
                await p.wait()
        await kill_child(self.proc)
        remove_state_locks(self.sandbox_id)
        await asyncio.to_thread(unmount_layer, self.spec.run_dir)

    async def _runsc(self, *args: str) -> None:
        # runsc reaches the sandbox over an abstract unix socket, and those are per network
        # namespace: from the host's namespace the sandbox looks "stopped".
        p = await asyncio.create_subprocess_exec(
            *_runsc_base(self._platform), *args, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, preexec_fn=enter_netns(self.spec.netns))
        _, err = await p.communicate()
        if p.returncode != 0:
            raise SandboxError(f"runsc {args[0]} failed: {err.decode(errors='replace').strip()}")

    async def pause(self) -> None:
        await self._runsc("pause", self.sandbox_id)

    async def resume(self) -> None:
        await self._runsc("resume", self.sandbox_id)
