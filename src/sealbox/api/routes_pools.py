"""Warm pools (admin only): keep sandboxes of a template and tier booted, ready to claim."""

from __future__ import annotations

from fastapi import APIRouter

from sealbox.api.deps import AdminDep, EngineDep
from sealbox.api.models import COMMON_ERRORS, _error
from sealbox.engine.pools import PoolConfig, PoolStatus

router = APIRouter(prefix="/v1/pools", tags=["pools"],
                   responses={**COMMON_ERRORS, 403: _error("this needs the admin API key")})


@router.get("", response_model=list[PoolStatus])
async def list_pools(engine: EngineDep, _: AdminDep) -> list[PoolStatus]:
    """Every pool: its size, how many members are ready, and its key (TEMPLATE/TIER)."""
    return engine.pools.list()


@router.put("", response_model=PoolStatus)
async def set_pool(config: PoolConfig, engine: EngineDep, _: AdminDep) -> PoolStatus:
    """Create or resize the pool of (template, runtime). Kept across server restarts.

    `create` takes a ready member when the request's template, tier and limits match the
    pool's; the member gets the caller's secrets, egress policy and env at that moment."""
    return await engine.pools.set(config)


@router.delete("/{template}/{runtime}", status_code=204)
async def remove_pool(template: str, runtime: str, engine: EngineDep, _: AdminDep) -> None:
    """Stop keeping the pool and kill its idle members (`base` = the host base image)."""
    await engine.pools.remove(template, runtime)
