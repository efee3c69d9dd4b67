"""`sealbox volume create|ls|rm`: against the server when SEALBOX_URL is set, else on this
machine's own data dir (what `sealbox run --volume` uses)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sealbox.cli.common import run_async
from sealbox.engine.units import format_size
from sealbox.engine.volumes import VolumeInfo
from sealbox.sdk.async_sandbox import AsyncVolume
from sealbox.sdk.embedded import close_shared_engine

console = Console(highlight=False)
volume_app = typer.Typer(no_args_is_help=True, help="Named persistent volumes.")
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="a-z 0-9 - _ (max 63)")]


@volume_app.command("create")
def create(
    name: NameArg,
    size: Annotated[str, typer.Option(help="hard size limit, e.g. 512MiB, 10GiB")] = "1GiB",
) -> None:
    """Create an empty volume; mount it with `--volume NAME:/path[:ro]`."""

    async def main() -> None:
        try:
            info = await AsyncVolume.create(name, size)
        finally:
            await close_shared_engine()
        console.print(f"created volume {info.name} ({format_size(info.size)})")

    run_async(main)


@volume_app.command("ls")
def ls() -> None:
    """List volumes and the sandboxes using them."""

    async def main() -> list[VolumeInfo]:
        try:
            return await AsyncVolume.list()
        finally:
            await close_shared_engine()

    table = Table("NAME", "SIZE", "CREATED", "USED BY", "TIERS", box=None)
    for v in run_async(main):
        table.add_row(v.name, format_size(v.size), v.created_at.strftime("%Y-%m-%d %H:%M"),
                      ", ".join(v.used_by) or "-", "microvm only" if v.vm_only else "all")
    console.print(table)


@volume_app.command("rm")
def rm(name: NameArg) -> None:
    """Delete a volume and its data (refused while a sandbox uses it)."""

    async def main() -> None:
        try:
            await AsyncVolume.delete(name)
        finally:
            await close_shared_engine()
        console.print(f"removed volume {name}")

    run_async(main)
