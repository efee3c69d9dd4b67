"""`AsyncSandbox`: the one SDK implementation. `Sandbox` (sync.py) wraps it."""

from __future__ import annotations

import builtins

import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, overload

from pydantic import ValidationError

from sealbox.engine.spec import (
    ExecRequest,
    ExecResult,
    RuntimeName,
    SandboxInfo,
    SandboxSpec,
    VolumeMount,
)
from sealbox.engine.templates import TemplateInfo, TemplateSpec
from sealbox.engine.volumes import VolumeInfo
from sealbox.errors import CommandError, ConfigError
from sealbox.guest.client import FileInfo, Output
from sealbox.sdk.backend import Backend, PtySession
from sealbox.sdk.secret import Secret


def _backend(url: str | None, api_key: str | None) -> Backend:
    url = url or os.environ.get("SEALBOX_URL")
    if url:
        from sealbox.sdk.remote import RemoteBackend

        return RemoteBackend(url, api_key or os.environ.get("SEALBOX_API_KEY"))
    from sealbox.sdk.embedded import EmbeddedBackend

    return EmbeddedBackend()


def validation_message(exc: ValidationError) -> str:
    """One line per problem, naming the field: what a user needs to fix their input."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def make_spec(**fields: Any) -> SandboxSpec:
    try:
        return SandboxSpec(**{k: v for k, v in fields.items() if v is not None or k == "timeout"})
    except ValidationError as exc:
        raise ConfigError(f"invalid sandbox options: {validation_message(exc)}") from None


VolumesArg = Mapping[str, str] | Sequence[VolumeMount] | None
"""`{"/cache": "cache"}` (mount path -> volume name, as Modal writes it), `{"cache": "/cache"}`
(name -> path; mount paths are absolute and names never contain "/", so both read unambiguously),
or a list of `VolumeMount` (for read-only mounts)."""


def make_volumes(volumes: VolumesArg) -> builtins.list[dict[str, Any]]:
    if not volumes:
        return []
    if isinstance(volumes, Mapping):
        out = []
        for key, value in volumes.items():
            path, name = (key, value) if key.startswith("/") else (value, key)
            out.append({"name": name, "path": path, "read_only": False})
        return out
    return [v.model_dump() if isinstance(v, VolumeMount) else dict(v) for v in volumes]


def make_exec(cmd: str | Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
              timeout: float | str | None, stdin: str | None, background: bool = False
              ) -> ExecRequest:
    try:
        return ExecRequest.model_validate({
            "cmd": cmd if isinstance(cmd, str) else builtins.list(cmd), "env": dict(env or {}),
            "cwd": cwd, "timeout": timeout, "stdin": stdin, "background": background})
    except ValidationError as exc:
        raise ConfigError(f"invalid command: {validation_message(exc)}") from None


class AsyncFiles:
    """`sandbox.files`: the sandbox's filesystem. Relative paths are under /workspace."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def read(self, path: str) -> bytes:
        return b"".join([c async for c in self.read_stream(path)])

    async def read_text(self, path: str) -> str:
        return (await self.read(path)).decode()

    def read_stream(self, path: str) -> AsyncIterator[bytes]:
        return self._sb._backend.read_file(self._sb.id, path)

    async def write(self, path: str, data: bytes | str | AsyncIterable[bytes],
                    mode: int = 0o644) -> None:
        payload = data.encode() if isinstance(data, str) else data
        await self._sb._backend.write_file(self._sb.id, path, payload, mode)

    async def list(self, path: str = "/workspace") -> builtins.list[FileInfo]:
        return await self._sb._backend.list_dir(self._sb.id, path)

    async def stat(self, path: str) -> FileInfo:
        return await self._sb._backend.stat(self._sb.id, path)

    async def exists(self, path: str) -> bool:
        from sealbox.errors import NotFoundError

        try:
            await self.stat(path)
        except NotFoundError:
            return False
        return True

    async def mkdir(self, path: str) -> None:
        await self._sb._backend.mkdir(self._sb.id, path)

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._sb._backend.remove(self._sb.id, path, recursive)

    async def rename(self, src: str, dst: str) -> None:
        await self._sb._backend.rename(self._sb.id, src, dst)


class _Resume:
    """`resume` both ways: on the class it resumes a sandbox by id and returns a handle (as
    E2B's `Sandbox.resume(id)`); on a handle it resumes that sandbox."""

    @overload
    def __get__(self, obj: None, owner: type[AsyncSandbox]
                ) -> Callable[..., Coroutine[Any, Any, AsyncSandbox]]: ...

    @overload
    def __get__(self, obj: AsyncSandbox, owner: type[AsyncSandbox]
                ) -> Callable[[], Coroutine[Any, Any, SandboxInfo]]: ...

    def __get__(self, obj: AsyncSandbox | None, owner: type[AsyncSandbox]) -> Callable[..., Any]:
        return owner._resume_id if obj is None else obj._resume_self


