"""The ASGI app: routers, error handling, the OpenAPI document and the engine's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from sealbox.api import errors, routes_exec, routes_files, routes_sandboxes, routes_system
from sealbox.api import preview, routes_pools, routes_ssh_keys, routes_volumes
from sealbox.api import routes_templates
from sealbox.api.auth import KeyRing
from sealbox.engine.engine import Engine

DESCRIPTION = """Run untrusted code in disposable sandboxes where real credentials never enter.

Authenticate with `Authorization: Bearer KEY`. Errors are `{"error": {"code", "message"}}`;
another tenant's sandbox is indistinguishable from one that does not exist (404)."""


class SealboxApp(FastAPI):
    def openapi(self) -> dict[str, Any]:
        fresh = self.openapi_schema is None
        schema = super().openapi()  # built once, then cached by FastAPI
        if fresh:
            # Validation errors are answered as 400 `invalid` (see errors.py), never 422.
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema


def create_app(engine: Engine, keys: KeyRing) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            # Invariant 5: a server that stops leaves no sandbox behind.
            await engine.close()

    app = SealboxApp(title="sealbox", version=routes_system.package_version(),
                     description=DESCRIPTION, lifespan=lifespan)
    app.state.engine = engine
    app.state.keys = keys
    errors.install(app)
    for module in (routes_system, routes_sandboxes, routes_exec, routes_files, routes_pools):
        app.include_router(module.router)
    app.include_router(routes_volumes.router)
    app.include_router(routes_templates.router)
    preview.install(app)
    routes_ssh_keys.install(app, engine)
    return app
