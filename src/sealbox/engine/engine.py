"""The sandbox lifecycle: spec → create → running → stopped/killed/failed → gone.

The engine wires a sandbox's network namespace to the egress gateway and hands it to a tier.
Every path that ends a sandbox goes through `_finish`, which removes everything it had.
"""

from __future__ import annotations

import builtins

import asyncio
import contextlib
import logging
import secrets as pysecrets
import shutil
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sealbox._sys import netns
from sealbox._sys.threads import run_to_completion
from sealbox._sys import overlay
from sealbox._sys.cgroups import Cgroup
from sealbox.egress.gateway import Gateway, GatewayConfig
from sealbox.engine.config import EngineConfig
from sealbox.engine.events import EventLog
from sealbox.engine.spec import (
    ExecRequest,
    ExecResult,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SecretInfo,
)
from sealbox.engine import host_limits, snapshots, template_build, workspace_tar
from sealbox.engine.store import Store, now
from sealbox.engine.templates import Resolved, TemplateInfo, TemplateSpec, TemplateStore
from sealbox.engine.units import format_size
from sealbox.engine.pause import LOST_PROCESSES, PausedState, Saved, remaining_time
from sealbox.engine.pools import POOL_LABEL, Pools
from sealbox.engine.volumes import Volumes, volume_uid
from sealbox.errors import (
    CapacityError,
    ConfigError,
    NotFoundError,
    SandboxError,
    SandboxGone,
    SealboxError,
)
from sealbox.guest.client import ExecHandle, ExitStatus, GuestClient, Output
from sealbox.runtimes import registry
from sealbox.runtimes.base import LaunchSpec, Limits, Runtime, RunningSandbox

NETNS_PREFIX = "sealbox-"
_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_id() -> str:
    # Lowercase letters and digits only, so an id is a valid DNS label for preview URLs.
    return "sb" + "".join(pysecrets.choice(_ID_ALPHABET) for _ in range(12))


log = logging.getLogger("sealbox.engine")


def netns_name(sandbox_id: str) -> str:
    return NETNS_PREFIX + sandbox_id


@dataclass
class _Live:
    info: SandboxInfo
    runtime: RunningSandbox
    guest: GuestClient
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when ending starts (so it happens once)."""
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when everything of the sandbox has been removed and its final state recorded."""
    timer: asyncio.TimerHandle | None = None
    watcher: asyncio.Task[None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Merged into every command's env (a pool member's secrets and env arrive at claim)."""
    spec: SandboxSpec | None = None
    """What the caller asked for (with secret values): saved at pause to boot it again."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serialises pause and resume."""
    workdir: str | None = None
    """The template's default cwd for commands."""


def describe_limit(limit: str, info: SandboxInfo) -> str:
    if limit == "memory" and info.memory:
        return f"out of memory (limit {format_size(info.memory)})"
    if limit == "pids" and info.pids:
        return f"process limit reached (limit {info.pids} processes)"
    if limit == "timeout" and info.expires_at:
        seconds = (info.expires_at - info.created_at).total_seconds()
        return f"sandbox timeout reached (limit {seconds:g}s)"
    return f"{limit} limit reached"


OUTPUT_CAP = 16 * 1024 * 1024
"""Bytes of each stream kept for a command's result; streaming callers still get everything."""


class _Capped:
    """The first OUTPUT_CAP bytes of a stream: a command printing gigabytes cannot exhaust the
    engine's memory."""

    def __init__(self) -> None:
        self._parts: builtins.list[bytes] = []
        self._size = 0
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = OUTPUT_CAP - self._size
        if len(data) > room:
            self.truncated = True
            data = data[:room]
        if data:
            self._parts.append(data)
            self._size += len(data)

    def text(self) -> str:
        return b"".join(self._parts).decode(errors="replace")


