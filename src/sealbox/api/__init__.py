"""The REST control plane: `create_app` for any ASGI server, `serve`/`run_server` for uvicorn."""

from sealbox.api.app import create_app
from sealbox.api.auth import Caller, KeyRing
from sealbox.api.server import ServerConfig, run_server, serve

__all__ = ["Caller", "KeyRing", "ServerConfig", "create_app", "run_server", "serve"]
