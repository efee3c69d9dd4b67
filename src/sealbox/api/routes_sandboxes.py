"""Sandbox lifecycle: create, list, get, kill, pause, resume; egress policy and logs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, status

from sealbox.api.deps import CallerDep, EngineDep
from sealbox.api.models import COMMON_ERRORS, SANDBOX_ERRORS, EgressPolicy, _error
from sealbox.engine.spec import SandboxInfo, SandboxSpec

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"],
                   responses={**COMMON_ERRORS, **SANDBOX_ERRORS})


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SandboxInfo,
             responses={503: _error("this installation's sandbox cap (--max-sandboxes) is "
                                    "reached")})
async def create_sandbox(spec: SandboxSpec, engine: EngineDep, caller: CallerDep) -> SandboxInfo:
    """Start a sandbox. Each secret comes back with its placeholder, never its value.

    `workspace` (a host directory) is refused: the server does not hand out its own files.
    """
    return await engine.create(spec, owner=caller.tenant)


@router.get("", response_model=list[SandboxInfo])
async def list_sandboxes(
    engine: EngineDep, caller: CallerDep,
    include_ended: Annotated[bool, Query(alias="all", description="include ended sandboxes")] = False,
) -> list[SandboxInfo]:
    """Running and paused sandboxes; `all=true` includes ended ones."""
    return engine.list(owner=caller.owner, include_ended=include_ended)


@router.get("/{sandbox_id}", response_model=SandboxInfo)
async def get_sandbox(sandbox_id: str, engine: EngineDep, caller: CallerDep) -> SandboxInfo:
    return engine.get(sandbox_id, owner=caller.owner)


@router.delete("/{sandbox_id}", response_model=SandboxInfo)
async def kill_sandbox(sandbox_id: str, engine: EngineDep, caller: CallerDep) -> SandboxInfo:
    """Kill the sandbox and remove everything it had. Killing an ended sandbox is a no-op."""
    return await engine.kill(sandbox_id, owner=caller.owner)


@router.post("/{sandbox_id}/pause", response_model=SandboxInfo)
async def pause_sandbox(sandbox_id: str, engine: EngineDep, caller: CallerDep) -> SandboxInfo:
    """Pause the sandbox: no CPU, and its timeout clock stops (`paused_at`). Commands are
    refused (409) until it is resumed. It survives a server restart (see `resume`); on
    microvm it is saved to disk whole and its memory freed."""
    return await engine.pause(sandbox_id, owner=caller.owner)


@router.post("/{sandbox_id}/resume", response_model=SandboxInfo)
async def resume_sandbox(sandbox_id: str, engine: EngineDep, caller: CallerDep) -> SandboxInfo:
    """Thaw a paused sandbox; `expires_at` moves by the time it was paused. If the server
    restarted meanwhile, a fresh sandbox with the same id, policy, limits, volumes and the
    /workspace files saved at pause is booted, and `resumed_processes` is false."""
    return await engine.resume(sandbox_id, owner=caller.owner)


@router.get("/{sandbox_id}/egress", response_model=list[dict[str, Any]])
async def egress_log(sandbox_id: str, engine: EngineDep, caller: CallerDep) -> list[dict[str, Any]]:
    """The gateway's audit events for this sandbox: allowed, blocked and substituted requests."""
    return engine.egress_log(sandbox_id, owner=caller.owner)


@router.put("/{sandbox_id}/egress", response_model=SandboxInfo)
async def set_egress(sandbox_id: str, policy: EgressPolicy, engine: EngineDep,
                     caller: CallerDep) -> SandboxInfo:
    """Replace the sandbox's host allowlist; it applies to new connections at once."""
    return await engine.set_egress(sandbox_id, policy.allow_net, owner=caller.owner)


@router.get("/{sandbox_id}/logs", response_model=list[dict[str, Any]])
async def sandbox_logs(sandbox_id: str, engine: EngineDep, caller: CallerDep) -> list[dict[str, Any]]:
    """Lifecycle events (created, exec, ended), kept after the sandbox ends."""
    return engine.logs(sandbox_id, owner=caller.owner)
