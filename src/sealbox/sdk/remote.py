"""The backend that drives a sealbox server over its REST API (httpx; websockets for PTYs)."""

from __future__ import annotations

import builtins

import base64
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from sealbox.engine.spec import ExecRequest, ExecResult, SandboxInfo, SandboxSpec
from sealbox.engine.templates import TemplateInfo, TemplateSpec
from sealbox.engine.volumes import VolumeInfo, make_volume_request
from sealbox.errors import AuthError, ConfigError, ServerError, from_code
from sealbox.guest.client import FileInfo, Output


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        err = resp.json()["error"]
        raise from_code(err["code"], err["message"])
    except (ValueError, KeyError, TypeError):
        raise ServerError(f"server answered {resp.status_code}: {resp.text[:200]}") from None


class RemotePty:
    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._code: int | None = None

    async def write(self, data: bytes) -> None:
        await self._ws.send(data)

    async def resize(self, rows: int, cols: int) -> None:
        await self._ws.send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for msg in self._ws:
                if isinstance(msg, bytes):
                    yield msg
                else:
                    event = json.loads(msg)
                    if event.get("type") == "exit":
                        self._code = int(event.get("code", 0))
        except ConnectionClosed:
            return

    async def wait(self) -> int:
        async for _ in self:
            pass
        return self._code if self._code is not None else -1

    async def close(self) -> None:
        await self._ws.close()


