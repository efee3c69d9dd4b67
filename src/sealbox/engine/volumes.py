"""Named persistent volumes: a size-limited ext4 image per volume, loop-mounted on the host
while at least one sandbox uses it, bind-mounted into each of them.

One writer or any number of readers at a time. A volume belongs to the tenant that made it;
another tenant's volume is indistinguishable from one that does not exist. Whether a sandbox
uses a volume is read from the state store (live sandboxes' ``volumes``), so a server and CLI
runs sharing a data dir agree; a file lock serialises attach and release between them.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sealbox._sys import volumes as sysvol
from sealbox.engine.spec import VOLUME_NAME, VolumeMount, check_volume_name
from sealbox.engine.store import Store, now
from sealbox.engine.units import checked, format_size, parse_size
from sealbox.errors import ConfigError, ConflictError, NotFoundError, QuotaExceeded
from sealbox.runtimes.base import HostMount, VolumeDisk
from sealbox.runtimes.namespace import SANDBOX_UID, host_uid_for

DEFAULT_SIZE = 1024**3
MIN_SIZE = 16 * 1024**2
MAX_SIZE = 16 * 1024**4
T = TypeVar("T")
VM_WRITTEN = "vm_written"
"""In volume.json: a VM had it read-write (see `Volumes.attach_disks`)."""
LOCAL_TENANT = "_local"
"""Owner of volumes made without a tenant (embedded engine: CLI `run`, SDK without a server).
Not a valid API tenant name, so no API key can reach these."""


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=VOLUME_NAME, description="1-63 of a-z 0-9 - _")
    size: int = Field(default=DEFAULT_SIZE, description="bytes; accepts e.g. \"1GiB\"")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        size = checked(parse_size, v)
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"size must be between {format_size(MIN_SIZE)} and "
                             f"{format_size(MAX_SIZE)}")
        return size


class VolumeInfo(BaseModel):
    name: str
    size: int = Field(description="bytes: the hard limit of what the volume holds")
    owner: str
    created_at: datetime
    used_by: list[str] = Field(default_factory=list, description="ids of sandboxes using it")
    mounted: bool = False
    vm_only: bool = Field(default=False, description="written by a microVM: only microvm "
                          "sandboxes may use it (the host kernel never mounts a file system "
                          "whose blocks a VM wrote)")


def mount_root(data_dir: Path, run_root: Path) -> Path:
    """Where an installation's volumes are mounted on the host."""
    return run_root / "volumes" / hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]


def _tenant(owner: str | None) -> str:
    return owner or LOCAL_TENANT


