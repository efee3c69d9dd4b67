"""Installation-level routes: health (no auth) and tenant API keys (admin only)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, status
from starlette.requests import Request

from sealbox.api.deps import AdminDep, get_keys
from sealbox.api.models import COMMON_ERRORS, ErrorBody, Health, KeyCreated, KeyRequest

router = APIRouter(prefix="/v1", tags=["system"])


def package_version() -> str:
    try:
        return version("sealbox")
    except PackageNotFoundError:
        return "unknown"


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Whether the server is up. Needs no API key."""
    return Health(version=package_version())


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated,
             responses={**COMMON_ERRORS, 403: {"model": ErrorBody, "description": "not the admin key"}})
async def create_key(body: KeyRequest, request: Request, _: AdminDep) -> KeyCreated:
    """Create an API key for a tenant. The key is in this response only: store it now."""
    return KeyCreated(tenant=body.tenant, key=get_keys(request).create(body.tenant))
