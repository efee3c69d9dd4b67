"""Request and response bodies the API adds to the engine's own models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class ErrorDetail(BaseModel):
    code: str = Field(description="stable error code, e.g. `not_found`, `invalid`, `unauthorized`")
    message: str
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# Documented on every authenticated route; FastAPI's 422 is replaced by these (see app.py).
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("invalid request (bad JSON, parameters or spec)"),
    401: _error("missing or wrong API key"),
    404: _error("no such sandbox for this tenant, or no such file"),
}
SANDBOX_ERRORS: dict[int | str, dict[str, Any]] = {
    409: _error("the sandbox is paused, failed, or its runtime is unavailable"),
    410: _error("the sandbox has ended"),
}


class Health(BaseModel):
    status: str = "ok"
    version: str


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=TENANT_PATTERN, description="tenant the key acts for")


class KeyCreated(BaseModel):
    tenant: str
    key: str = Field(description="shown once; the server keeps only its SHA-256 hash")


class EgressPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow_net: list[str] = Field(description="host rules, e.g. `api.example.com`, `*.x.com:443`")


class PathBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)


class RenameBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    src: str = Field(min_length=1)
    dst: str = Field(min_length=1)
