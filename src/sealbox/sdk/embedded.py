"""The backend that runs an engine inside the caller's process (no server needed)."""

from __future__ import annotations

import builtins

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from sealbox.engine.config import EngineConfig
from sealbox.engine.engine import Engine
from sealbox.engine.spec import ExecRequest, ExecResult, SandboxInfo, SandboxSpec
from sealbox.engine.templates import TemplateInfo, TemplateSpec
from sealbox.engine.volumes import VolumeInfo, make_volume_request
from sealbox.errors import ConfigError
from sealbox.guest.client import ExecHandle, ExitStatus, FileInfo, Output

_NEEDS_SERVER = ("preview URLs and SSH are served by `sealbox server`: "
                 "set SEALBOX_URL (or pass url=)")
# One engine per event loop: its subprocesses and timers belong to that loop.
_ENGINES: dict[asyncio.AbstractEventLoop, Engine] = {}


async def shared_engine(config: EngineConfig | None = None) -> Engine:
    loop = asyncio.get_running_loop()
    engine = _ENGINES.get(loop)
    if engine is None:
        engine = _ENGINES[loop] = Engine(config)
        await engine.start()
    return engine


async def close_shared_engine() -> None:
    engine = _ENGINES.pop(asyncio.get_running_loop(), None)
    if engine is not None:
        await engine.close()


class EmbeddedPty:
    def __init__(self, handle: ExecHandle) -> None:
        self._handle = handle
        self._exit: ExitStatus | None = None

    async def write(self, data: bytes) -> None:
        await self._handle.write_stdin(data)

    async def resize(self, rows: int, cols: int) -> None:
        await self._handle.resize(rows, cols)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for item in self._handle:
            if isinstance(item, Output):
                yield item.data
            else:
                self._exit = item

    async def wait(self) -> int:
        if self._exit is None:
            self._exit = await self._handle.wait()
        return self._exit.exit_code

    async def close(self) -> None:
        if self._exit is None:
            await self._handle.signal(9)


class EmbeddedBackend:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self._config = config

    async def _engine(self) -> Engine:
        return await shared_engine(self._config)

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        return await (await self._engine()).create(spec)

    async def get(self, sandbox_id: str) -> SandboxInfo:
        return (await self._engine()).get(sandbox_id)

    async def list(self, include_ended: bool = False) -> builtins.list[SandboxInfo]:
        return (await self._engine()).list(include_ended=include_ended)

    async def kill(self, sandbox_id: str) -> SandboxInfo:
        return await (await self._engine()).kill(sandbox_id)

    async def pause(self, sandbox_id: str) -> SandboxInfo:
        return await (await self._engine()).pause(sandbox_id)

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        return await (await self._engine()).resume(sandbox_id)

    async def exec_stream(self, sandbox_id: str, req: ExecRequest
                          ) -> AsyncIterator[Output | ExecResult]:
        async for item in (await self._engine()).exec_stream(sandbox_id, req):
            yield item

    async def run(self, sandbox_id: str, req: ExecRequest) -> ExecResult:
        return await (await self._engine()).run(sandbox_id, req)

    async def read_file(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        async for chunk in (await self._engine()).guest(sandbox_id).read_file(path):
            yield chunk

    async def write_file(self, sandbox_id: str, path: str,
                         data: bytes | AsyncIterable[bytes], mode: int = 0o644) -> None:
        await (await self._engine()).guest(sandbox_id).write_file(path, data, mode=mode)

    async def list_dir(self, sandbox_id: str, path: str) -> builtins.list[FileInfo]:
        return await (await self._engine()).guest(sandbox_id).list_dir(path)

    async def stat(self, sandbox_id: str, path: str) -> FileInfo:
        return await (await self._engine()).guest(sandbox_id).stat(path)

    async def mkdir(self, sandbox_id: str, path: str) -> None:
        await (await self._engine()).guest(sandbox_id).mkdir(path)

    async def remove(self, sandbox_id: str, path: str, recursive: bool = False) -> None:
        await (await self._engine()).guest(sandbox_id).remove(path, recursive=recursive)

    async def rename(self, sandbox_id: str, src: str, dst: str) -> None:
        await (await self._engine()).guest(sandbox_id).rename(src, dst)

    async def pty(self, sandbox_id: str, rows: int, cols: int,
                  cmd: builtins.list[str] | None = None) -> EmbeddedPty:
        req = ExecRequest(cmd=cmd or ["/bin/bash", "-l"], env={"TERM": "xterm-256color"})
        handle = await (await self._engine()).exec(sandbox_id, req, pty=(rows, cols))
        return EmbeddedPty(handle)

    async def set_egress(self, sandbox_id: str, allow_net: builtins.list[str]) -> SandboxInfo:
        return await (await self._engine()).set_egress(sandbox_id, allow_net)

    async def egress_log(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        return (await self._engine()).egress_log(sandbox_id)

    async def logs(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        return (await self._engine()).logs(sandbox_id)

    async def expose(self, sandbox_id: str, port: int, public: bool = False
                     ) -> dict[str, Any]:
        raise ConfigError(_NEEDS_SERVER)

    async def ssh_command(self, sandbox_id: str) -> str:
        raise ConfigError(_NEEDS_SERVER)

    async def create_volume(self, name: str, size: int | str) -> VolumeInfo:
        req = make_volume_request(name, size)
        return await asyncio.to_thread((await self._engine()).volumes.create, req)

    async def list_volumes(self) -> builtins.list[VolumeInfo]:
        return await asyncio.to_thread((await self._engine()).volumes.list)

    async def get_volume(self, name: str) -> VolumeInfo:
        return await asyncio.to_thread((await self._engine()).volumes.get, name)

    async def delete_volume(self, name: str) -> VolumeInfo:
        return await asyncio.to_thread((await self._engine()).volumes.delete, name)

    async def build_template(self, spec: TemplateSpec,
                             progress: Callable[[dict[str, Any]], None] | None = None
                             ) -> TemplateInfo:
        return await (await self._engine()).build_template(spec, progress=progress)

    async def list_templates(self) -> builtins.list[TemplateInfo]:
        return (await self._engine()).list_templates()

    async def get_template(self, name: str) -> TemplateInfo:
        return (await self._engine()).get_template(name)

    async def delete_template(self, name: str) -> TemplateInfo:
        return await asyncio.to_thread((await self._engine()).remove_template, name)

    async def template_logs(self, name: str) -> str:
        return (await self._engine()).template_log(name)

    async def snapshot(self, sandbox_id: str, name: str) -> TemplateInfo:
        return await (await self._engine()).snapshot(sandbox_id, name)

    async def fork(self, sandbox_id: str) -> SandboxInfo:
        return await (await self._engine()).fork(sandbox_id)

    async def close(self) -> None:
        """The shared engine outlives one sandbox; it is closed with the loop (see sync.py)."""
