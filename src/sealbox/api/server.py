"""`sealbox server`: the control plane under uvicorn, with one engine for the installation."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from sealbox.api import preview
from sealbox.api.app import create_app
from sealbox.api.routes_ssh_keys import start_gateway
from sealbox.api.auth import KeyRing, load_admin_key
from sealbox.egress.gateway import ResolvePin
from sealbox.engine.config import EngineConfig, default_data_dir
from sealbox.engine.engine import Engine

DEFAULT_PORT = 7411
GRACEFUL_SHUTDOWN_SECONDS = 5
"""How long open requests get to finish at shutdown (their sandboxes are already gone)."""
log = logging.getLogger("sealbox.api")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    max_timeout: float | None = None
    resolve: list[str] = field(default_factory=list)
    """`HOST:PORT:ADDR[:ADDRPORT]` pins for every sandbox of the installation."""
    upstream_ca: list[Path] = field(default_factory=list)
    log_level: str = "info"
    ssh_port: int | None = None
    """Start the SSH gateway on this port (on `host`); 0 picks a free one."""
    preview_domain: str = "localhost"
    """Preview URLs are `http://PORT-ID.DOMAIN:PORT/`."""
    max_sandboxes: int | None = None
    """Most sandboxes alive at once, warm-pool members included; None = no cap."""
    volume_quota: int | None = None
    """Most bytes of volumes one tenant may have; None = no cap."""


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self._engine = engine

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Kill the sandboxes before draining connections: that ends open exec streams and
        # terminals at once instead of cutting them off after the grace period, and it
        # happens even on a forced exit, when uvicorn skips the lifespan shutdown.
        await self._engine.pools.stop()  # no refill may boot while we kill
        await self._engine.cancel_builds()  # their streams end with an error event
        results = await asyncio.gather(
            *(self._engine.kill(info.id, reason="server shut down") for info in self._engine.list()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                log.error("killing a sandbox at shutdown failed", exc_info=result)
        await super().shutdown(sockets)


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM; then kill every sandbox (in the app's lifespan) and return."""
    engine = Engine(EngineConfig(
        data_dir=config.data_dir, max_timeout=config.max_timeout,
        resolve=[ResolvePin.parse(pin) for pin in config.resolve],
        upstream_ca=list(config.upstream_ca),
        allow_host_workspace=False,  # API callers must not mount the server's own files
        max_sandboxes=config.max_sandboxes, volume_quota=config.volume_quota,
        start_pools=True,
    ))
    admin_hash, admin_file = load_admin_key(config.data_dir)
    if admin_file is not None:
        print(f"sealbox: the admin API key is in {admin_file}", flush=True)
    app = create_app(engine, KeyRing(engine.store, admin_hash))
    app.state.previews = preview.PreviewRegistry(config.preview_domain)
    ssh = await start_gateway(app, config.host, config.ssh_port) if config.ssh_port is not None else None
    if ssh is not None:
        print(f"sealbox: SSH gateway on {config.host}:{ssh.port}", flush=True)
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level,
        lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    ), engine)
    try:
        await server.serve()
    finally:
        if ssh is not None:
            await ssh.close()
        await app.state.previews.close()


def run_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, data_dir: Path | None = None,
               max_timeout: float | None = None, resolve: Sequence[str] = (),
               upstream_ca: Sequence[Path] = (), log_level: str = "info",
               ssh_port: int | None = None, preview_domain: str = "localhost",
               max_sandboxes: int | None = None, volume_quota: int | None = None) -> None:
    asyncio.run(serve(ServerConfig(
        host=host, port=port, data_dir=data_dir or default_data_dir(), max_timeout=max_timeout,
        resolve=list(resolve), upstream_ca=list(upstream_ca), log_level=log_level,
        ssh_port=ssh_port, preview_domain=preview_domain, max_sandboxes=max_sandboxes,
        volume_quota=volume_quota,
    )))
