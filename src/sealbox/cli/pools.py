"""`sealbox pool set|ls|rm`: warm pools on a server (needs the admin API key)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from sealbox.cli.common import CpusOpt, DiskOpt, MemoryOpt, PidsOpt, run_async, server_backend
from sealbox.engine.pools import BASE, PoolConfig
from sealbox.engine.units import format_size
from sealbox.errors import ConfigError

console = Console(highlight=False)
pool_app = typer.Typer(no_args_is_help=True,
                       help="Warm pools: sandboxes booted ahead, claimed by `create` in ms.")

TemplateArg = Annotated[str, typer.Argument(
    metavar="[TEMPLATE]", help="template name; omitted or `base` = the host base image")]
PoolRuntimeOpt = Annotated[str, typer.Option(help="auto|namespace|gvisor|microvm")]


def _config(**fields: Any) -> dict[str, Any]:
    # Validated here too, so bad input is one clear line before any request is sent.
    try:
        return PoolConfig(**{k: v for k, v in fields.items() if v is not None}).model_dump(
            mode="json")
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise ConfigError(f"invalid pool: {where}: {err.get('msg')}") from None


@pool_app.command("set")
def set_(
    template: TemplateArg = BASE,
    size: Annotated[int, typer.Option(help="sandboxes to keep ready (0 empties the pool)")] = -1,
    runtime: PoolRuntimeOpt = "auto", cpus: CpusOpt = None, memory: MemoryOpt = None,
    pids: PidsOpt = None, disk: DiskOpt = None,
) -> None:
    """Keep SIZE sandboxes of TEMPLATE on RUNTIME booted; `create` with the same template,
    tier and limits takes one."""

    async def main() -> None:
        if size < 0:
            raise ConfigError("--size N is required and must be 0 or more")
        body = _config(template=template, runtime=runtime, size=size, cpus=cpus, memory=memory,
                       pids=pids, disk=disk)
        async with server_backend() as backend:
            status = await backend.set_pool(body)
        console.print(f"pool {status['key']}: size {status['size']}, ready {status['ready']}")

    run_async(main)


@pool_app.command("ls")
def ls() -> None:
    """List pools: key (TEMPLATE/TIER), size, ready members, limits, last error."""

    async def main() -> None:
        async with server_backend() as backend:
            pools = await backend.pools()
        table = Table("KEY", "SIZE", "READY", "BOOTING", "LIMITS", "ERROR", box=None)
        for p in pools:
            limits = ", ".join(filter(None, [
                f"cpus {p['cpus']:g}" if p.get("cpus") else "",
                f"memory {format_size(p['memory'])}" if p.get("memory") else "",
                f"pids {p['pids']}" if p.get("pids") else "",
                f"disk {format_size(p['disk'])}" if p.get("disk") else ""]))
            table.add_row(p["key"], str(p["size"]), str(p["ready"]), str(p["booting"]),
                          limits or "-", p.get("error") or "")
        console.print(table)

    run_async(main)


@pool_app.command("rm")
def rm(template: TemplateArg = BASE, runtime: PoolRuntimeOpt = "auto") -> None:
    """Stop keeping the pool and kill its idle members."""

    async def main() -> None:
        async with server_backend() as backend:
            await backend.remove_pool(template or BASE, runtime)
        console.print(f"removed pool {template or BASE}/{runtime}")

    run_async(main)
