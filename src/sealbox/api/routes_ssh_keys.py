"""SSH access: tenants' public keys, short-lived SSH passwords, and where the gateway listens."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field

from sealbox.api.deps import CallerDep, EngineDep
from sealbox.api.models import COMMON_ERRORS, SANDBOX_ERRORS
from sealbox.api.ssh import KEYS_DB, MAX_TOKEN_TTL, TOKEN_TTL, SshGateway, SshKeyStore, SshTokens
from sealbox.engine.engine import Engine
from sealbox.errors import NotFoundError

router = APIRouter(prefix="/v1", tags=["ssh"], responses=COMMON_ERRORS)


class SshKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(min_length=1, max_length=16384,
                            description="one OpenSSH public key line (`ssh-ed25519 AAAA... comment`)")


class SshKeyOut(BaseModel):
    fingerprint: str = Field(description="`SHA256:...`, as `ssh-keygen -lf` prints it")
    algorithm: str
    comment: str
    public_key: str
    created_at: float


class SshTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: float = Field(TOKEN_TTL, gt=0, le=MAX_TOKEN_TTL, description="seconds it stays valid")


class SshToken(BaseModel):
    token: str = Field(description="the SSH password for this sandbox (shown once)")
    username: str
    expires_at: float
    port: int | None = Field(description="the SSH gateway's port (null: not running)")


class SshInfo(BaseModel):
    enabled: bool
    port: int | None
    host_key: str | None = Field(description="the gateway's public host key, OpenSSH format")


def _store(request: Request) -> SshKeyStore:
    store: SshKeyStore = request.app.state.ssh_keys
    return store


def _gateway(request: Request) -> SshGateway | None:
    gateway: SshGateway | None = request.app.state.ssh_gateway
    return gateway


def _out(key: Any) -> SshKeyOut:
    return SshKeyOut(fingerprint=key.fingerprint, algorithm=key.algorithm, comment=key.comment,
                     public_key=key.public_key, created_at=key.created_at)


@router.post("/ssh-keys", status_code=status.HTTP_201_CREATED, response_model=SshKeyOut)
async def add_ssh_key(body: SshKeyRequest, request: Request, caller: CallerDep) -> SshKeyOut:
    """Register a public key: it opens SSH sessions to this tenant's sandboxes
    (an admin's key opens every sandbox)."""
    return _out(_store(request).add(caller.tenant, caller.admin, body.public_key))


@router.get("/ssh-keys", response_model=list[SshKeyOut])
async def list_ssh_keys(request: Request, caller: CallerDep) -> list[SshKeyOut]:
    return [_out(k) for k in _store(request).list(caller.tenant)]


@router.delete("/ssh-keys/{fingerprint:path}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_ssh_key(fingerprint: Annotated[str, Path(description="`SHA256:...`")],
                         request: Request, caller: CallerDep) -> None:
    if not _store(request).remove(caller.tenant, fingerprint):
        raise NotFoundError(f"no SSH key {fingerprint!r}: list them with `sealbox ssh-key ls`")


@router.post("/sandboxes/{sandbox_id}/ssh-token", status_code=status.HTTP_201_CREATED,
             response_model=SshToken, responses=SANDBOX_ERRORS)
async def ssh_token(sandbox_id: str, request: Request, engine: EngineDep, caller: CallerDep,
                    body: SshTokenRequest | None = None) -> SshToken:
    """A password for `ssh SANDBOX_ID@HOST -p PORT`, valid for this sandbox until it expires."""
    engine.guest(sandbox_id, owner=caller.owner)
    tokens: SshTokens = request.app.state.ssh_tokens
    token, expires = tokens.issue(sandbox_id, body.ttl if body else TOKEN_TTL)
    gateway = _gateway(request)
    return SshToken(token=token, username=sandbox_id, expires_at=expires,
                    port=gateway.port if gateway else None)


@router.get("/ssh", response_model=SshInfo)
async def ssh_info(request: Request, _: CallerDep) -> SshInfo:
    """Whether the SSH gateway runs, and on which port."""
    gateway = _gateway(request)
    if gateway is None or gateway.port is None:
        return SshInfo(enabled=False, port=None, host_key=None)
    return SshInfo(enabled=True, port=gateway.port, host_key=gateway.host_key_line)


def install(app: FastAPI, engine: Engine) -> None:
    """Key store and token book on the app; `serve()` adds the gateway when --ssh-port is set."""
    app.state.ssh_keys = SshKeyStore(engine.config.data_dir / KEYS_DB)
    app.state.ssh_tokens = SshTokens()
    app.state.ssh_gateway = None
    app.include_router(router)


async def start_gateway(app: FastAPI, host: str, port: int) -> SshGateway:
    """Start the SSH gateway with the app's keys and tokens (called by `serve()`)."""
    gateway = SshGateway(app.state.engine, app.state.ssh_keys, app.state.ssh_tokens)
    await gateway.start(host, port)
    app.state.ssh_gateway = gateway
    return gateway