class Volumes:
    def __init__(self, data_dir: Path, run_root: Path, store: Store,
                 quota: int | None = None) -> None:
        self.root = data_dir / "volumes"
        self.quota = quota
        """Most bytes of volume size limits one tenant may have (None: no cap)."""
        # Per installation: engines with other data dirs share /run/sealbox, and reconcile
        # must only ever unmount its own volumes.
        self.mount_root = mount_root(data_dir, run_root)
        self.store = store
        self._claims: dict[tuple[str, str], dict[str, bool]] = {}
        """(tenant, name) -> {sandbox id: read_only} for sandboxes of this engine."""

    # ----- paths and locking -------------------------------------------------------------
    def _dir(self, tenant: str, name: str) -> Path:
        return self.root / tenant / name

    def mountpoint(self, name: str, owner: str | None = None) -> Path:
        """Where the host mounts the volume while sandboxes use it."""
        return self._mountpoint(_tenant(owner), name)

    def _mountpoint(self, tenant: str, name: str) -> Path:
        return self.mount_root / tenant / name

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _meta(self, tenant: str, name: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self._dir(tenant, name) / "volume.json").read_text())
        except (OSError, ValueError):
            raise NotFoundError(f"no volume {name!r}: see `sealbox volume ls`") from None
        return data

    # ----- who uses what -----------------------------------------------------------------
    def _users(self, tenant: str, name: str, *, running_only: bool) -> dict[str, bool]:
        """Sandbox id -> read_only of sandboxes using the volume. RUNNING_ONLY leaves out
        paused sandboxes whose owner died (they need no mount until resumed, but keep their
        claim so nobody else writes under them)."""
        users = dict(self._claims.get((tenant, name), {}))
        dormant = {i.id for i in self.store.orphans()} if running_only else set()
        for info in self.store.list(live_only=True):
            if _tenant(info.owner) != tenant or info.id in dormant:
                continue
            for m in info.volumes:
                if m.name == name:
                    users.setdefault(info.id, m.read_only)
        return users

    def _info(self, tenant: str, name: str) -> VolumeInfo:
        meta = self._meta(tenant, name)
        return VolumeInfo(
            name=name, size=meta["size"], owner=tenant, created_at=meta["created_at"],
            used_by=sorted(self._users(tenant, name, running_only=False)),
            mounted=sysvol.is_mounted(self._mountpoint(tenant, name)),
            vm_only=bool(meta.get(VM_WRITTEN)),
        )

    # ----- CRUD --------------------------------------------------------------------------
    def create(self, req: VolumeCreate, owner: str | None = None) -> VolumeInfo:
        tenant = _tenant(owner)
        check_volume_name(req.name)
        with self._locked():
            vdir = self._dir(tenant, req.name)
            if vdir.exists():
                raise ConflictError(f"volume {req.name!r} already exists")
            if self.quota is not None:
                used = sum(v.size for v in self.list(owner))
                if used + req.size > self.quota:
                    raise QuotaExceeded(
                        f"volume {req.name!r}: {format_size(req.size)} more would take this "
                        f"tenant's volumes to {format_size(used + req.size)}, over its quota "
                        f"of {format_size(self.quota)}: remove a volume, or ask the operator "
                        "to raise --volume-quota")
            free = shutil.disk_usage(self.root).free
            if req.size > free:
                # Images are sparse, so this is no reservation; it refuses the impossible.
                raise ConfigError(f"volume {req.name!r}: {format_size(req.size)} is more than "
                                  f"the {format_size(free)} free on this host's data disk")
            vdir.mkdir(parents=True, mode=0o700)
            try:
                sysvol.make_image(vdir / sysvol.IMAGE_NAME, req.size)
            except sysvol.VolumeSysError as exc:
                shutil.rmtree(vdir, ignore_errors=True)
                raise ConfigError(f"cannot create volume {req.name!r}: {exc}") from None
            meta = {"name": req.name, "size": req.size, "created_at": now().isoformat()}
            (vdir / "volume.json").write_text(json.dumps(meta))
        return self._info(tenant, req.name)

    def get(self, name: str, owner: str | None = None) -> VolumeInfo:
        check_volume_name(name)
        return self._info(_tenant(owner), name)

    def list(self, owner: str | None = None) -> builtins.list[VolumeInfo]:
        tenant_dir = self.root / _tenant(owner)
        if not tenant_dir.is_dir():
            return []
        out = []
        for d in sorted(tenant_dir.iterdir()):
            if (d / "volume.json").is_file():
                out.append(self._info(_tenant(owner), d.name))
        return out

    def delete(self, name: str, owner: str | None = None) -> VolumeInfo:
        tenant = _tenant(owner)
        check_volume_name(name)
        with self._locked():
            info = self._info(tenant, name)
            if info.used_by:
                raise ConflictError(f"volume {name!r} is in use by sandbox "
                                    f"{', '.join(info.used_by)}: kill it first")
            self._unmount(self._mountpoint(tenant, name))
            shutil.rmtree(self._dir(tenant, name))
        return info

    # ----- sandboxes ---------------------------------------------------------------------
    def check(self, mounts: builtins.list[VolumeMount], owner: str | None,
              sandbox_id: str | None = None, *, disks: bool = False) -> None:
        """Raise now (before anything is started) if MOUNTS cannot be attached (as DISKS: to
        a tier that takes volumes as disks)."""
        tenant = _tenant(owner)
        for m in mounts:
            self._check_host(self._meta(tenant, m.name), m.name, disks)
            self._check_free(tenant, m, sandbox_id)

    @staticmethod
    def _check_host(meta: dict[str, Any], name: str, disks: bool) -> None:
        if meta.get(VM_WRITTEN) and not disks:
            raise ConfigError(f"volume {name!r} was written by a microVM: the host does not "
                              "mount a file system a VM wrote, so only --runtime microvm "
                              "sandboxes can use it")

    def _check_free(self, tenant: str, m: VolumeMount, sandbox_id: str | None) -> None:
        users = self._users(tenant, m.name, running_only=False)
        users.pop(sandbox_id or "", None)
        writers = [i for i, ro in users.items() if not ro]
        if writers:
            raise ConflictError(f"volume {m.name!r} is mounted read-write by sandbox "
                                f"{writers[0]}: one writer at a time")
        if users and not m.read_only:
            raise ConflictError(f"volume {m.name!r} is mounted read-only by sandbox "
                                f"{sorted(users)[0]}: it can be mounted read-write only when "
                                "no other sandbox uses it (or add :ro)")

    def attach(self, mounts: builtins.list[VolumeMount], sandbox_id: str, owner: str | None,
               uid: int) -> builtins.list[HostMount]:
        """Claim and mount each volume for SANDBOX_ID. A read-write volume's files are given to
        UID (the sandbox's host uid) so it can write what earlier sandboxes wrote."""

        def mount(tenant: str, m: VolumeMount) -> HostMount:
            mp = self._mount(tenant, m.name)
            if not m.read_only:
                sysvol.chown_tree(mp, uid, uid)
            mp.chmod(0o755)
            return HostMount(mp, m.path, m.read_only)

        return self._claim(mounts, sandbox_id, owner, mount)

    def attach_disks(self, mounts: builtins.list[VolumeMount], sandbox_id: str,
                     owner: str | None) -> builtins.list[VolumeDisk]:
        """Claim each volume for SANDBOX_ID as its image file, which the tier attaches as a disk
        (the guest gives a read-write one's files to its sandbox user). A volume a VM may have
        written is never mounted by the host again: its blocks are the guest's to forge."""

        def disk(tenant: str, m: VolumeMount) -> VolumeDisk:
            vdir = self._dir(tenant, m.name)
            if not m.read_only:
                meta = self._meta(tenant, m.name)
                if not meta.get(VM_WRITTEN):
                    self._unmount(self._mountpoint(tenant, m.name))  # one writer: unused
                    (vdir / "volume.json").write_text(json.dumps({**meta, VM_WRITTEN: True}))
            return VolumeDisk(vdir / sysvol.IMAGE_NAME, m.path, m.read_only)

        return self._claim(mounts, sandbox_id, owner, disk, disks=True)

    def _claim(self, mounts: builtins.list[VolumeMount], sandbox_id: str, owner: str | None,
               each: Callable[[str, VolumeMount], T], disks: bool = False) -> builtins.list[T]:
        tenant = _tenant(owner)
        out: builtins.list[T] = []
        with self._locked():
            try:
                for m in mounts:
                    self._check_host(self._meta(tenant, m.name), m.name, disks)
                    self._check_free(tenant, m, sandbox_id)
                    self._claims.setdefault((tenant, m.name), {})[sandbox_id] = m.read_only
                    out.append(each(tenant, m))
            except sysvol.VolumeSysError as exc:
                self._release_locked(sandbox_id)
                raise ConfigError(f"cannot mount volume: {exc}") from None
            except BaseException:
                self._release_locked(sandbox_id)
                raise
        return out

    def _mount(self, tenant: str, name: str) -> Path:
        """The volume mounted on the host (already, or now). Caller holds the lock."""
        mp = self._mountpoint(tenant, name)
        if not sysvol.is_mounted(mp):
            self.mount_root.mkdir(parents=True, exist_ok=True)
            # Traversable (not listable) by the sandbox's unprivileged host uid, which is what
            # bwrap runs as.
            self.mount_root.parent.chmod(0o711)
            self.mount_root.chmod(0o711)
            mp.parent.mkdir(exist_ok=True, mode=0o711)
            sysvol.mount(self._dir(tenant, name) / sysvol.IMAGE_NAME, mp)
        return mp

    def release(self, sandbox_id: str) -> None:
        """Drop SANDBOX_ID's claims; unmount volumes nobody else runs with."""
        with self._locked():
            self._release_locked(sandbox_id)

    def _release_locked(self, sandbox_id: str) -> None:
        for (tenant, name), users in builtins.list(self._claims.items()):
            if users.pop(sandbox_id, None) is None:
                continue
            if not users:
                del self._claims[(tenant, name)]
            others = self._users(tenant, name, running_only=True)
            others.pop(sandbox_id, None)
            if not others:
                self._unmount(self._mountpoint(tenant, name))

    def _unmount(self, mp: Path) -> None:
        """Unmount MP and remove the empty mount point and parents (nothing stays in /run)."""
        if sysvol.is_mounted(mp):
            sysvol.umount(mp)
        for d in (mp, mp.parent, mp.parent.parent):
            try:
                d.rmdir()
            except OSError:
                break

    def reconcile(self) -> None:
        """Unmount volumes left mounted by a dead owner (run after orphans are reconciled)."""
        if not self.mount_root.is_dir():
            return
        with self._locked():
            for point in sysvol.mounts_under(self.mount_root):
                mp = Path(point)
                try:
                    tenant, name = mp.relative_to(self.mount_root).parts
                except ValueError:
                    continue
                if not self._users(tenant, name, running_only=True):
                    self._unmount(mp)


def volume_uid(runtime: str, sandbox_id: str, workspace: Path | None) -> int:
    """The host uid a sandbox's files are written as, which a read-write volume is given to."""
    if runtime == "namespace":
        # As the namespace tier chooses it: the workspace owner, else the sandbox's own uid.
        return workspace.stat().st_uid if workspace is not None else host_uid_for(sandbox_id)
    # gVisor's gofer creates files as the uid seen inside (the sandbox user).
    return SANDBOX_UID


def make_volume_request(name: str, size: int | str) -> VolumeCreate:
    """A validated create request; bad input is a ConfigError naming what to fix."""
    check_volume_name(name)
    try:
        return VolumeCreate.model_validate({"name": name, "size": size})
    except ValidationError as exc:
        msg = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"invalid volume: {msg}") from None
