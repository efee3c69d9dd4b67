"""FastAPI dependencies shared by the route modules: the engine and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from sealbox.api.auth import Caller, KeyRing
from sealbox.errors import ForbiddenError
from sealbox.engine.engine import Engine

# auto_error=False: a missing key must produce our JSON 401, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer sbk_...`")


def get_engine(conn: HTTPConnection) -> Engine:
    engine: Engine = conn.app.state.engine
    return engine


def get_keys(conn: HTTPConnection) -> KeyRing:
    keys: KeyRing = conn.app.state.keys
    return keys


def get_caller(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    return get_keys(request).authenticate(creds.credentials if creds else None)


def get_admin(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    if not caller.admin:
        raise ForbiddenError("this needs the admin API key")
    return caller


EngineDep = Annotated[Engine, Depends(get_engine)]
CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[Caller, Depends(get_admin)]
