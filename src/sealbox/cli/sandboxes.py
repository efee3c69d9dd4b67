"""`sealbox create|ls|kill|logs|egress` against a server (SEALBOX_URL, SEALBOX_API_KEY)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sealbox.cli.common import (
    AllowNetOpt,
    CpusOpt,
    DiskOpt,
    EnvOpt,
    MemoryOpt,
    PidsOpt,
    RuntimeOpt,
    SecretOpt,
    TimeoutOpt,
    VolumeOpt,
    parse_volumes,
    run_async,
    sandbox_spec_fields,
    server_backend,
    server_url,
)
from sealbox.engine.pools import POOL_LABEL
from sealbox.sdk.async_sandbox import AsyncSandbox, make_spec

console = Console(highlight=False)


async def _connect(sandbox_id: str) -> AsyncSandbox:
    url, key = server_url()
    return await AsyncSandbox.connect(sandbox_id, url=url, api_key=key)


def create(
    runtime: RuntimeOpt = "auto", allow_net: AllowNetOpt = None, secret: SecretOpt = None,
    env: EnvOpt = None, timeout: TimeoutOpt = "30m", cpus: CpusOpt = None,
    memory: MemoryOpt = None, pids: PidsOpt = None, disk: DiskOpt = None,
    volume: VolumeOpt = None,
    template: Annotated[str | None, typer.Option(help="template to start from")] = None,
) -> None:
    """Create a sandbox on the server; prints its id as the last word."""

    async def main() -> None:
        spec = make_spec(**sandbox_spec_fields(runtime, allow_net, secret, env, timeout, cpus,
                                               memory, pids, disk), volumes=parse_volumes(volume),
                         template=template)
        async with server_backend() as backend:
            info = await backend.create(spec)
        console.print(f"created sandbox ({info.runtime}) {info.id}")

    run_async(main)


def ls(all_: Annotated[bool, typer.Option("--all", help="include ended sandboxes")] = False) -> None:
    """List sandboxes."""

    async def main() -> None:
        url, key = server_url()
        infos = await AsyncSandbox.list(url=url, api_key=key, include_ended=all_)
        table = Table("ID", "STATE", "RUNTIME", "CREATED", "EXPIRES", "NOTE", box=None)
        for i in infos:
            table.add_row(i.id, i.state.value, i.runtime, i.created_at.strftime("%H:%M:%S"),
                          "(paused)" if i.state.value == "paused" else
                          i.expires_at.strftime("%H:%M:%S") if i.expires_at else "-",
                          i.end_reason or (i.resume_note if i.state.value == "paused" else None)
                          or (f"idle warm-pool member ({i.metadata[POOL_LABEL]})"
                              if POOL_LABEL in i.metadata else ""))
        console.print(table)

    run_async(main)


def kill(sandbox_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Kill a sandbox; nothing of it survives."""

    async def main() -> None:
        sb = await _connect(sandbox_id)
        await sb.close()
        console.print(f"killed {sandbox_id}")

    run_async(main)


def logs(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    egress: Annotated[bool, typer.Option("--egress", help="the gateway's decisions")] = False,
) -> None:
    """Print a sandbox's lifecycle log, or with --egress every network decision, as JSON lines."""

    async def main() -> None:
        sb = await _connect(sandbox_id)
        events = await (sb.egress_log() if egress else sb.logs())
        for event in events:
            print(json.dumps(event))

    run_async(main)


def egress(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    allow_net: Annotated[list[str] | None, typer.Option(
        "--allow-net", help="the new allowlist (repeatable); none = no egress")] = None,
) -> None:
    """Replace a running sandbox's network allowlist."""

    async def main() -> None:
        sb = await _connect(sandbox_id)
        info = await sb.set_egress(allow_net or [])
        console.print(f"{sandbox_id} may reach: {', '.join(info.allow_net) or 'nothing'}")

    run_async(main)
