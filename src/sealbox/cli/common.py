"""Option parsing shared by commands, and the one place CLI errors become exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from sealbox.egress.gateway import ResolvePin
from sealbox.engine.spec import VolumeMount
from sealbox.errors import ConfigError, SealboxError
from sealbox.sdk.remote import RemoteBackend
from sealbox.sdk.secret import Secret

T = TypeVar("T")
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"sealbox: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run FN; a SealboxError becomes one line on stderr (exit 2 for bad input, else 1)."""
    try:
        return asyncio.run(fn())
    except ConfigError as exc:
        fail(f"error: {exc.message}", 2)
    except SealboxError as exc:
        fail(f"error: {exc.message}", 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def parse_secret(text: str, environ: dict[str, str] | None = None) -> tuple[str, Secret]:
    """NAME@HOST[,HOST] (value from $NAME) or NAME=VALUE@HOST[,HOST]."""
    environ = dict(os.environ) if environ is None else environ
    head, sep, hosts = text.rpartition("@")
    if not sep or not head or not hosts:
        raise ConfigError(f"--secret {text!r}: use NAME@HOST[,HOST] or NAME=VALUE@HOST[,HOST]")
    name, eq, value = head.partition("=")
    if not eq:
        if name not in environ:
            raise ConfigError(f"--secret {name}: environment variable {name} is not set; "
                              f"export it or pass --secret {name}=VALUE@{hosts}")
        value = environ[name]
    if not value:
        raise ConfigError(f"--secret {name}: the value is empty")
    host_list = [h.strip() for h in hosts.split(",") if h.strip()]
    try:
        return name, Secret(value, hosts=host_list)
    except ValueError as exc:
        raise ConfigError(f"--secret {name}: {exc}") from None


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    return env


def parse_pins(items: list[str]) -> list[ResolvePin]:
    return [ResolvePin.parse(item) for item in items]


def parse_cas(items: list[Path]) -> list[Path]:
    for path in items:
        if not path.is_file():
            raise ConfigError(f"--upstream-ca {path}: no such file")
    return list(items)


def write_out(stream: str, data: bytes) -> None:
    out = sys.stderr.buffer if stream == "stderr" else sys.stdout.buffer
    out.write(data)
    out.flush()


# Options shared by `run` and `create`, declared once.
RuntimeOpt = Annotated[str, typer.Option(help="auto|namespace|gvisor|microvm")]
AllowNetOpt = Annotated[list[str] | None, typer.Option(
    "--allow-net", help="host the sandbox may reach (repeatable; *.x.com, HOST:PORT, CIDR)")]
SecretOpt = Annotated[list[str] | None, typer.Option(
    help="NAME@HOST[,HOST] (value from $NAME) or NAME=VALUE@HOST[,HOST]")]
EnvOpt = Annotated[list[str] | None, typer.Option(help="K=V (repeatable)")]
TimeoutOpt = Annotated[str, typer.Option(help="wall-clock limit, e.g. 30s, 10m, 2h")]
CpusOpt = Annotated[float | None, typer.Option(help="CPU quota, e.g. 2 or 0.5")]
MemoryOpt = Annotated[str | None, typer.Option(help="memory limit, e.g. 512MiB")]
PidsOpt = Annotated[int | None, typer.Option(help="max processes")]
ResolveOpt = Annotated[list[str] | None, typer.Option(
    help="HOST:PORT:ADDR[:ADDRPORT]: connections to HOST:PORT go to ADDR (operator-side pin)")]
UpstreamCaOpt = Annotated[list[Path] | None, typer.Option(
    "--upstream-ca", help="extra CA file the gateway trusts for upstream TLS")]
DiskOpt = Annotated[str | None, typer.Option(help="size of /workspace and /tmp, e.g. 1GiB")]
VolumeOpt = Annotated[list[str] | None, typer.Option(
    "--volume", help="NAME:/path[:ro] mounts a volume (repeatable; `sealbox volume create`)")]


def parse_volumes(items: list[str] | None) -> list[VolumeMount]:
    return [VolumeMount.parse(item) for item in items or []]


def sandbox_spec_fields(runtime: str, allow_net: list[str] | None, secret: list[str] | None,
                        env: list[str] | None, timeout: str, cpus: float | None,
                        memory: str | None, pids: int | None, disk: str | None) -> dict[str, Any]:
    return dict(
        runtime=runtime, allow_net=allow_net or [],
        secrets=dict(parse_secret(s) for s in secret or []), env=parse_env(env or []),
        timeout=timeout, cpus=cpus, memory=memory, pids=pids, disk=disk,
    )


def server_url() -> tuple[str, str | None]:
    url = os.environ.get("SEALBOX_URL")
    if not url:
        raise ConfigError("this command talks to a server: set SEALBOX_URL (and SEALBOX_API_KEY)")
    return url, os.environ.get("SEALBOX_API_KEY")


@contextlib.asynccontextmanager
async def server_backend() -> AsyncIterator[RemoteBackend]:
    """The server SEALBOX_URL names, as a backend closed when the block ends."""
    url, key = server_url()
    backend = RemoteBackend(url, key)
    try:
        yield backend
    finally:
        await backend.close()
