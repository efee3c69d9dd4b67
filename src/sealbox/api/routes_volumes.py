"""Named volumes: create, list, inspect, delete. A volume belongs to the tenant that made it;
another tenant's volume answers 404 like one that does not exist."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, status

from sealbox.api.deps import CallerDep, EngineDep
from sealbox.api.models import COMMON_ERRORS, ErrorBody
from sealbox.engine.volumes import VolumeCreate, VolumeInfo

router = APIRouter(prefix="/v1/volumes", tags=["volumes"], responses={
    **COMMON_ERRORS,
    409: {"model": ErrorBody, "description": "the volume exists already, or is in use"},
})


@router.post("", status_code=status.HTTP_201_CREATED, response_model=VolumeInfo, responses={
    403: {"model": ErrorBody, "description": "over this tenant's volume quota (--volume-quota)"}})
async def create_volume(body: VolumeCreate, engine: EngineDep, caller: CallerDep) -> VolumeInfo:
    """Create an empty volume of `size` bytes (a hard limit: writes past it fail with ENOSPC).
    Mount it with `volumes: [{"name", "path", "read_only"}]` when creating a sandbox."""
    return await asyncio.to_thread(engine.volumes.create, body, caller.tenant)


@router.get("", response_model=list[VolumeInfo])
async def list_volumes(engine: EngineDep, caller: CallerDep) -> list[VolumeInfo]:
    return await asyncio.to_thread(engine.volumes.list, caller.tenant)


@router.get("/{name}", response_model=VolumeInfo)
async def get_volume(name: str, engine: EngineDep, caller: CallerDep) -> VolumeInfo:
    return await asyncio.to_thread(engine.volumes.get, name, caller.tenant)


@router.delete("/{name}", response_model=VolumeInfo)
async def delete_volume(name: str, engine: EngineDep, caller: CallerDep) -> VolumeInfo:
    """Delete the volume and its data. Refused (409) while a sandbox uses it."""
    return await asyncio.to_thread(engine.volumes.delete, name, caller.tenant)
