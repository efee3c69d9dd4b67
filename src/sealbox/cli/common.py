"""Option parsing shared by commands, and the one place CLI errors become exit codes."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from sealbox.egress.gateway import ResolvePin
from sealbox.errors import ConfigError, SealboxError
from sealbox.sdk.secret import Secret

T = TypeVar("T")
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"sealbox: {message}", markup=False)
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