async def _drain(handle: ExecHandle) -> None:
    with contextlib.suppress(SandboxGone):
        await handle.wait()


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.config.data_dir.chmod(0o700)
        self.store = Store(self.config.data_dir / "state.db")
        self.events = EventLog(self.config.data_dir / "logs")
        self.gateway = Gateway(GatewayConfig(
            data_dir=self.config.data_dir, subnet=self.config.subnet,
            resolve=list(self.config.resolve), upstream_ca=list(self.config.upstream_ca),
        ))
        self._live: dict[str, _Live] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._builds: set[asyncio.Task[Any]] = set()
        self._started = False
        self._booting = 0
        self.pools = Pools(self)
        self.volumes = Volumes(self.config.data_dir, self.config.run_root, self.store,
                               quota=self.config.volume_quota)
        self.templates = TemplateStore(self.config.data_dir)
        self.paused = PausedState(self.config.data_dir)
        self._resuming: set[str] = set()

    async def start(self) -> None:
        if self._started:
            return
        await self.gateway.start()
        await asyncio.to_thread(self.reconcile)
        self._started = True
        if self.config.start_pools:
            self.pools.load()

    async def close(self) -> None:
        """Kill every sandbox this engine runs. Nothing of them survives, except that a paused
        sandbox's saved state stays so the next engine can resume it (its processes end)."""
        await self.pools.stop()  # first: no refill may boot a sandbox while we kill them
        await self.cancel_builds()
        await asyncio.gather(*(
            self._suspend(live) if live.info.state == SandboxState.paused
            and self.paused.exists(sandbox_id) else self.kill(sandbox_id, reason="engine shut down")
            for sandbox_id, live in list(self._live.items())))
        await self.gateway.stop()
        self.store.close()
        self.templates.close()
        self._started = False

    # ----- reconciliation ---------------------------------------------------------------
    def reconcile(self) -> builtins.list[str]:
        """Clean up sandboxes whose owning process died (server crash, killed CLI)."""
        cleaned = []
        for info in self.store.orphans():
            self._remove_leftovers(info.id, info.runtime)
            if info.state == SandboxState.paused and self.paused.exists(info.id):
                # Survives its owner: resume restores or boots it again from what pause saved.
                if not self.paused.has_checkpoint(info.id) and info.resume_note != LOST_PROCESSES:
                    info.resume_note = LOST_PROCESSES
                    self.store.put(info)
                continue
            info.state = SandboxState.killed
            info.ended_at = now()
            info.end_reason = "owner process died; cleaned up on restart"
            self.store.put(info)
            cleaned.append(info.id)
        self.volumes.reconcile()
        self.paused.sweep({i.id for i in self.store.list(live_only=True)})
        self.templates.sweep({i.id for i in self.store.list(live_only=True)})
        return cleaned

    def _remove_leftovers(self, sandbox_id: str, runtime: str | None = None) -> None:
        if runtime in registry.names():
            registry.get(runtime).remove_leftovers(sandbox_id)
        cg = Cgroup(sandbox_id)
        if cg.exists():
            cg.kill_all()
            cg.remove()
        # Deleting the namespace also destroys the veth pair that joined it to the host.
        netns.delete(netns_name(sandbox_id))
        # A template layer's overlays: unmounted first, so rmtree never walks into them.
        overlay.unmount_all(self.config.run_root / sandbox_id)
        shutil.rmtree(self.config.run_root / sandbox_id, ignore_errors=True)
        self.volumes.release(sandbox_id)

    # ----- lifecycle --------------------------------------------------------------------
    async def create(self, spec: SandboxSpec, owner: str | None = None) -> SandboxInfo:
        return await self._create(spec, owner)

    async def _create(self, spec: SandboxSpec, owner: str | None,
                      restore: Path | None = None) -> SandboxInfo:
        """RESTORE: a checkpoint of another sandbox to start from (a fork), not a boot."""
        await self.start()
        runtime = registry.lookup(spec.runtime)
        timeout = spec.timeout
        cap = self.config.max_timeout
        if cap is not None and (timeout is None or timeout > cap):
            raise ConfigError(f"timeout exceeds this server's maximum of {cap:g} seconds")
        workspace: Path | None = None
        if spec.workspace is not None:
            if not self.config.allow_host_workspace:
                raise ConfigError("workspace mounts of host directories are not allowed here")
            workspace = Path(spec.workspace).resolve()
            if not workspace.is_dir():
                raise ConfigError(f"workspace {spec.workspace!r} is not a directory")
        if spec.volumes:
            await asyncio.to_thread(self.volumes.check, spec.volumes, owner,
                                    disks=runtime.volume_disks)
        self.gateway.check_policy(list(spec.allow_net))  # bad input must not cost a member
        # A warm pool member if one matches (claiming takes milliseconds), else a cold boot.
        # Volumes are bind-mounted at boot, so a sandbox with volumes never comes from a pool.
        live = None if spec.volumes or restore else self.pools.take(spec, runtime.name, owner)
        pooled = live is not None
        if live is None:
            if self._at_capacity():
                await self.pools.evict_one()  # an idle pool member yields to a real request
            live = await self._start(spec, runtime, workspace, bare=False, owner=owner,
                                     restore=restore)
        live.spec = spec
        try:
            await self._claim(live, spec, owner, timeout, pooled)
        except BaseException as exc:
            await self._finish(live, SandboxState.failed, f"failed to start: {exc}")
            raise
        return live.info.model_copy(deep=True)

    async def _start(self, spec: SandboxSpec, runtime: Runtime, workspace: Path | None, *,
                     bare: bool, owner: str | None = None,
                     metadata: dict[str, str] | None = None,
                     restore: Path | None = None) -> _Live:
        """`_boot`, except that a sandbox of a memory snapshot of RUNTIME's tier starts as a
        copy of the saved sandbox, processes and all (booted with the snapshot's files if the
        copy does not fit: another VM size or volumes than the snapshot's)."""
        template = self._template(spec, owner) if restore is None else None
        if template is not None and template.memory and template.memory[0] == runtime.name:
            live, why = await self._restore_or_boot(spec, runtime, workspace, template.memory[1],
                                                    bare=bare, owner=owner, metadata=metadata)
            if why is not None:
                log.info("sandbox %s: not a copy of snapshot %s (%s); booted with its files",
                         live.info.id, template.name, why)
            return live
        return await self._boot(spec, runtime, workspace, bare=bare, owner=owner,
                                metadata=metadata, restore=restore)

    async def _restore_or_boot(
            self, spec: SandboxSpec, runtime: Runtime, workspace: Path | None, checkpoint: Path,
            *, bare: bool, owner: str | None, metadata: dict[str, str] | None,
            sandbox_id: str | None = None, placeholders: dict[str, str] | None = None,
    ) -> tuple[_Live, str | None]:
        """A sandbox restored from CHECKPOINT, or, where that cannot be (another QEMU, VM size
        or disks than the checkpoint's), booted afresh under the same id; and why it was not
        restored (None if it was)."""
        sandbox_id = sandbox_id or new_id()
        try:
            return await self._boot(spec, runtime, workspace, bare=bare, owner=owner,
                                    metadata=metadata, sandbox_id=sandbox_id,
                                    restore=checkpoint, placeholders=placeholders), None
        except SealboxError as exc:
            why = str(exc)
        return await self._boot(spec, runtime, workspace, bare=bare, owner=owner,
                                metadata=metadata, sandbox_id=sandbox_id), why

    def _at_capacity(self) -> bool:
        cap = self.config.max_sandboxes
        return cap is not None and len(self._live) + self._booting >= cap

    async def _boot(self, spec: SandboxSpec, runtime: Runtime, workspace: Path | None, *,
                    bare: bool, metadata: dict[str, str] | None = None,
                    owner: str | None = None, sandbox_id: str | None = None,
                    restore: Path | None = None,
                    placeholders: dict[str, str] | None = None) -> _Live:
        """Start a sandbox up to its agent answering. BARE (a warm-pool member): attached to
        the gateway with no secrets and no egress, and no caller env; `_claim` adds them.
        RESTORE: a checkpoint to restore instead (with the PLACEHOLDERS its memory holds)."""
        if self._at_capacity():
            raise CapacityError(
                f"this installation runs at most {self.config.max_sandboxes} sandboxes at once; "
                "kill one or ask the operator to raise --max-sandboxes")
        crowded = host_limits.refusal(runtime.host_tasks, self.config.host_task_reserve)
        if crowded is not None:
            raise CapacityError(crowded)
        sandbox_id = sandbox_id or new_id()
        created = now()
        info = SandboxInfo(
            id=sandbox_id, state=SandboxState.creating, runtime=runtime.name, created_at=created,
            allow_net=[] if bare else list(spec.allow_net),
            secrets={} if bare else {k: SecretInfo(hosts=list(v.hosts))
                                     for k, v in spec.secrets.items()},
            cpus=spec.cpus, memory=spec.memory, pids=spec.pids, disk=spec.disk,
            metadata=dict(metadata or {}), owner=None if bare else owner,
            volumes=[] if bare else list(spec.volumes), template=spec.template,
        )
        template = self._template(spec, owner)  # no await: see the next line
        self._booting += 1  # counted from here, before any await, so the cap cannot be raced
        try:
            self.store.put(info)
            run_dir = self.config.run_root / sandbox_id
            run_dir.mkdir(parents=True, mode=0o711)
            ns = netns_name(sandbox_id)
            running: RunningSandbox | None = None
            try:
                await run_to_completion(netns.create, ns)
                attachment = await self.gateway.attach(
                    sandbox_id, ns, [] if bare else list(spec.allow_net),
                    {} if bare else dict(spec.secrets), run_dir, placeholders
                )
                for name, placeholder in attachment.placeholders.items():
                    info.secrets[name].placeholder = placeholder
                mounts = await run_to_completion(
                    self.volumes.attach, info.volumes, sandbox_id, owner,
                    volume_uid(runtime.name, sandbox_id, workspace),
                ) if info.volumes and not runtime.volume_disks else []
                disks = await run_to_completion(
                    self.volumes.attach_disks, info.volumes, sandbox_id, owner,
                ) if info.volumes and runtime.volume_disks else []
                launch = LaunchSpec(
                    sandbox_id=sandbox_id, netns=ns, run_dir=run_dir,
                    limits=Limits(cpus=spec.cpus, memory_bytes=spec.memory, pids=spec.pids,
                                  disk_bytes=spec.disk),
                    env={**attachment.env, **({} if bare else spec.env)}, hostname=sandbox_id,
                    workspace=workspace, ro_files=dict(attachment.ro_files), mounts=mounts,
                    disks=disks,
                    layer=template.layer if template else None, restore=restore,
                )
                if template is not None:
                    launch.env = {**attachment.env, **template.env, **launch.env}
                running = await runtime.start(launch)
                guest = await running.connect()
                if template is not None and restore is None:
                    await self._apply_template(guest, template)
            except BaseException as exc:
                if running is not None:
                    await running.kill()
                await self.gateway.detach(sandbox_id)
                await asyncio.to_thread(self._remove_leftovers, sandbox_id)
                info.state = SandboxState.failed
                info.ended_at = now()
                info.end_reason = f"failed to start: {exc}"
                self.store.put(info)
                raise
            info.state = SandboxState.running
            self.store.put(info)
            live = _Live(info=info, runtime=running, guest=guest,
                         workdir=template.workdir if template else None)
            if restore is not None:
                # The restored agent's env is the saved sandbox's: this one's secrets' placeholders,
                # env and id reach every command instead (as for a claimed pool member).
                live.env = {**launch.env, "SEALBOX_SANDBOX_ID": sandbox_id}
            self._live[sandbox_id] = live
        finally:
            self._booting -= 1
        live.watcher = asyncio.create_task(self._watch(live))
        return live

    async def _claim(self, live: _Live, spec: SandboxSpec, owner: str | None,
                     timeout: float | None, pooled: bool) -> None:
        """Give a booted sandbox its caller's identity: owner, metadata, and for a pool member
        its egress policy, secrets (fresh placeholders) and env. The clock starts here."""
        info = live.info
        sandbox_id = info.id
        if pooled:
            await self.gateway.set_policy(sandbox_id, list(spec.allow_net))
            placeholders = self.gateway.bind_secrets(sandbox_id, dict(spec.secrets))
            # The agent's env was fixed at boot: every command gets these merged in instead.
            live.env = {**live.env, **placeholders, **spec.env}
            info.allow_net = list(spec.allow_net)
            info.secrets = {k: SecretInfo(hosts=list(v.hosts), placeholder=placeholders[k])
                            for k, v in spec.secrets.items()}
        info.metadata = dict(spec.metadata)
        info.owner = owner
        info.created_at = now()
        info.expires_at = info.created_at + timedelta(seconds=timeout) if timeout else None
        self.store.put(info)
        if timeout:
            loop = asyncio.get_running_loop()
            live.timer = loop.call_later(
                timeout, lambda: asyncio.ensure_future(self._end(sandbox_id, "timeout"))
            )
        self.events.write(sandbox_id, "created", runtime=info.runtime, pooled=pooled)

    def sandbox_env(self, sandbox_id: str, owner: str | None = None) -> dict[str, str]:
        """Env every command of the sandbox gets on top of the agent's own (secrets'
        placeholders and the caller's env when it came from a warm pool)."""
        return dict(self._running(sandbox_id, owner).env)

    async def _watch(self, live: _Live) -> None:
        exit_info = await live.runtime.wait()
        if not live.ended.is_set():
            reason = (describe_limit(exit_info.limit, live.info) if exit_info.limit
                      else f"sandbox init exited with code {exit_info.code}")
            await self._finish(live, SandboxState.failed if exit_info.limit else
                               SandboxState.stopped, reason)

    async def _end(self, sandbox_id: str, limit: str) -> None:
        live = self._live.get(sandbox_id)
        if live is not None:
            reason = describe_limit(limit, live.info)
            if limit == "timeout" and live.spec is not None and live.spec.timeout:
                # Not expires_at - created_at: time spent paused does not count.
                reason = f"sandbox timeout reached (limit {live.spec.timeout:g}s)"
            await self._finish(live, SandboxState.killed, reason)

    async def _teardown(self, live: _Live) -> None:
        """End LIVE's processes and remove everything it had on the host (its record stays)."""
        try:
            await live.guest.close()
            await live.runtime.kill()
            await self.gateway.detach(live.info.id)
        finally:
            await asyncio.to_thread(self._remove_leftovers, live.info.id)
            self._live.pop(live.info.id, None)

    async def _finish(self, live: _Live, state: SandboxState, reason: str) -> None:
        if live.ended.is_set():
            await live.gone.wait()
            return
        live.ended.set()
        sandbox_id = live.info.id
        if live.timer is not None:
            live.timer.cancel()
        try:
            await self._teardown(live)
        finally:
            self.paused.discard(sandbox_id)
            live.info.state = state
            live.info.ended_at = now()
            live.info.end_reason = reason
            self.store.put(live.info)
            self.events.write(sandbox_id, "ended", state=state.value, reason=reason)
            live.gone.set()

    async def kill(self, sandbox_id: str, owner: str | None = None,
                   reason: str = "killed by request") -> SandboxInfo:
        live = self._owned_live(sandbox_id, owner)
        if live is None:
            info = self.get(sandbox_id, owner)
            if info.state == SandboxState.paused and self._dormant(sandbox_id):
                return await asyncio.to_thread(self._end_dormant, info, reason)
            return info
        await self._finish(live, SandboxState.killed, reason)
        return live.info.model_copy(deep=True)

    async def wait(self, sandbox_id: str) -> SandboxInfo:
        live = self._live.get(sandbox_id)
        if live is not None:
            await live.gone.wait()
        return self.get(sandbox_id)

    # ----- pause and resume (engine/pause.py says what survives what) ----------------------
    async def pause(self, sandbox_id: str, owner: str | None = None) -> SandboxInfo:
        """Stop the sandbox's clock and CPU: saved whole to disk where the tier can checkpoint
        (then removed from the host), frozen in place elsewhere, with what can outlive its
        owner saved too."""
        live = self._running(sandbox_id, owner)
        async with live.lock:
            info = live.info
            if info.state != SandboxState.running or live.ended.is_set():
                raise SandboxError(f"sandbox {sandbox_id} is {info.state.value}, not running")
            paused_at = now()
            remaining = remaining_time(info, paused_at)
            if live.timer is not None:
                live.timer.cancel()
                live.timer = None
            info.state = SandboxState.paused  # no new commands while saving
            # A pool member never claimed has no spec; claimed ones always do.
            checkpoint = live.spec is not None and live.runtime.can_checkpoint
            try:
                if live.spec is not None:
                    placeholders = {k: v.placeholder for k, v in info.secrets.items()
                                    if v.placeholder}
                    await self.paused.save(live.guest, Saved(live.spec, remaining, placeholders),
                                           sandbox_id, info.disk)
                if checkpoint:
                    await live.runtime.checkpoint(self.paused.checkpoint_dir(sandbox_id))
                else:
                    await live.runtime.pause()
            except BaseException:
                info.state = SandboxState.running
                self.paused.discard(sandbox_id)
                self._arm_timer(live, remaining)
                raise
            info.paused_at = paused_at
            self.store.put(info)
            self.events.write(sandbox_id, "paused", remaining=remaining, checkpoint=checkpoint)
            if checkpoint:
                # Saved whole: nothing of it stays on the host until it is resumed.
                await self._put_away(live, None, "paused to disk")
            return info.model_copy(deep=True)

    async def resume(self, sandbox_id: str, owner: str | None = None) -> SandboxInfo:
        """Thaw a paused sandbox; the clock runs again with the time that was left. A sandbox
        whose owner died while it was paused is booted again from what pause saved."""
        live = self._owned_live(sandbox_id, owner)
        if live is None:
            info = self.get(sandbox_id, owner)
            if info.state == SandboxState.paused and self._dormant(sandbox_id):
                if sandbox_id in self._resuming:
                    raise SandboxError(f"sandbox {sandbox_id} is being resumed already")
                self._resuming.add(sandbox_id)
                try:
                    return await self._resume_dormant(info)
                finally:
                    self._resuming.discard(sandbox_id)
            raise SandboxError(f"sandbox {sandbox_id} is not paused (it is {info.state.value})")
        async with live.lock:
            info = live.info
            if info.state != SandboxState.paused or live.ended.is_set():
                raise SandboxError(f"sandbox {sandbox_id} is not paused (it is "
                                   f"{info.state.value})")
            await live.runtime.resume()
            remaining = remaining_time(info, info.paused_at)
            info.expires_at = now() + timedelta(seconds=remaining) if remaining else None
            self._arm_timer(live, remaining)
            info.state = SandboxState.running
            info.paused_at = None
            info.resumed_processes = True
            info.resume_note = None
            self.paused.discard(sandbox_id)
            self.store.put(info)
            self.events.write(sandbox_id, "resumed", processes=True)
            return info.model_copy(deep=True)

    async def _suspend(self, live: _Live) -> None:
        """End a paused sandbox's processes and everything on the host, keeping its record
        (paused) and saved state: the engine is shutting down, and a later one resumes it."""
        async with live.lock:
            if not live.ended.is_set():
                await self._put_away(live, LOST_PROCESSES, "engine shut down")

    async def _put_away(self, live: _Live, note: str | None, reason: str) -> None:
        """Remove a paused sandbox from the host, keeping its record and saved state for any
        engine to resume (`_resume_dormant`). The caller holds LIVE's lock."""
        live.ended.set()
        sandbox_id = live.info.id
        try:
            await self._teardown(live)
        finally:
            live.info.resume_note = note
            self.store.put(live.info)
            self.store.disown(sandbox_id)
            self.events.write(sandbox_id, "suspended", reason=reason)
            live.gone.set()

    def _arm_timer(self, live: _Live, seconds: float | None) -> None:
        if seconds is None:
            return
        sandbox_id = live.info.id
        live.timer = asyncio.get_running_loop().call_later(
            seconds, lambda: asyncio.ensure_future(self._end(sandbox_id, "timeout")))

    def _dormant(self, sandbox_id: str) -> bool:
        """Paused, and its owner died: only its saved state is left, for any engine to resume."""
        return (sandbox_id not in self._live and self.paused.exists(sandbox_id)
                and any(o.id == sandbox_id for o in self.store.orphans()))

    def _end_dormant(self, info: SandboxInfo, reason: str) -> SandboxInfo:
        self.paused.discard(info.id)
        info.state = SandboxState.killed
        info.ended_at = now()
        info.end_reason = reason
        info.paused_at = None
        self.store.put(info)
        self.events.write(info.id, "ended", state=info.state.value, reason=reason)
        return info

    async def _resume_dormant(self, old: SandboxInfo) -> SandboxInfo:
        """Restore a sandbox paused to disk, or boot it again with the files pause saved."""
        sandbox_id = old.id
        saved = self.paused.load(sandbox_id)
        spec = saved.spec
        runtime = registry.lookup(old.runtime)
        workspace = Path(spec.workspace) if spec.workspace else None
        if spec.volumes:
            await asyncio.to_thread(self.volumes.check, spec.volumes, old.owner, sandbox_id,
                                    disks=runtime.volume_disks)
        self.store.adopt(sandbox_id)  # ours now: nobody else reconciles it away meanwhile
        note = old.resume_note or LOST_PROCESSES
        restored = self.paused.has_checkpoint(sandbox_id)
        if restored:
            live, why = await self._restore_or_boot(
                spec, runtime, workspace, self.paused.checkpoint_dir(sandbox_id), bare=False,
                owner=old.owner, metadata=old.metadata, sandbox_id=sandbox_id,
                placeholders=saved.placeholders)
            if why is not None:
                restored = False
                note = (f"its processes could not be restored ({why}); /workspace was "
                        "restored from the files saved at pause")
                self.events.write(sandbox_id, "restore_failed", reason=why)
                self.paused.drop_checkpoint(sandbox_id)
        else:
            live = await self._boot(spec, runtime, workspace, bare=False, owner=old.owner,
                                    sandbox_id=sandbox_id, metadata=old.metadata)
        live.spec = spec
        try:
            await self._claim(live, spec, old.owner, saved.remaining, False)
            if not restored:
                await self.paused.restore_files(live.guest, sandbox_id)
        except BaseException as exc:
            await self._finish(live, SandboxState.failed, f"failed to resume: {exc}")
            raise
        info = live.info
        info.created_at = old.created_at
        info.resumed_processes = restored
        info.resume_note = None if restored else note
        self.paused.discard(sandbox_id)
        self.store.put(info)
        self.events.write(sandbox_id, "resumed", processes=restored)
        return info.model_copy(deep=True)

    # ----- templates, snapshots, fork (engine/templates.py, template_build.py, snapshots.py) --
    def _template(self, spec: SandboxSpec, owner: str | None) -> Resolved | None:
        if spec.template is None:
            return None
        return self.templates.resolve(spec.template, owner)

    async def _apply_template(self, guest: GuestClient, template: Resolved) -> None:
        """What a template adds once the agent answers: its /workspace, its start command."""
        if template.workspace_tar is not None:
            await workspace_tar.restore(guest, template.workspace_tar)
        if template.start:
            handle = await guest.exec(["/bin/sh", "-c", template.start],
                                      cwd=template.workdir, background=True)
            task = asyncio.create_task(_drain(handle))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def build_template(self, spec: TemplateSpec, owner: str | None = None,
                             progress: template_build.Progress | None = None) -> TemplateInfo:
        task = asyncio.current_task()
        if task is not None:
            self._builds.add(task)  # close() cancels it: the build sandbox is not in _live
        try:
            return await template_build.build(self, spec, owner, progress)
        finally:
            self._builds.discard(task)

    async def cancel_builds(self) -> None:
        """Stop every template build of this engine; each removes all it made."""
        builds = list(self._builds)
        for task in builds:
            task.cancel()
        # Each build removes its sandbox, mounts and scratch dir as it unwinds.
        await asyncio.gather(*builds, return_exceptions=True)

    def resolve_template(self, name: str, owner: str | None = None) -> Resolved:
        """What a sandbox from NAME gets (layer, workspace, env, workdir); NotFoundError."""
        return self.templates.resolve(name, owner)

    def list_templates(self, owner: str | None = None) -> builtins.list[TemplateInfo]:
        return self.templates.list(owner)

    def get_template(self, name: str, owner: str | None = None) -> TemplateInfo:
        return self.templates.get(name, owner)

    def remove_template(self, name: str, owner: str | None = None) -> TemplateInfo:
        return self.templates.remove(name, owner)

    def template_log(self, name: str, owner: str | None = None) -> str:
        path = self.templates.log_path(name, owner)
        if not path.is_file():
            raise NotFoundError(f"no build log for template {name!r}")
        return path.read_text(errors="replace")

    async def snapshot(self, sandbox_id: str, name: str, owner: str | None = None
                       ) -> TemplateInfo:
        return await snapshots.snapshot(self, sandbox_id, name, owner)

    async def fork(self, sandbox_id: str, owner: str | None = None) -> SandboxInfo:
        return await snapshots.fork(self, sandbox_id, owner)

    # ----- queries ----------------------------------------------------------------------
    def get(self, sandbox_id: str, owner: str | None = None) -> SandboxInfo:
        live = self._live.get(sandbox_id)
        info = live.info.model_copy(deep=True) if live else self.store.get(sandbox_id)
        if info is None or (owner is not None and info.owner != owner):
            raise NotFoundError(f"no sandbox {sandbox_id!r}: check the id with `sealbox ls`")
        return info

    def list(self, owner: str | None = None, include_ended: bool = False) -> builtins.list[SandboxInfo]:
        return self.store.list(owner=owner, live_only=not include_ended)

    def _owned_live(self, sandbox_id: str, owner: str | None) -> _Live | None:
        self.get(sandbox_id, owner)  # raises NotFound for other tenants' ids
        return self._live.get(sandbox_id)

    def _running(self, sandbox_id: str, owner: str | None) -> _Live:
        live = self._owned_live(sandbox_id, owner)
        if live is None or live.ended.is_set():
            info = self.get(sandbox_id, owner)
            if info.state == SandboxState.paused:  # paused while its old server died
                raise SandboxError(f"sandbox {sandbox_id} is paused: resume it first")
            raise SandboxGone(
                f"sandbox {sandbox_id} is {info.state.value}"
                + (f": {info.end_reason}" if info.end_reason else "")
            )
        if live.info.state == SandboxState.paused:
            raise SandboxError(f"sandbox {sandbox_id} is paused: resume it first")
        if POOL_LABEL in live.info.metadata:
            # Nobody (not even the admin) runs anything in a member before its one claimant.
            raise SandboxError(f"sandbox {sandbox_id} is an unclaimed warm-pool member")
        return live

    def guest(self, sandbox_id: str, owner: str | None = None) -> GuestClient:
        return self._running(sandbox_id, owner).guest

    def sandbox_address(self, sandbox_id: str, owner: str | None = None) -> str:
        """The sandbox's own address on its link (host-initiated connections reach it)."""
        self._running(sandbox_id, owner)
        return str(self.gateway._get(sandbox_id).link.sandbox_ip)

    # ----- commands ---------------------------------------------------------------------
    async def exec(self, sandbox_id: str, req: ExecRequest, owner: str | None = None,
                   pty: tuple[int, int] | None = None) -> ExecHandle:
        live = self._running(sandbox_id, owner)
        argv, shell = (None, req.cmd) if isinstance(req.cmd, str) else (list(req.cmd), None)
        handle = await live.guest.exec(
            argv, shell=shell, env={**live.env, **req.env} or None, cwd=req.cwd or live.workdir, timeout=req.timeout, pty=pty,
            background=req.background, stdin=req.stdin is not None,
        )
        if req.stdin is not None:
            await handle.write_stdin(req.stdin.encode())
            await handle.close_stdin()
        self.events.write(sandbox_id, "exec", cmd=req.cmd, pid=handle.pid)
        return handle

    async def exec_stream(self, sandbox_id: str, req: ExecRequest, owner: str | None = None
                          ) -> AsyncIterator[Output | ExecResult]:
        """Output chunks as they come, then one ExecResult (with `limit` if a limit killed it)."""
        live = self._running(sandbox_id, owner)
        before = live.runtime.limit_events()
        handle = await self.exec(sandbox_id, req, owner)
        out, err = _Capped(), _Capped()
        try:
            async for item in handle:
                if isinstance(item, Output):
                    (err if item.stream == "stderr" else out).add(item.data)
                    yield item
                else:
                    yield self._result(live, before, item, out, err)
        except SandboxGone:
            # The sandbox ended under the command: say why, once teardown has recorded it.
            try:
                await asyncio.wait_for(live.gone.wait(), timeout=15)
            except TimeoutError:
                raise SandboxGone(f"sandbox {sandbox_id} ended during the command") from None
            if live.info.state == SandboxState.paused:
                raise SandboxGone(
                    f"sandbox {sandbox_id} was paused to disk while this command ran, which "
                    "ended it (commands started with background=True carry on after resume)",
                    reason="paused") from None
            raise SandboxGone(f"sandbox {sandbox_id} ended: {live.info.end_reason}",
                              reason=live.info.end_reason) from None

    async def run(self, sandbox_id: str, req: ExecRequest, owner: str | None = None) -> ExecResult:
        """Run a command to completion; with ``background`` return as soon as it started."""
        if req.background:
            handle = await self.exec(sandbox_id, req, owner)
            # Drain its output so flow control never stalls a command nobody listens to.
            task = asyncio.create_task(_drain(handle))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return ExecResult(exit_code=None, pid=handle.pid, stdout="", stderr="")
        result: ExecResult | None = None
        async for item in self.exec_stream(sandbox_id, req, owner):
            if isinstance(item, ExecResult):
                result = item
        if result is None:
            raise SandboxGone(f"sandbox {sandbox_id} ended before the command finished")
        return result

    def _result(self, live: _Live, before: dict[str, int], status: ExitStatus,
                stdout: _Capped, stderr: _Capped) -> ExecResult:
        after = live.runtime.limit_events()
        limit = next((k for k, v in after.items() if v > before.get(k, 0)), status.limit)
        killed = status.signal is not None or status.exit_code > 128
        if limit == "memory" and not killed:
            limit = None  # an OOM kill elsewhere in the sandbox did not end this command
        return ExecResult(
            exit_code=status.exit_code, pid=None, stdout=stdout.text(), stderr=stderr.text(),
            truncated=stdout.truncated or stderr.truncated, signal=status.signal,
            timed_out=status.timed_out,
            limit=describe_limit(limit, live.info) if limit else None,
        )

    # ----- egress -----------------------------------------------------------------------
    async def set_egress(self, sandbox_id: str, allow_net: builtins.list[str],
                         owner: str | None = None) -> SandboxInfo:
        live = self._running(sandbox_id, owner)
        await self.gateway.set_policy(sandbox_id, allow_net)
        live.info.allow_net = list(allow_net)
        self.store.put(live.info)
        return live.info.model_copy(deep=True)

    def egress_log(self, sandbox_id: str, owner: str | None = None) -> builtins.list[dict[str, Any]]:
        self.get(sandbox_id, owner)
        return self.gateway.audit_events(sandbox_id)

    def logs(self, sandbox_id: str, owner: str | None = None) -> builtins.list[dict[str, Any]]:
        self.get(sandbox_id, owner)
        return self.events.read(sandbox_id)
