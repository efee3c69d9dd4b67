"""`Sandbox`: the synchronous SDK. Every method runs the `AsyncSandbox` method of the same name
on a background loop (portal.py); tests/test_sdk_parity.py keeps the two surfaces identical."""

from __future__ import annotations

import builtins

from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, overload

from sealbox.engine.spec import ExecResult, RuntimeName, SandboxInfo
from sealbox.guest.client import FileInfo, Output
from sealbox.engine.volumes import VolumeInfo
from sealbox.sdk.async_sandbox import AsyncFiles, AsyncSandbox, AsyncVolume, VolumesArg
from sealbox.sdk.async_sandbox import AsyncTemplate
from sealbox.engine.templates import TemplateInfo, TemplateSpec
from sealbox.sdk.backend import PtySession
from sealbox.sdk.portal import portal
from sealbox.sdk.secret import Secret


class Pty:
    def __init__(self, session: PtySession) -> None:
        self._s = session

    def write(self, data: bytes) -> None:
        portal().call(self._s.write(data))

    def resize(self, rows: int, cols: int) -> None:
        portal().call(self._s.resize(rows, cols))

    def __iter__(self) -> Iterator[bytes]:
        return portal().iterate(aiter(self._s))

    def wait(self) -> int:
        return portal().call(self._s.wait())

    def close(self) -> None:
        portal().call(self._s.close())


class Files:
    def __init__(self, files: AsyncFiles) -> None:
        self._f = files

    def read(self, path: str) -> bytes:
        return portal().call(self._f.read(path))

    def read_text(self, path: str) -> str:
        return portal().call(self._f.read_text(path))

    def read_stream(self, path: str) -> Iterator[bytes]:
        return portal().iterate(self._f.read_stream(path))

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        portal().call(self._f.write(path, data, mode))

    def list(self, path: str = "/workspace") -> builtins.list[FileInfo]:
        return portal().call(self._f.list(path))

    def stat(self, path: str) -> FileInfo:
        return portal().call(self._f.stat(path))

    def exists(self, path: str) -> bool:
        return portal().call(self._f.exists(path))

    def mkdir(self, path: str) -> None:
        portal().call(self._f.mkdir(path))

    def remove(self, path: str, recursive: bool = False) -> None:
        portal().call(self._f.remove(path, recursive))

    def rename(self, src: str, dst: str) -> None:
        portal().call(self._f.rename(src, dst))


class _Resume:
    @overload
    def __get__(self, obj: None, owner: type[Sandbox]) -> Callable[..., Sandbox]: ...

    @overload
    def __get__(self, obj: Sandbox, owner: type[Sandbox]) -> Callable[[], SandboxInfo]: ...

    def __get__(self, obj: Sandbox | None, owner: type[Sandbox]) -> Callable[..., Any]:
        return owner._resume_id if obj is None else obj._resume_self


class Volume:
    """Named persistent volumes: `Volume.create("cache", "1GiB")`, `Volume.list()`, ..."""

    @staticmethod
    def create(name: str, size: int | str = "1GiB", *, url: str | None = None,
               api_key: str | None = None) -> VolumeInfo:
        return portal().call(AsyncVolume.create(name, size, url=url, api_key=api_key))

    @staticmethod
    def get(name: str, *, url: str | None = None, api_key: str | None = None) -> VolumeInfo:
        return portal().call(AsyncVolume.get(name, url=url, api_key=api_key))

    @staticmethod
    def list(*, url: str | None = None, api_key: str | None = None) -> builtins.list[VolumeInfo]:
        return portal().call(AsyncVolume.list(url=url, api_key=api_key))

    @staticmethod
    def delete(name: str, *, url: str | None = None, api_key: str | None = None) -> VolumeInfo:
        return portal().call(AsyncVolume.delete(name, url=url, api_key=api_key))


class Template:
    """Templates: `Template.build(TemplateSpec(name=..., apt=[...]))`, `list`, `get`, ..."""

    @staticmethod
    def build(spec: TemplateSpec | Mapping[str, Any], *,
              progress: Callable[[dict[str, Any]], None] | None = None,
              url: str | None = None, api_key: str | None = None) -> TemplateInfo:
        return portal().call(AsyncTemplate.build(spec, progress=progress, url=url,
                                                 api_key=api_key))

    @staticmethod
    def list(*, url: str | None = None, api_key: str | None = None
             ) -> builtins.list[TemplateInfo]:
        return portal().call(AsyncTemplate.list(url=url, api_key=api_key))

    @staticmethod
    def get(name: str, *, url: str | None = None, api_key: str | None = None) -> TemplateInfo:
        return portal().call(AsyncTemplate.get(name, url=url, api_key=api_key))

    @staticmethod
    def delete(name: str, *, url: str | None = None, api_key: str | None = None
               ) -> TemplateInfo:
        return portal().call(AsyncTemplate.delete(name, url=url, api_key=api_key))

    @staticmethod
    def logs(name: str, *, url: str | None = None, api_key: str | None = None) -> str:
        return portal().call(AsyncTemplate.logs(name, url=url, api_key=api_key))


