"""Files inside a sandbox. Contents stream both ways: nothing is held whole in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import StreamingResponse

from sealbox.api.deps import CallerDep, EngineDep
from sealbox.api.models import COMMON_ERRORS, SANDBOX_ERRORS, PathBody, RenameBody
from sealbox.guest.client import FileInfo, GuestClient

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"],
                   responses={**COMMON_ERRORS, **SANDBOX_ERRORS})

PathQuery = Annotated[str, Query(min_length=1, description="absolute path inside the sandbox")]
OCTET = "application/octet-stream"


def _guest(engine: EngineDep, caller: CallerDep, sandbox_id: str) -> GuestClient:
    return engine.guest(sandbox_id, owner=caller.owner)


@router.get("", response_class=StreamingResponse,
            responses={200: {"content": {OCTET: {"schema": {"type": "string", "format": "binary"}}}}})
async def read_file(sandbox_id: str, path: PathQuery, engine: EngineDep,
                    caller: CallerDep) -> StreamingResponse:
    """The file's bytes, streamed."""
    chunks = _guest(engine, caller, sandbox_id).read_file(path)
    # Pull the first chunk now, so a missing file is a 404 rather than a broken 200.
    first = await anext(chunks, b"")

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), media_type=OCTET)


@router.put("", status_code=status.HTTP_204_NO_CONTENT, openapi_extra={"requestBody": {"required": True, "content": {
    OCTET: {"schema": {"type": "string", "format": "binary"}}}}})
async def write_file(
    sandbox_id: str, path: PathQuery, request: Request, engine: EngineDep, caller: CallerDep,
    mode: Annotated[str, Query(pattern=r"^[0-7]{3,4}$", description="octal permissions")] = "644",
) -> None:
    """Create or replace the file with the raw request body, streamed into the sandbox."""
    await _guest(engine, caller, sandbox_id).write_file(path, request.stream(), mode=int(mode, 8))


@router.delete("", status_code=status.HTTP_204_NO_CONTENT)
async def remove(sandbox_id: str, path: PathQuery, engine: EngineDep, caller: CallerDep,
                 recursive: bool = False) -> None:
    await _guest(engine, caller, sandbox_id).remove(path, recursive=recursive)


@router.get("/list", response_model=list[FileInfo])
async def list_dir(sandbox_id: str, path: PathQuery, engine: EngineDep,
                   caller: CallerDep) -> list[FileInfo]:
    return await _guest(engine, caller, sandbox_id).list_dir(path)


@router.get("/stat", response_model=FileInfo)
async def stat(sandbox_id: str, path: PathQuery, engine: EngineDep, caller: CallerDep) -> FileInfo:
    return await _guest(engine, caller, sandbox_id).stat(path)


@router.post("/mkdir", status_code=status.HTTP_204_NO_CONTENT)
async def mkdir(sandbox_id: str, body: PathBody, engine: EngineDep, caller: CallerDep) -> None:
    """Create the directory and any missing parents."""
    await _guest(engine, caller, sandbox_id).mkdir(body.path)


@router.post("/rename", status_code=status.HTTP_204_NO_CONTENT)
async def rename(sandbox_id: str, body: RenameBody, engine: EngineDep, caller: CallerDep) -> None:
    await _guest(engine, caller, sandbox_id).rename(body.src, body.dst)
