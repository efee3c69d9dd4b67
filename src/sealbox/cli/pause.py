"""`sealbox pause ID` and `sealbox resume ID` against a server (SEALBOX_URL, SEALBOX_API_KEY)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from sealbox.cli.common import run_async, server_backend

console = Console(highlight=False)
IdArg = Annotated[str, typer.Argument(metavar="ID")]


def pause(sandbox_id: IdArg) -> None:
    """Pause a sandbox: no CPU, its timeout clock stops, it survives a server restart
    (microvm: saved to disk with its processes, its memory freed)."""

    async def main() -> None:
        async with server_backend() as backend:
            info = await backend.pause(sandbox_id)
        console.print(f"paused {info.id}")

    run_async(main)


def resume(sandbox_id: IdArg) -> None:
    """Resume a paused sandbox; says whether its processes came back or only its files."""

    async def main() -> None:
        async with server_backend() as backend:
            info = await backend.resume(sandbox_id)
        if info.resumed_processes is False:
            console.print(f"resumed {info.id}: processes NOT restored ({info.resume_note})",
                          markup=False, soft_wrap=True)
        else:
            console.print(f"resumed {info.id}: processes and memory as they were")

    run_async(main)
