"""`sealbox server`: the REST control plane for this installation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sealbox.cli.common import ResolveOpt, UpstreamCaOpt, fail, parse_cas, parse_pins
from sealbox.engine.units import parse_duration, parse_size
from sealbox.errors import ConfigError


def server(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 7411,
    data_dir: Annotated[Path | None, typer.Option(help="state, keys, CA, logs")] = None,
    max_timeout: Annotated[str | None, typer.Option(
        help="longest sandbox lifetime callers may ask for (e.g. 2h); default: no cap")] = None,
    resolve: ResolveOpt = None, upstream_ca: UpstreamCaOpt = None,
    ssh_port: Annotated[int | None, typer.Option(help="start the SSH gateway on PORT")] = None,
    preview_domain: Annotated[str, typer.Option(
        help="preview URLs are http://PORT-ID.DOMAIN:PORT/")] = "localhost",
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    max_sandboxes: Annotated[int | None, typer.Option(
        min=1, help="most sandboxes alive at once, warm-pool members included")] = None,
    volume_quota: Annotated[str | None, typer.Option(
        help="most volume bytes one tenant may have (e.g. 20GiB); default: no cap")] = None,
) -> None:
    """Serve the REST API (and optionally the SSH gateway) until interrupted."""
    from sealbox.api.server import run_server

    try:
        parse_pins(resolve or [])
        parse_cas(upstream_ca or [])
        cap = parse_duration(max_timeout) if max_timeout else None
        quota = parse_size(volume_quota) if volume_quota else None
    except ConfigError as exc:
        fail(f"error: {exc.message}", 2)
    run_server(host=host, port=port, data_dir=data_dir, max_timeout=cap,
               resolve=list(resolve or []), upstream_ca=list(upstream_ca or []),
               ssh_port=ssh_port, preview_domain=preview_domain, log_level=log_level,
               max_sandboxes=max_sandboxes, volume_quota=quota)
