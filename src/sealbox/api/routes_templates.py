"""Templates (build, list, get, remove, build log) and a sandbox's snapshot and fork.

A build can take minutes: `POST /v1/templates` answers at once with a stream of NDJSON events
(`start`, `step`, `log`, `built`, then `done` with the template, or `error`), or `cached` then `done`
when the same inputs were built before. The build goes on if the client disconnects.
Templates belong to the caller's tenant; the admin key's templates are shared with every tenant
(a tenant's own template of the same name wins).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from sealbox.api.deps import CallerDep, EngineDep
from sealbox.api.models import COMMON_ERRORS, SANDBOX_ERRORS
from sealbox.engine import template_build
from sealbox.engine.engine import Engine
from sealbox.engine.spec import SandboxInfo
from sealbox.engine.templates import NAME_PATTERN, TemplateInfo, TemplateSpec
from sealbox.errors import SealboxError

router = APIRouter(tags=["templates"], responses={**COMMON_ERRORS, **SANDBOX_ERRORS})
NDJSON = "application/x-ndjson"


class SnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"the new template's name ({NAME_PATTERN})")


async def _build_events(engine: Engine, spec: TemplateSpec, owner: str | None
                        ) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def run() -> None:
        try:
            info = await engine.build_template(spec, owner, progress=queue.put_nowait)
            queue.put_nowait({"type": "done", "template": info.model_dump(mode="json")})
        except SealboxError as exc:
            queue.put_nowait({"type": "error", **exc.to_dict()})
        except asyncio.CancelledError:
            queue.put_nowait({"type": "error", "code": "server_error",
                              "message": "the server shut down during the build"})
            raise
        except Exception:  # the server's insides stay out of the stream
            queue.put_nowait({"type": "error", "code": "internal",
                              "message": "template build failed: internal error"})

    task = asyncio.create_task(run())
    engine._background.add(task)
    task.add_done_callback(engine._background.discard)
    while True:
        event = await queue.get()
        yield (json.dumps(event) + "\n").encode()
        if event["type"] in ("done", "error"):
            return


@router.post("/v1/templates", status_code=status.HTTP_200_OK,
             responses={200: {"content": {NDJSON: {}},
                              "description": "NDJSON build events, ending with done or error"}})
async def build_template(spec: TemplateSpec, engine: EngineDep, caller: CallerDep
                         ) -> StreamingResponse:
    """Build a template (or find it built). Files must come inline (`content_b64`). A spec
    refused outright is a 400; a build that fails ends the stream with an `error` event."""
    template_build.check(engine, spec)
    return StreamingResponse(_build_events(engine, spec, caller.owner), media_type=NDJSON)


@router.get("/v1/templates", response_model=list[TemplateInfo])
async def list_templates(engine: EngineDep, caller: CallerDep) -> list[TemplateInfo]:
    return engine.list_templates(caller.owner)


@router.get("/v1/templates/{name}", response_model=TemplateInfo)
async def get_template(name: str, engine: EngineDep, caller: CallerDep) -> TemplateInfo:
    return engine.get_template(name, caller.owner)


@router.delete("/v1/templates/{name}", response_model=TemplateInfo)
async def remove_template(name: str, engine: EngineDep, caller: CallerDep) -> TemplateInfo:
    """Forget the name; its files go once no other name uses them."""
    return engine.remove_template(name, caller.owner)


@router.get("/v1/templates/{name}/logs", response_class=PlainTextResponse)
async def template_logs(name: str, engine: EngineDep, caller: CallerDep) -> str:
    """The last build's output (kept for failed builds too)."""
    return engine.template_log(name, caller.owner)


@router.post("/v1/sandboxes/{sandbox_id}/snapshot", status_code=status.HTTP_201_CREATED,
             response_model=TemplateInfo)
async def snapshot(sandbox_id: str, body: SnapshotRequest, engine: EngineDep,
                   caller: CallerDep) -> TemplateInfo:
    """Save the sandbox's /workspace as a new template (filesystem only, not memory)."""
    engine.get(sandbox_id, caller.owner)  # 404 for another tenant's sandbox
    return await engine.snapshot(sandbox_id, body.name, caller.owner)


@router.post("/v1/sandboxes/{sandbox_id}/fork", status_code=status.HTTP_201_CREATED,
             response_model=SandboxInfo)
async def fork(sandbox_id: str, engine: EngineDep, caller: CallerDep) -> SandboxInfo:
    """A new sandbox with a copy of this one's /workspace, same template, policy, limits and
    secrets (new placeholders)."""
    return await engine.fork(sandbox_id, caller.owner)
