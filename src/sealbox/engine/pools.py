"""Warm pools: N sandboxes per (template, tier) booted ahead of time, claimed by `create`.

A pool member is booted *bare*: its network namespace is attached to the gateway with no
secrets and an empty allowlist, and its agent holds no caller env. `Engine.create` takes one
whose limits match the request (limits are part of a pool's configuration, not changed at
claim), and `Engine._claim` gives it the caller's owner, policy, secrets and env, and starts
its clock. A claimed member leaves the pool for good; one that died while idle is dropped.
Each pool refills in the background (at most `REFILL_CONCURRENCY` boots at a time per pool),
never past the engine's `max_sandboxes`. Configurations live in the store's `pools` table.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sealbox.engine.spec import RuntimeName, SandboxSpec, SandboxState
from sealbox.engine.units import checked, parse_size
from sealbox.errors import CapacityError, ConfigError, NotFoundError, SealboxError
from sealbox.runtimes import registry

if TYPE_CHECKING:
    from sealbox.engine.engine import Engine, _Live

log = logging.getLogger("sealbox.engine")

POOL_LABEL = "sealbox.pool"
"""Metadata key on an unclaimed member (admins see members in `ls`; tenants never do)."""
REFILL_CONCURRENCY = 2
RETRY_SECONDS = 5.0
"""Pause after a failed boot before the pool tries again (a broken template must not spin)."""
CHECK_SECONDS = 1.0
"""How often an idle pool looks for members that died while idle."""
MAX_SIZE = 1000
BASE = "base"
_DEFAULTS = SandboxSpec()


class PoolConfig(BaseModel):
    """What an operator asks for: keep SIZE sandboxes of TEMPLATE on RUNTIME ready."""

    model_config = ConfigDict(extra="forbid")

    template: str | None = Field(default=None, description="template name; null = host base image")
    runtime: RuntimeName = "auto"
    size: int = Field(ge=0, le=MAX_SIZE)
    cpus: float | None = Field(default=_DEFAULTS.cpus, gt=0, le=256)
    memory: int | None = Field(default=_DEFAULTS.memory, description="bytes")
    pids: int | None = Field(default=_DEFAULTS.pids, gt=0)
    disk: int | None = Field(default=_DEFAULTS.disk, description="bytes")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        return None if v in (None, "", BASE) else v

    @field_validator("memory", "disk", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | None:
        return None if v is None else checked(parse_size, v)

    @property
    def key(self) -> str:
        return pool_key(self.template, self.runtime)

    def spec(self) -> SandboxSpec:
        fields: dict[str, Any] = dict(runtime=self.runtime, timeout=None, cpus=self.cpus,
                                      memory=self.memory, pids=self.pids, disk=self.disk)
        if self.template is not None:
            fields["template"] = self.template
        try:
            return SandboxSpec(**fields)
        except ValidationError as exc:
            raise ConfigError(f"invalid pool: {exc.errors()[0].get('msg', exc)}") from None


def pool_key(template: str | None, runtime: str) -> str:
    return f"{template or BASE}/{runtime}"


class PoolStatus(BaseModel):
    key: str
    template: str | None
    runtime: str
    size: int
    ready: int = Field(description="booted members waiting for a claim")
    booting: int
    cpus: float | None
    memory: int | None
    pids: int | None
    disk: int | None
    error: str | None = Field(default=None, description="why the last refill boot failed")


@dataclass(frozen=True)
class _Member:
    live: _Live
    template_hash: str | None
    """The template content it was booted from (None: host base image)."""


@dataclass
class _Pool:
    config: PoolConfig
    idle: deque[_Member] = field(default_factory=deque)
    booting: int = 0
    error: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def status(self) -> PoolStatus:
        c = self.config
        return PoolStatus(key=c.key, template=c.template, runtime=c.runtime, size=c.size,
                          ready=sum(1 for m in self.idle if not m.live.ended.is_set()),
                          booting=self.booting, cpus=c.cpus, memory=c.memory, pids=c.pids,
                          disk=c.disk, error=self.error)


def _template_of(spec: SandboxSpec) -> str | None:
    # `template` and `volumes` come with the templates and volumes parts of the engine.
    name = getattr(spec, "template", None)
    return None if name in (None, "", BASE) else str(name)


class Pools:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pools: dict[str, _Pool] = {}

    # ----- configuration ----------------------------------------------------------------
    def _template_hash(self, name: str | None, owner: str | None) -> str | None:
        """The content hash NAME means for OWNER (templates are per owner, so members are
        matched by what they were booted from, never by name alone); None = host base."""
        if name is None:
            return None
        resolve = getattr(self._engine, "resolve_template", None)
        if resolve is None:
            raise ConfigError(f"unknown template {name!r}")
        try:
            return str(resolve(name, owner).hash)
        except NotFoundError as exc:
            raise ConfigError(f"unknown template {name!r}: {exc.message}") from None

    def _resolve(self, config: PoolConfig) -> PoolConfig:
        """CONFIG with a concrete tier, checked: the tier works here, the template exists."""
        runtime = registry.lookup(config.runtime).name
        config = config.model_copy(update={"runtime": runtime})
        self._template_hash(config.template, None)  # the operator's template exists
        config.spec()  # limits valid for a sandbox
        return config

    async def set(self, config: PoolConfig) -> PoolStatus:
        """Create or resize a pool; persisted, so a restarted server refills it."""
        config = self._resolve(config)
        self._engine.store.put_pool(config.key, config.model_dump_json())
        pool = self._pools.get(config.key)
        if pool is None:
            pool = self._pools[config.key] = _Pool(config)
        else:
            if pool.config != config:
                # Other limits: the current members no longer match; replace them.
                await self._kill_idle(pool, len(pool.idle))
            pool.config = config
            pool.error = None
        self._run(pool)
        pool.wake.set()
        return pool.status()

    async def remove(self, template: str | None, runtime: str) -> None:
        tier = registry.lookup(runtime).name if runtime == "auto" else runtime
        key = pool_key(None if template in (None, "", BASE) else template, tier)
        pool = self._pools.pop(key, None)
        stored = any(PoolConfig.model_validate_json(c).key == key
                     for c in self._engine.store.list_pools())
        if pool is None and not stored:
            raise NotFoundError(f"no pool {key!r}: see `sealbox pool ls`")
        self._engine.store.delete_pool(key)
        if pool is not None:
            await self._stop_pool(pool)

    def list(self) -> builtins.list[PoolStatus]:
        return [p.status() for _, p in sorted(self._pools.items())]

    def load(self) -> None:
        """Start every pool kept in the store (a restarted server refills its pools)."""
        for text in self._engine.store.list_pools():
            try:
                config = PoolConfig.model_validate_json(text)
            except ValidationError:
                log.error("ignoring an unreadable pool configuration: %s", text)
                continue
            if config.key not in self._pools:
                pool = self._pools[config.key] = _Pool(config)
                self._run(pool)

    async def stop(self) -> None:
        """Stop refilling and kill every idle member (the engine is shutting down)."""
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await self._stop_pool(pool)

    # ----- claiming ---------------------------------------------------------------------
    def take(self, spec: SandboxSpec, runtime: str, owner: str | None = None) -> _Live | None:
        """An idle member matching SPEC (for OWNER's meaning of its template), removed from its
        pool for good; None if there is none. Does not await between finding and removing
        it: nothing else can take the same member."""
        if spec.workspace is not None or getattr(spec, "volumes", None):
            return None
        template = _template_of(spec)
        pool = self._pools.get(pool_key(template, runtime))
        if pool is None:
            return None
        c = pool.config
        if (spec.cpus, spec.memory, spec.pids, spec.disk) != (c.cpus, c.memory, c.pids, c.disk):
            return None
        try:
            wanted = self._template_hash(template, owner)
        except ConfigError:
            return None  # create reports it
        pool.wake.set()
        for member in list(pool.idle):
            if member.live.ended.is_set():
                pool.idle.remove(member)
            elif member.template_hash == wanted:
                pool.idle.remove(member)
                member.live.info.metadata.pop(POOL_LABEL, None)
                return member.live
        return None

    async def evict_one(self) -> bool:
        """Kill one idle member (of the fullest pool) to make room for a request."""
        pools = [p for p in self._pools.values() if p.idle]
        if not pools:
            return False
        pool = max(pools, key=lambda p: len(p.idle))
        await self._kill_idle(pool, 1, reason="evicted to make room under max_sandboxes")
        return True

    # ----- refill -----------------------------------------------------------------------
    def _run(self, pool: _Pool) -> None:
        if pool.task is None or pool.task.done():
            pool.task = asyncio.create_task(self._refill(pool), name=f"pool {pool.config.key}")

    async def _refill(self, pool: _Pool) -> None:
        while True:
            try:
                await self._refill_once(pool)
            except Exception as exc:  # a refill bug must not stop the pool for good
                log.exception("pool %s: refill failed", pool.config.key)
                pool.error = f"refill failed: {exc}"
                await asyncio.sleep(RETRY_SECONDS)

    async def _refill_once(self, pool: _Pool) -> None:
        """One round: drop dead or outdated members, trim, boot what is missing, or wait."""
        try:
            current = self._template_hash(pool.config.template, None)
        except ConfigError as exc:
            pool.error, current = exc.message, "?"
        # Dead members, and members of a template since rebuilt or removed, go.
        stale = [m for m in pool.idle if m.template_hash != current]
        pool.idle = deque(m for m in pool.idle
                          if not m.live.ended.is_set() and m.template_hash == current)
        if stale:
            await asyncio.gather(*(self._engine._finish(m.live, SandboxState.killed,
                                                        "pool template changed")
                                   for m in stale))
        extra = len(pool.idle) - pool.config.size
        if extra > 0:
            await self._kill_idle(pool, extra, reason="pool shrunk")
        missing = pool.config.size - len(pool.idle)
        room = missing
        cap = self._engine.config.max_sandboxes
        if cap is not None:
            room = min(room, cap - len(self._engine._live) - self._engine._booting)
        n = max(0, min(room, REFILL_CONCURRENCY))
        if n:
            results = await asyncio.gather(*(self._boot_one(pool) for _ in range(n)),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            # Full (a capacity limit) is said, but waited out without a retry delay.
            pool.error = str(failed[0]) if failed else None
            if failed and not isinstance(failed[0], CapacityError):
                await asyncio.sleep(RETRY_SECONDS)
            if not failed:
                return  # straight to the next round
        pool.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.wake.wait(), CHECK_SECONDS)

    async def _boot_one(self, pool: _Pool) -> None:
        engine = self._engine
        config = pool.config
        pool.booting += 1
        try:
            template_hash = self._template_hash(config.template, None)
            member = await engine._start(config.spec(), registry.get(config.runtime), None,
                                         bare=True, metadata={POOL_LABEL: config.key})
        except SealboxError as exc:
            log.warning("pool %s: boot failed: %s", config.key, exc.message)
            raise
        finally:
            pool.booting -= 1
        if self._pools.get(config.key) is not pool or pool.config != config:
            # Removed or reconfigured while booting: this member belongs nowhere.
            await engine._finish(member, SandboxState.killed, "pool removed")
            return
        pool.idle.append(_Member(member, template_hash))

    async def _kill_idle(self, pool: _Pool, n: int, reason: str = "pool changed") -> None:
        victims = [pool.idle.pop() for _ in range(min(n, len(pool.idle)))]
        await asyncio.gather(*(self._engine._finish(m.live, SandboxState.killed, reason)
                               for m in victims))

    async def _stop_pool(self, pool: _Pool) -> None:
        if pool.task is not None:
            pool.task.cancel()
            # Cancelling a boot in progress cleans it up (Engine._boot removes what it made).
            await asyncio.gather(pool.task, return_exceptions=True)
        await self._kill_idle(pool, len(pool.idle), reason="pool removed")


