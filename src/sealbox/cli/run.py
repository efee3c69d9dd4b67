"""`sealbox run`: a one-shot sandbox on the embedded engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sealbox.cli.common import (
    AllowNetOpt,
    CpusOpt,
    DiskOpt,
    EnvOpt,
    MemoryOpt,
    PidsOpt,
    ResolveOpt,
    RuntimeOpt,
    SecretOpt,
    TimeoutOpt,
    UpstreamCaOpt,
    VolumeOpt,
    err_console,
    parse_cas,
    parse_pins,
    parse_volumes,
    run_async,
    sandbox_spec_fields,
    write_out,
)
from sealbox.engine.config import EngineConfig
from sealbox.engine.spec import ExecResult
from sealbox.errors import SandboxGone
from sealbox.guest.client import Output
from sealbox.sdk.async_sandbox import AsyncSandbox, make_spec
from sealbox.sdk.embedded import EmbeddedBackend, close_shared_engine


def run(
    cmd: Annotated[list[str], typer.Argument(help="command and arguments (after --)")],
    runtime: RuntimeOpt = "auto", allow_net: AllowNetOpt = None, secret: SecretOpt = None,
    env: EnvOpt = None, timeout: TimeoutOpt = "30m", cpus: CpusOpt = None,
    memory: MemoryOpt = None, pids: PidsOpt = None, disk: DiskOpt = None,
    resolve: ResolveOpt = None, upstream_ca: UpstreamCaOpt = None,
    workspace: Annotated[Path | None, typer.Option(help="host dir mounted at /workspace")] = None,
    volume: VolumeOpt = None,
    template: Annotated[str | None, typer.Option(help="template to start from")] = None,
) -> None:
    """Run CMD in a fresh sandbox; stream its output; exit with its code; leave nothing behind."""

    async def main() -> int:
        spec = make_spec(
            **sandbox_spec_fields(runtime, allow_net, secret, env, timeout, cpus, memory, pids,
                                  disk),
            workspace=str(workspace) if workspace else None, volumes=parse_volumes(volume),
            template=template,
        )
        backend = EmbeddedBackend(EngineConfig(
            resolve=parse_pins(resolve or []), upstream_ca=parse_cas(upstream_ca or []),
        ))
        try:
            sb = AsyncSandbox(await backend.create(spec), backend)
            async with sb:
                result: ExecResult | None = None
                try:
                    async for item in sb.exec_stream(cmd):
                        if isinstance(item, Output):
                            write_out(item.stream, item.data)
                        else:
                            result = item
                except SandboxGone as exc:
                    reason = str(exc.details.get("reason") or exc.message)
                    err_console.print(f"sealbox: killed: {reason}", markup=False, soft_wrap=True)
                    return 124 if "timeout" in reason else 137
                if result is None:
                    raise SandboxGone("the sandbox ended before the command finished")
                if result.limit:
                    err_console.print(f"sealbox: killed: {result.limit}", markup=False)
                return result.exit_code or 0  # never None: not a background command
        finally:
            await close_shared_engine()

    raise typer.Exit(run_async(main))