class Sandbox:
    """A running sandbox (synchronous API). `with Sandbox.create(...) as sb:` kills it at the end."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._a = inner
        self.files = Files(inner.files)

    @property
    def id(self) -> str:
        return self._a.id

    @property
    def info(self) -> SandboxInfo:
        return self._a.info

    @classmethod
    def create(
        cls, *, runtime: RuntimeName = "auto", allow_net: Sequence[str] | None = None,
        secrets: Mapping[str, Secret] | None = None, env: Mapping[str, str] | None = None,
        timeout: float | str | None = 1800, cpus: float | None = None,
        memory: int | str | None = None, pids: int | None = None, disk: int | str | None = None,
        workspace: str | None = None, metadata: Mapping[str, str] | None = None,
        volumes: VolumesArg = None, template: str | None = None, url: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        return cls(portal().call(AsyncSandbox.create(
            runtime=runtime, allow_net=allow_net, secrets=secrets, env=env, timeout=timeout,
            cpus=cpus, memory=memory, pids=pids, disk=disk, workspace=workspace,
            metadata=metadata, volumes=volumes, template=template, url=url, api_key=api_key,
        )))

    @classmethod
    def connect(cls, sandbox_id: str, *, url: str | None = None,
                api_key: str | None = None) -> Sandbox:
        return cls(portal().call(AsyncSandbox.connect(sandbox_id, url=url, api_key=api_key)))

    @classmethod
    def list(cls, *, url: str | None = None, api_key: str | None = None,
             include_ended: bool = False) -> builtins.list[SandboxInfo]:
        return portal().call(AsyncSandbox.list(url=url, api_key=api_key,
                                               include_ended=include_ended))

    def refresh(self) -> SandboxInfo:
        return portal().call(self._a.refresh())

    def exec(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, timeout: float | str | None = None,
             stdin: str | None = None, check: bool = False,
             background: bool = False) -> ExecResult:
        return portal().call(self._a.exec(cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin,
                                          check=check, background=background))

    def exec_stream(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, timeout: float | str | None = None,
                    stdin: str | None = None) -> Iterator[Output | ExecResult]:
        return portal().iterate(self._a.exec_stream(cmd, env=env, cwd=cwd, timeout=timeout,
                                                    stdin=stdin))

    def pty(self, rows: int = 24, cols: int = 80, cmd: Sequence[str] | None = None) -> Pty:
        return Pty(portal().call(self._a.pty(rows, cols, cmd)))

    def set_egress(self, allow_net: Sequence[str]) -> SandboxInfo:
        return portal().call(self._a.set_egress(allow_net))

    def egress_log(self) -> builtins.list[dict[str, Any]]:
        return portal().call(self._a.egress_log())

    def logs(self) -> builtins.list[dict[str, Any]]:
        return portal().call(self._a.logs())

    def expose(self, port: int, public: bool = False) -> dict[str, Any]:
        return portal().call(self._a.expose(port, public))

    def ssh_command(self) -> str:
        return portal().call(self._a.ssh_command())

    def pause(self) -> SandboxInfo:
        return portal().call(self._a.pause())

    def _resume_self(self) -> SandboxInfo:
        return portal().call(self._a.resume())

    @classmethod
    def _resume_id(cls, sandbox_id: str, *, url: str | None = None,
                   api_key: str | None = None) -> Sandbox:
        return cls(portal().call(AsyncSandbox.resume(sandbox_id, url=url, api_key=api_key)))

    resume = _Resume()
    """`sb.resume()` -> SandboxInfo, or `Sandbox.resume(id)` -> a handle."""

    def kill(self) -> SandboxInfo:
        return portal().call(self._a.kill())

    def disconnect(self) -> None:
        portal().call(self._a.disconnect())

    def close(self) -> None:
        portal().call(self._a.close())

    def snapshot(self, name: str) -> TemplateInfo:
        return portal().call(self._a.snapshot(name))

    def fork(self) -> Sandbox:
        return Sandbox(portal().call(self._a.fork()))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
