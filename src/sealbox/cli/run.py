"""`sealbox run`: a one-shot sandbox on the embedded engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sealbox.cli.common import (
    err_console, parse_cas, parse_env, parse_pins, parse_secret, run_async, write_out,
)
from sealbox.engine.config import EngineConfig
from sealbox.engine.spec import ExecResult
from sealbox.errors import SandboxGone
from sealbox.guest.client import Output
from sealbox.sdk.async_sandbox import AsyncSandbox, make_exec, make_spec
from sealbox.sdk.embedded import EmbeddedBackend, close_shared_engine


def run(
    cmd: Annotated[list[str], typer.Argument(help="command and arguments (after --)")],
    runtime: Annotated[str, typer.Option(help="auto|namespace|gvisor|microvm")] = "auto",
    allow_net: Annotated[Optional[list[str]], typer.Option(
        "--allow-net", help="host the sandbox may reach (repeatable; *.x.com, HOST:PORT)")] = None,
    secret: Annotated[Optional[list[str]], typer.Option(
        help="NAME@HOST[,HOST] (value from $NAME) or NAME=VALUE@HOST[,HOST]")] = None,
    env: Annotated[Optional[list[str]], typer.Option(help="K=V (repeatable)")] = None,
    timeout: Annotated[str, typer.Option(help="wall-clock limit, e.g. 30s, 10m")] = "30m",
    cpus: Annotated[Optional[float], typer.Option(help="CPU quota, e.g. 2 or 0.5")] = None,
    memory: Annotated[Optional[str], typer.Option(help="memory limit, e.g. 512MiB")] = None,
    pids: Annotated[Optional[int], typer.Option(help="max processes")] = None,
    disk: Annotated[Optional[str], typer.Option(help="size of /workspace and /tmp")] = None,
    resolve: Annotated[Optional[list[str]], typer.Option(
        help="HOST:PORT:ADDR[:ADDRPORT] pin an upstream (operator-side)")] = None,
    upstream_ca: Annotated[Optional[list[Path]], typer.Option(
        "--upstream-ca", help="extra CA file the gateway trusts upstream")] = None,
    workspace: Annotated[Optional[Path], typer.Option(help="host dir mounted at /workspace")] = None,
) -> None:
    """Run CMD in a fresh sandbox; stream its output; exit with its code; leave nothing behind."""

    async def main() -> int:
        secrets = dict(parse_secret(s) for s in secret or [])
        spec = make_spec(
            runtime=runtime,
            allow_net=allow_net or [], secrets=secrets, env=parse_env(env or []),
            timeout=timeout, cpus=cpus, memory=memory, pids=pids, disk=disk,
            workspace=str(workspace) if workspace else None,
        )
        backend = EmbeddedBackend(EngineConfig(
            resolve=parse_pins(resolve or []), upstream_ca=parse_cas(upstream_ca or []),
        ))
        req = make_exec(cmd, None, None, None, None)
        try:
            sb = AsyncSandbox(await backend.create(spec), backend)
            async with sb:
                result: ExecResult | None = None
                try:
                    async for item in sb.exec_stream(req.cmd):
                        if isinstance(item, Output):
                            write_out(item.stream, item.data)
                        else:
                            result = item
                except SandboxGone:
                    info = await sb.refresh()
                    err_console.print(f"sealbox: killed: {info.end_reason}", markup=False)
                    return 124 if info.end_reason and "timeout" in info.end_reason else 137
                if result is None:
                    raise SandboxGone("the sandbox ended before the command finished")
                if result.limit:
                    err_console.print(f"sealbox: killed: {result.limit}", markup=False)
                return result.exit_code
        finally:
            await close_shared_engine()

    raise typer.Exit(run_async(main))
