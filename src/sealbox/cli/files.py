"""`sealbox cp SRC DST`: one side is `ID:/path` in a sandbox, the other a local file."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import typer

from sealbox.cli.common import run_async
from sealbox.cli.sandboxes import _connect
from sealbox.errors import ConfigError

CHUNK = 1 << 20


def split_remote(spec: str) -> tuple[str, str] | None:
    """("ID", "/path") for "ID:/path"; None for a local path."""
    head, sep, tail = spec.partition(":")
    if sep and head and "/" not in head and head.isalnum():
        return head, tail or "/workspace/"
    return None


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def cp(src: Annotated[str, typer.Argument(help="local file or ID:/path")],
       dst: Annotated[str, typer.Argument(help="local path or ID:/path (ending / = into dir)")],
       ) -> None:
    """Copy a file into or out of a sandbox (streamed: large files are fine)."""

    async def main() -> None:
        rsrc, rdst = split_remote(src), split_remote(dst)
        if (rsrc is None) == (rdst is None):
            raise ConfigError("cp: exactly one of SRC and DST must be ID:/path")
        if rdst is not None:
            local = Path(src)
            if not local.is_file():
                raise ConfigError(f"cp: {src} is not a file")
            sandbox_id, path = rdst
            if path.endswith("/"):
                path = posixpath.join(path, local.name)
            sb = await _connect(sandbox_id)
            await sb.files.write(path, _chunks(local), mode=local.stat().st_mode & 0o777)
            return
        sandbox_id, path = rsrc  # type: ignore[misc]  # checked above: exactly one is remote
        target = Path(dst)
        if target.is_dir():
            target = target / posixpath.basename(path.rstrip("/"))
        sb = await _connect(sandbox_id)
        tmp = target.with_name(f".{target.name}.sealbox-partial")
        try:
            with open(tmp, "wb") as f:
                async for chunk in sb.files.read_stream(path):
                    f.write(chunk)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)

    run_async(main)