class AsyncSandbox:
    """A running sandbox. Create with `await AsyncSandbox.create(...)`; use as a context manager
    so it is killed when the block ends."""

    def __init__(self, info: SandboxInfo, backend: Backend, owns_backend: bool = True) -> None:
        self.info = info
        self._backend = backend
        self._owns_backend = owns_backend
        """False for a fork: it shares its parent's connection, which outlives it."""
        self.files = AsyncFiles(self)

    @property
    def id(self) -> str:
        return self.info.id

    @classmethod
    async def create(
        cls, *, runtime: RuntimeName = "auto", allow_net: Sequence[str] | None = None,
        secrets: Mapping[str, Secret] | None = None, env: Mapping[str, str] | None = None,
        timeout: float | str | None = 1800, cpus: float | None = None,
        memory: int | str | None = None, pids: int | None = None, disk: int | str | None = None,
        workspace: str | None = None, metadata: Mapping[str, str] | None = None,
        volumes: VolumesArg = None, template: str | None = None, url: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        spec = make_spec(
            runtime=runtime, allow_net=list(allow_net or []), secrets=dict(secrets or {}),
            env=dict(env or {}), timeout=timeout, cpus=cpus, memory=memory, pids=pids, disk=disk,
            workspace=workspace, metadata=dict(metadata or {}), volumes=make_volumes(volumes),
            template=template,
        )
        backend = _backend(url, api_key)
        return cls(await backend.create(spec), backend)

    @classmethod
    async def connect(cls, sandbox_id: str, *, url: str | None = None,
                      api_key: str | None = None) -> AsyncSandbox:
        """Attach to an existing sandbox by id."""
        backend = _backend(url, api_key)
        return cls(await backend.get(sandbox_id), backend)

    @classmethod
    async def list(cls, *, url: str | None = None, api_key: str | None = None,
                   include_ended: bool = False) -> builtins.list[SandboxInfo]:
        backend = _backend(url, api_key)
        try:
            return await backend.list(include_ended)
        finally:
            await backend.close()

    async def refresh(self) -> SandboxInfo:
        self.info = await self._backend.get(self.id)
        return self.info

    async def exec(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, timeout: float | str | None = None,
                   stdin: str | None = None, check: bool = False,
                   background: bool = False) -> ExecResult:
        """Run CMD (a shell string or an argv list) and wait for it. With check=True a non-zero
        exit raises CommandError carrying the result. With background=True return once it
        started (`result.pid`; `exit_code` is None)."""
        result = await self._backend.run(
            self.id, make_exec(cmd, env, cwd, timeout, stdin, background))
        if check and result.exit_code not in (0, None):
            raise CommandError(
                f"command exited with code {result.exit_code}"
                + (f" ({result.limit})" if result.limit else ""), result=result,
            )
        return result

    def exec_stream(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, timeout: float | str | None = None,
                    stdin: str | None = None) -> AsyncIterator[Output | ExecResult]:
        """Output chunks (`Output(stream, data)`) as they come, then the `ExecResult`."""
        return self._backend.exec_stream(self.id, make_exec(cmd, env, cwd, timeout, stdin))

    async def pty(self, rows: int = 24, cols: int = 80,
                  cmd: Sequence[str] | None = None) -> PtySession:
        """An interactive terminal (bash by default)."""
        return await self._backend.pty(self.id, rows, cols, list(cmd) if cmd else None)

    async def set_egress(self, allow_net: Sequence[str]) -> SandboxInfo:
        """Replace the sandbox's network allowlist while it runs."""
        self.info = await self._backend.set_egress(self.id, list(allow_net))
        return self.info

    async def egress_log(self) -> builtins.list[dict[str, Any]]:
        return await self._backend.egress_log(self.id)

    async def logs(self) -> builtins.list[dict[str, Any]]:
        return await self._backend.logs(self.id)

    async def expose(self, port: int, public: bool = False) -> dict[str, Any]:
        """A preview URL for PORT inside the sandbox: {"url", "token", "public", ...}.
        Private unless PUBLIC: send the token (X-Sealbox-Token) or your API key."""
        return await self._backend.expose(self.id, port, public)

    async def ssh_command(self) -> str:
        """The `ssh` command line that opens a shell in this sandbox (needs a registered key)."""
        return await self._backend.ssh_command(self.id)

    async def pause(self) -> SandboxInfo:
        """Pause the sandbox: no CPU, and its timeout clock stops. It survives a server
        restart: on microvm with its processes and memory (saved to disk, freed on the host),
        elsewhere with only its /workspace files."""
        self.info = await self._backend.pause(self.id)
        return self.info

    async def _resume_self(self) -> SandboxInfo:
        self.info = await self._backend.resume(self.id)
        return self.info

    @classmethod
    async def _resume_id(cls, sandbox_id: str, *, url: str | None = None,
                         api_key: str | None = None) -> AsyncSandbox:
        backend = _backend(url, api_key)
        try:
            return cls(await backend.resume(sandbox_id), backend)
        except BaseException:
            await backend.close()
            raise

    resume = _Resume()
    """`await sb.resume()` -> SandboxInfo, or `await AsyncSandbox.resume(id)` -> a handle.
    `info.resumed_processes` says whether processes came back (see `info.resume_note`)."""

    async def kill(self) -> SandboxInfo:
        self.info = await self._backend.kill(self.id)
        return self.info

    async def disconnect(self) -> None:
        """Release the connection to the backend; the sandbox keeps running."""
        if self._owns_backend:
            await self._backend.close()

    async def close(self) -> None:
        """Kill the sandbox and release the connection to its backend."""
        try:
            await self.kill()
        finally:
            if self._owns_backend:
                await self._backend.close()

    async def snapshot(self, name: str) -> TemplateInfo:
        """Save /workspace as template NAME (filesystem only; the parent template's layer is
        shared). `AsyncSandbox.create(template=NAME)` starts from it."""
        return await self._backend.snapshot(self.id, name)

    async def fork(self) -> AsyncSandbox:
        """A new sandbox cloned from this one, with the same template, policy, limits and
        secrets (fresh placeholders). On microvm it is the running VM (processes, memory mapped
        copy-on-write, files); elsewhere a copy of /workspace. Its ``info.metadata["sealbox.fork"]``
        says which (``vm`` or ``workspace``). Kill it separately."""
        return AsyncSandbox(await self._backend.fork(self.id), self._backend, owns_backend=False)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class AsyncVolume:
    """Named persistent volumes (the same calls embedded or against a server)."""

    @staticmethod
    async def create(name: str, size: int | str = "1GiB", *, url: str | None = None,
                     api_key: str | None = None) -> VolumeInfo:
        backend = _backend(url, api_key)
        try:
            return await backend.create_volume(name, size)
        finally:
            await backend.close()

    @staticmethod
    async def get(name: str, *, url: str | None = None, api_key: str | None = None) -> VolumeInfo:
        backend = _backend(url, api_key)
        try:
            return await backend.get_volume(name)
        finally:
            await backend.close()

    @staticmethod
    async def list(*, url: str | None = None, api_key: str | None = None
                   ) -> builtins.list[VolumeInfo]:
        backend = _backend(url, api_key)
        try:
            return await backend.list_volumes()
        finally:
            await backend.close()

    @staticmethod
    async def delete(name: str, *, url: str | None = None, api_key: str | None = None
                     ) -> VolumeInfo:
        backend = _backend(url, api_key)
        try:
            return await backend.delete_volume(name)
        finally:
            await backend.close()


class AsyncTemplate:
    """Templates: `await AsyncTemplate.build(TemplateSpec(name=..., apt=[...]))`, `list`,
    `get`, `delete`, `logs` (the same calls embedded or against a server)."""

    @staticmethod
    async def build(spec: TemplateSpec | Mapping[str, Any], *,
                    progress: Callable[[dict[str, Any]], None] | None = None,
                    url: str | None = None, api_key: str | None = None) -> TemplateInfo:
        """Build (or find built) a template. PROGRESS gets each build event (step, log)."""
        try:
            tspec = spec if isinstance(spec, TemplateSpec) else TemplateSpec.model_validate(spec)
        except ValidationError as exc:
            raise ConfigError(f"invalid template spec: {validation_message(exc)}") from None
        backend = _backend(url, api_key)
        try:
            return await backend.build_template(tspec, progress)
        finally:
            await backend.close()

    @staticmethod
    async def list(*, url: str | None = None, api_key: str | None = None
                   ) -> builtins.list[TemplateInfo]:
        backend = _backend(url, api_key)
        try:
            return await backend.list_templates()
        finally:
            await backend.close()

    @staticmethod
    async def get(name: str, *, url: str | None = None, api_key: str | None = None
                  ) -> TemplateInfo:
        backend = _backend(url, api_key)
        try:
            return await backend.get_template(name)
        finally:
            await backend.close()

    @staticmethod
    async def delete(name: str, *, url: str | None = None, api_key: str | None = None
                     ) -> TemplateInfo:
        backend = _backend(url, api_key)
        try:
            return await backend.delete_template(name)
        finally:
            await backend.close()

    @staticmethod
    async def logs(name: str, *, url: str | None = None, api_key: str | None = None) -> str:
        backend = _backend(url, api_key)
        try:
            return await backend.template_logs(name)
        finally:
            await backend.close()