class RemoteBackend:
    def __init__(self, url: str, api_key: str | None) -> None:
        if not api_key:
            raise AuthError("no API key: set SEALBOX_API_KEY or pass api_key=")
        self._url = url.rstrip("/")
        self._key = api_key
        self._http = httpx.AsyncClient(
            base_url=self._url, headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(60.0, read=None),
        )

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ServerError(f"cannot reach sealbox server at {self._url}: {exc}") from None
        _raise_for(resp)
        return resp.json() if resp.content else None

    def _sb(self, sandbox_id: str, rest: str = "") -> str:
        return f"/v1/sandboxes/{sandbox_id}{rest}"

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        body = spec.model_dump(mode="json", exclude_none=False)
        for name, secret in spec.secrets.items():
            body["secrets"][name]["value"] = secret.value.get_secret_value()
        return SandboxInfo.model_validate(await self._json("POST", "/v1/sandboxes", json=body))

    async def get(self, sandbox_id: str) -> SandboxInfo:
        return SandboxInfo.model_validate(await self._json("GET", self._sb(sandbox_id)))

    async def list(self, include_ended: bool = False) -> builtins.list[SandboxInfo]:
        data = await self._json("GET", "/v1/sandboxes", params={"all": str(include_ended).lower()})
        return [SandboxInfo.model_validate(d) for d in data]

    async def kill(self, sandbox_id: str) -> SandboxInfo:
        return SandboxInfo.model_validate(await self._json("DELETE", self._sb(sandbox_id)))

    async def pause(self, sandbox_id: str) -> SandboxInfo:
        return SandboxInfo.model_validate(await self._json("POST", self._sb(sandbox_id, "/pause")))

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        return SandboxInfo.model_validate(await self._json("POST", self._sb(sandbox_id, "/resume")))

    async def _events(self, url: str, body: Any, params: dict[str, str] | None = None
                      ) -> AsyncGenerator[dict[str, Any], None]:
        """POST BODY to URL and yield the NDJSON events of the streamed answer; an `error`
        event is raised as the sealbox error it names."""
        try:
            async with self._http.stream("POST", url, params=params, json=body) as resp:
                if not resp.is_success:
                    await resp.aread()
                    _raise_for(resp)
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    event: dict[str, Any] = json.loads(line)
                    if event.get("type") == "error":
                        raise from_code(event.get("code", "internal"), event.get("message", ""))
                    yield event
        except httpx.TransportError as exc:
            raise ServerError(f"connection to sealbox server lost: {exc}") from None

    async def exec_stream(self, sandbox_id: str, req: ExecRequest
                          ) -> AsyncIterator[Output | ExecResult]:
        events = self._events(self._sb(sandbox_id, "/exec"), req.model_dump(mode="json"),
                              {"stream": "true"})
        async with contextlib.aclosing(events):  # a consumer that stops early ends the request
            async for event in events:
                kind = event.pop("type")
                if kind in ("stdout", "stderr"):
                    yield Output(kind, base64.b64decode(event["data"]))
                elif kind == "exit":
                    yield ExecResult.model_validate(event)

    async def run(self, sandbox_id: str, req: ExecRequest) -> ExecResult:
        data = await self._json("POST", self._sb(sandbox_id, "/exec"),
                                json=req.model_dump(mode="json"))
        return ExecResult.model_validate(data)

    async def read_file(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        async with self._http.stream("GET", self._sb(sandbox_id, "/files"),
                                     params={"path": path}) as resp:
            if not resp.is_success:
                await resp.aread()
                _raise_for(resp)
            async for chunk in resp.aiter_bytes():
                yield chunk

    async def write_file(self, sandbox_id: str, path: str,
                         data: bytes | AsyncIterable[bytes], mode: int = 0o644) -> None:
        await self._json("PUT", self._sb(sandbox_id, "/files"),
                         params={"path": path, "mode": f"{mode:o}"}, content=data)

    async def list_dir(self, sandbox_id: str, path: str) -> builtins.list[FileInfo]:
        data = await self._json("GET", self._sb(sandbox_id, "/files/list"), params={"path": path})
        return [FileInfo(**d) for d in data]

    async def stat(self, sandbox_id: str, path: str) -> FileInfo:
        data = await self._json("GET", self._sb(sandbox_id, "/files/stat"), params={"path": path})
        return FileInfo(**data)

    async def mkdir(self, sandbox_id: str, path: str) -> None:
        await self._json("POST", self._sb(sandbox_id, "/files/mkdir"), json={"path": path})

    async def remove(self, sandbox_id: str, path: str, recursive: bool = False) -> None:
        await self._json("DELETE", self._sb(sandbox_id, "/files"),
                         params={"path": path, "recursive": str(recursive).lower()})

    async def rename(self, sandbox_id: str, src: str, dst: str) -> None:
        await self._json("POST", self._sb(sandbox_id, "/files/rename"),
                         json={"src": src, "dst": dst})

    async def pty(self, sandbox_id: str, rows: int, cols: int,
                  cmd: builtins.list[str] | None = None) -> RemotePty:
        ws_url = self._url.replace("http", "ws", 1) + self._sb(sandbox_id, "/pty")
        query: builtins.list[tuple[str, str | int]] = [("rows", rows), ("cols", cols)]
        query += [("cmd", part) for part in cmd or []]
        ws_url += "?" + urlencode(query)
        ws = await connect(ws_url, additional_headers={"Authorization": f"Bearer {self._key}"},
                           max_size=None)
        return RemotePty(ws)

    async def set_egress(self, sandbox_id: str, allow_net: builtins.list[str]) -> SandboxInfo:
        return SandboxInfo.model_validate(await self._json(
            "PUT", self._sb(sandbox_id, "/egress"), json={"allow_net": allow_net}))

    async def egress_log(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        data: builtins.list[dict[str, Any]] = await self._json("GET", self._sb(sandbox_id, "/egress"))
        return data

    async def logs(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        data: builtins.list[dict[str, Any]] = await self._json("GET", self._sb(sandbox_id, "/logs"))
        return data

    async def expose(self, sandbox_id: str, port: int, public: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = await self._json(
            "POST", self._sb(sandbox_id, f"/ports/{port}/expose"), json={"public": public})
        return data

    async def ssh_command(self, sandbox_id: str) -> str:
        info = await self._json("GET", "/v1/ssh")
        if not info.get("enabled"):
            raise ConfigError("this server has no SSH gateway: start it with --ssh-port")
        host = urlsplit(self._url).hostname
        return f"ssh -p {info['port']} {sandbox_id}@{host}"

    # Warm pools (admin key): plain JSON; the CLI's `sealbox pool` uses these.
    async def pools(self) -> builtins.list[dict[str, Any]]:
        data: builtins.list[dict[str, Any]] = await self._json("GET", "/v1/pools")
        return data

    async def set_pool(self, config: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = await self._json("PUT", "/v1/pools", json=config)
        return data

    async def remove_pool(self, template: str, runtime: str) -> None:
        await self._json("DELETE", f"/v1/pools/{template}/{runtime}")

    async def create_volume(self, name: str, size: int | str) -> VolumeInfo:
        body = make_volume_request(name, size).model_dump(mode="json")
        return VolumeInfo.model_validate(await self._json("POST", "/v1/volumes", json=body))

    async def list_volumes(self) -> builtins.list[VolumeInfo]:
        return [VolumeInfo.model_validate(d) for d in await self._json("GET", "/v1/volumes")]

    async def get_volume(self, name: str) -> VolumeInfo:
        return VolumeInfo.model_validate(await self._json("GET", f"/v1/volumes/{quote(name)}"))

    async def build_template(self, spec: TemplateSpec,
                             progress: Callable[[dict[str, Any]], None] | None = None
                             ) -> TemplateInfo:
        # The server does not read the caller's files: they travel inline.
        body = spec.model_copy(update={"files": [f.inline() for f in spec.files]})
        events = self._events("/v1/templates", body.model_dump(mode="json"))
        async with contextlib.aclosing(events):
            async for event in events:
                if event.get("type") == "done":
                    return TemplateInfo.model_validate(event["template"])
                if progress is not None:
                    progress(event)
        raise ServerError("the server ended the build stream without a result")

    async def list_templates(self) -> builtins.list[TemplateInfo]:
        return [TemplateInfo.model_validate(d) for d in await self._json("GET", "/v1/templates")]

    async def get_template(self, name: str) -> TemplateInfo:
        return TemplateInfo.model_validate(
            await self._json("GET", f"/v1/templates/{quote(name, safe='')}"))

    async def delete_template(self, name: str) -> TemplateInfo:
        return TemplateInfo.model_validate(
            await self._json("DELETE", f"/v1/templates/{quote(name, safe='')}"))

    async def template_logs(self, name: str) -> str:
        try:
            resp = await self._http.get(f"/v1/templates/{quote(name, safe='')}/logs")
        except httpx.TransportError as exc:
            raise ServerError(f"cannot reach sealbox server at {self._url}: {exc}") from None
        _raise_for(resp)
        return resp.text

    async def snapshot(self, sandbox_id: str, name: str) -> TemplateInfo:
        return TemplateInfo.model_validate(await self._json(
            "POST", self._sb(sandbox_id, "/snapshot"), json={"name": name}))

    async def fork(self, sandbox_id: str) -> SandboxInfo:
        return SandboxInfo.model_validate(await self._json("POST", self._sb(sandbox_id, "/fork")))

    async def delete_volume(self, name: str) -> VolumeInfo:
        return VolumeInfo.model_validate(await self._json("DELETE",
                                                          f"/v1/volumes/{quote(name)}"))

    async def close(self) -> None:
        await self._http.aclose()
