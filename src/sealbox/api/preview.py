"""Preview URLs: HTTP and WebSocket requests relayed to a port inside a sandbox.

Two address forms reach port P of sandbox ID:

* host form — any request whose ``Host`` is ``P-ID.DOMAIN`` (``DOMAIN`` defaults to
  ``localhost``, so ``http://P-ID.localhost:7411/`` works in a browser with no DNS set-up);
* path form — ``/v1/sandboxes/ID/ports/P/REST`` on the API itself (for API clients and curl;
  ``POST .../ports/P/expose`` is the API's own route, not relayed).

The server connects to the sandbox's own address on its veth (host-initiated TCP, which the
sandbox firewall lets through as ``ct state established`` replies); nothing here gives the
sandbox a path to the host. A service must listen on 0.0.0.0 (or the sandbox address) inside.

A preview is private unless exposed with ``public: true``. A private one needs the owner's (or
the admin's) API key as ``Authorization: Bearer`` or the URL's own token as ``?sealbox_token=``,
``X-Sealbox-Token`` or, on the host form only, the ``sealbox_token`` cookie that a request with
``?sealbox_token=`` sets (so a browser can load the page's assets). None of these ever reach the
sandbox: the relay strips them, and any ``Bearer sbk_...`` header, before forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sealbox.api.auth import KEY_PREFIX, Caller, KeyRing, bearer_token
from sealbox.api.deps import CallerDep, EngineDep
from sealbox.api.errors import error_response
from sealbox.api.models import COMMON_ERRORS, SANDBOX_ERRORS
from sealbox.engine.engine import Engine
from sealbox.errors import AuthError, ConfigError, SandboxGone, SealboxError, ServerError

log = logging.getLogger("sealbox.api.preview")

TOKEN_PARAM = "sealbox_token"
TOKEN_HEADER = "x-sealbox-token"
TOKEN_COOKIE = "sealbox_token"
DEFAULT_DOMAIN = "localhost"
CONNECT_TIMEOUT = 10.0
_PATH_FORM = re.compile(r"^/v1/sandboxes/([a-z0-9]{1,64})/ports/(\d{1,5})(/.*)?$")
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ----- state ----------------------------------------------------------------------------------

@dataclass
class Exposure:
    sandbox_id: str
    port: int
    public: bool = False
    token_hashes: list[str] = field(default_factory=list)


class PreviewRegistry:
    """Exposed ports, with their URL tokens kept as SHA-256 hashes (in memory: sandboxes do
    not survive a server restart, so neither do their previews)."""

    def __init__(self, domain: str = DEFAULT_DOMAIN) -> None:
        self.domain = domain.strip(".").lower()
        self._host = re.compile(
            r"^(\d{1,5})-([a-z0-9]{1,64})\." + re.escape(self.domain) + r"(?::\d{1,5})?$")
        self._exposed: dict[tuple[str, int], Exposure] = {}
        self._clients: dict[str, tuple[str, httpx.AsyncClient]] = {}

    def expose(self, sandbox_id: str, port: int, public: bool) -> tuple[Exposure, str]:
        """Expose a port; every call mints a new token (earlier ones stay valid)."""
        token = "sbp_" + secrets.token_urlsafe(24)
        exposure = self._exposed.setdefault((sandbox_id, port), Exposure(sandbox_id, port))
        exposure.public = public
        exposure.token_hashes.append(_hash(token))
        return exposure, token

    def get(self, sandbox_id: str, port: int) -> Exposure | None:
        return self._exposed.get((sandbox_id, port))

    def token_ok(self, sandbox_id: str, port: int, token: str | None) -> bool:
        exposure = self._exposed.get((sandbox_id, port))
        if exposure is None or not token:
            return False
        digest = _hash(token)
        return any(hmac.compare_digest(digest, h) for h in exposure.token_hashes)

    def match_host(self, host: str | None) -> tuple[str, int] | None:
        found = self._host.match((host or "").lower())
        return (found.group(2), int(found.group(1))) if found else None

    def client(self, sandbox_id: str, address: str) -> httpx.AsyncClient:
        """One keep-alive pool per sandbox (and address): a connection is never shared
        between sandboxes, even when an ended sandbox's address is reused."""
        current = self._clients.get(sandbox_id)
        if current is not None and current[0] == address:
            return current[1]
        client = httpx.AsyncClient(
            trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(CONNECT_TIMEOUT, read=None, write=None, pool=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=8),
        )
        self._clients[sandbox_id] = (address, client)
        if current is not None:
            asyncio.get_running_loop().create_task(current[1].aclose())
        return client

    async def forget(self, live: set[str]) -> None:
        """Drop exposures and pools of sandboxes that are no longer running."""
        for key in [k for k in self._exposed if k[0] not in live]:
            del self._exposed[key]
        for sandbox_id in [s for s in self._clients if s not in live]:
            _, client = self._clients.pop(sandbox_id)
            await client.aclose()

    async def close(self) -> None:
        await self.forget(set())


# ----- the expose route -----------------------------------------------------------------------

class ExposeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public: bool = Field(False, description="reachable without a token or API key")


class Exposed(BaseModel):
    url: str = Field(description="host-form URL: `http://PORT-ID.DOMAIN:SERVERPORT/`")
    path_url: str = Field(description="path-form URL on the API itself")
    token: str = Field(description="this URL's token (shown once): `?sealbox_token=` or "
                       "`X-Sealbox-Token`; not needed when public")
    public: bool


router = APIRouter(prefix="/v1/sandboxes", tags=["preview"],
                   responses={**COMMON_ERRORS, **SANDBOX_ERRORS})


def registry_of(app: Any) -> PreviewRegistry:
    registry: PreviewRegistry = app.state.previews
    return registry


@router.post("/{sandbox_id}/ports/{port}/expose", response_model=Exposed)
async def expose(sandbox_id: str, port: int, request: Request, engine: EngineDep,
                 caller: CallerDep, body: ExposeRequest | None = None) -> Exposed:
    """A preview URL for a TCP port inside the sandbox (HTTP, streaming, WebSocket)."""
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is not a TCP port (1-65535)")
    engine.guest(sandbox_id, owner=caller.owner)  # exists, is this tenant's, and runs
    registry = registry_of(request.app)
    await registry.forget({i.id for i in engine.list()})
    exposure, token = registry.expose(sandbox_id, port, public=bool(body and body.public))
    scheme = request.url.scheme
    server_port = request.url.port
    suffix = f":{server_port}" if server_port else ""
    return Exposed(
        url=f"{scheme}://{port}-{sandbox_id}.{registry.domain}{suffix}/",
        path_url=str(request.base_url).rstrip("/") + f"/v1/sandboxes/{sandbox_id}/ports/{port}/",
        token=token, public=exposure.public,
    )


# ----- the relay ------------------------------------------------------------------------------

def _cookie_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(CookieError):
                jar.load(value.decode("latin-1"))
            if TOKEN_COOKIE in jar:
                return jar[TOKEN_COOKIE].value
    return None


def _strip_cookie(value: str) -> str:
    parts = [p for p in value.split(";") if p.strip().split("=", 1)[0] != TOKEN_COOKIE]
    return ";".join(parts).strip()


@dataclass
class _Target:
    sandbox_id: str
    port: int
    path: str
    host_form: bool


class PreviewMiddleware:
    """Relays preview requests before routing; everything else goes to the API."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        target = self._target(scope)
        if target is None:
            await self.app(scope, receive, send)
            return
        await _Relay(scope, target).run(receive, send)

    @staticmethod
    def _target(scope: Scope) -> _Target | None:
        registry = registry_of(scope["app"])
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        hit = registry.match_host(host)
        path: str = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        path = path.split("?", 1)[0] or "/"
        if hit is not None:
            return _Target(hit[0], hit[1], path, host_form=True)
        found = _PATH_FORM.match(path)
        if found is None:
            return None
        rest = found.group(3) or "/"
        if rest == "/expose" and scope.get("method") == "POST":
            return None  # the API's own route
        return _Target(found.group(1), int(found.group(2)), rest, host_form=False)


class _Relay:
    def __init__(self, scope: Scope, target: _Target) -> None:
        self.scope = scope
        self.target = target
        self.engine: Engine = scope["app"].state.engine
        self.keys: KeyRing = scope["app"].state.keys
        self.registry = registry_of(scope["app"])
        self.set_cookie: str | None = None

    async def run(self, receive: Receive, send: Send) -> None:
        try:
            address, headers, query = await self._authorize()
        except SealboxError as exc:
            await self._refuse(exc, receive, send)
            return
        if self.scope["type"] == "websocket":
            await self._websocket(address, headers, query, receive, send)
        else:
            await self._http(address, headers, query, receive, send)

    async def _refuse(self, exc: SealboxError, receive: Receive, send: Send) -> None:
        response = error_response(exc)
        if isinstance(exc, SandboxGone):
            response = JSONResponse({"error": exc.to_dict()}, status_code=502)
        if self.scope["type"] == "websocket":
            await WebSocket(self.scope, receive, send).send_denial_response(response)
        else:
            await response(self.scope, receive, send)

    async def _authorize(self) -> tuple[str, list[tuple[str, str]], str]:
        """The sandbox address, the headers to forward and the query string to forward."""
        t = self.target
        raw: list[tuple[bytes, bytes]] = list(self.scope["headers"])
        query = [(k, v) for k, v in parse_qsl(self.scope.get("query_string", b"").decode("latin-1"),
                                               keep_blank_values=True)]
        token = next((v for k, v in query if k == TOKEN_PARAM), None)
        token = token or next((v.decode("latin-1") for k, v in raw
                               if k == TOKEN_HEADER.encode()), None)
        from_cookie = _cookie_token(raw) if t.host_form else None
        api_key = bearer_token(next((v.decode("latin-1") for k, v in raw
                                     if k == b"authorization"), None))
        sealbox_key = api_key if api_key and api_key.startswith(KEY_PREFIX) else None

        exposure = self.registry.get(t.sandbox_id, t.port)
        allowed = exposure is not None and exposure.public
        if not allowed and sealbox_key:
            caller: Caller | None = None
            with contextlib.suppress(AuthError):
                caller = self.keys.authenticate(sealbox_key)
            if caller is not None:
                self.engine.get(t.sandbox_id, owner=caller.owner)  # 404 for others' sandboxes
                allowed = True
        if not allowed and token and self.registry.token_ok(t.sandbox_id, t.port, token):
            allowed = True
            if t.host_form and self.scope["type"] == "http" and token != from_cookie:
                self.set_cookie = (f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax")
        if not allowed and from_cookie and self.registry.token_ok(t.sandbox_id, t.port,
                                                                  from_cookie):
            allowed = True
        if not allowed:
            raise AuthError("this preview URL is private: send the owner's API key "
                            "(Authorization: Bearer) or the URL's token (?sealbox_token=)")
        try:
            address = self.engine.sandbox_address(t.sandbox_id)
        except SealboxError as exc:
            await self.registry.forget({i.id for i in self.engine.list()})
            if exc.http_status == 404:
                raise
            raise SandboxGone(f"sandbox {t.sandbox_id} is not running: {exc.message}") from None

        forward: list[tuple[str, str]] = []
        connection_tokens = {
            part.strip().lower() for k, v in raw if k == b"connection"
            for part in v.decode("latin-1").split(",")}
        for k, v in raw:
            name, value = k.decode("latin-1"), v.decode("latin-1")
            if name in _HOP_BY_HOP or name in connection_tokens or name == TOKEN_HEADER:
                continue
            if name == "authorization" and sealbox_key:
                continue  # never hand a sealbox API key to the sandbox
            if name == "cookie" and t.host_form:
                value = _strip_cookie(value)
                if not value:
                    continue
            if name.startswith("x-forwarded-"):
                continue
            if self.scope["type"] == "websocket" and name.startswith("sec-websocket-"):
                continue  # the websocket client makes its own handshake
            forward.append((name, value))
        client = self.scope.get("client")
        host = next((v for k, v in forward if k == "host"), "")
        forward += [("x-forwarded-for", client[0] if client else ""),
                    ("x-forwarded-proto", "https" if self.scope.get("scheme") in ("https", "wss")
                     else "http"),
                    ("x-forwarded-host", host)]
        if not t.host_form:
            forward.append(("x-forwarded-prefix", f"/v1/sandboxes/{t.sandbox_id}/ports/{t.port}"))
        rest = urlencode([(k, v) for k, v in query if k != TOKEN_PARAM])
        return address, forward, rest

    # ----- HTTP ---------------------------------------------------------------------------

    async def _http(self, address: str, headers: list[tuple[str, str]], query: str,
                    receive: Receive, send: Send) -> None:
        t = self.target
        url = f"http://{address}:{t.port}{t.path}" + (f"?{query}" if query else "")
        has_body = any(k in ("content-length", "transfer-encoding") for k, _ in self.scope["headers"]
                       for k in [k.decode("latin-1")])
        client = self.registry.client(t.sandbox_id, address)
        request = client.build_request(
            self.scope["method"], url, headers=headers,
            content=_body(receive) if has_body else None,
        )
        try:
            upstream = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            await JSONResponse({"error": {
                "code": ServerError.code,
                "message": f"nothing answered on port {t.port} in sandbox {t.sandbox_id}: "
                           f"{type(exc).__name__} (does it listen on 0.0.0.0?)"}},
                status_code=502)(self.scope, receive, send)
            return
        out_headers = [(k, v) for k, v in upstream.headers.multi_items()
                       if k.lower() not in _HOP_BY_HOP]
        if self.set_cookie:
            out_headers.append(("set-cookie", self.set_cookie))
        response = StreamingResponse(_upstream_body(upstream), status_code=upstream.status_code,
                                     headers=None)
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                for k, v in out_headers]
        try:
            await response(self.scope, receive, send)
        finally:
            await upstream.aclose()

    # ----- WebSocket ------------------------------------------------------------------------

    async def _websocket(self, address: str, headers: list[tuple[str, str]], query: str,
                         receive: Receive, send: Send) -> None:
        t = self.target
        ws = WebSocket(self.scope, receive, send)
        url = f"ws://{address}:{t.port}{t.path}" + (f"?{query}" if query else "")
        subprotocols = list(self.scope.get("subprotocols") or [])
        extra = [(k, v) for k, v in headers if k not in ("host", "sec-websocket-protocol")]
        try:
            upstream = await connect(
                url, additional_headers=extra, subprotocols=subprotocols or None,
                open_timeout=CONNECT_TIMEOUT, max_size=None, compression=None,
                user_agent_header=None, proxy=None, ping_interval=None,
            )
        except InvalidStatus as exc:
            body = exc.response.body or b""
            await ws.send_denial_response(Response(
                body, status_code=exc.response.status_code,
                media_type=exc.response.headers.get("content-type")))
            return
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            await ws.send_denial_response(JSONResponse({"error": {
                "code": ServerError.code,
                "message": f"no WebSocket on port {t.port} in sandbox {t.sandbox_id}: "
                           f"{type(exc).__name__}"}}, status_code=502))
            return
        async with upstream:
            await ws.accept(subprotocol=upstream.subprotocol)
            inbound = asyncio.create_task(_client_to_upstream(ws, upstream))
            outbound = asyncio.create_task(_upstream_to_client(upstream, ws))
            done, pending = await asyncio.wait({inbound, outbound},
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            code = upstream.close_code or 1000
        if ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await ws.close(code if 1000 <= code < 5000 and code not in (1005, 1006) else 1000)


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _upstream_body(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.TransportError:
        return  # the sandbox side went away mid-body: end the response


async def _client_to_upstream(ws: WebSocket, upstream: ClientConnection) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            await upstream.close(message.get("code", 1000))
            return
        if message.get("bytes") is not None:
            await upstream.send(message["bytes"])
        elif message.get("text") is not None:
            await upstream.send(message["text"])


async def _upstream_to_client(upstream: ClientConnection, ws: WebSocket) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in upstream:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_text(message)


def install(app: FastAPI, domain: str = DEFAULT_DOMAIN) -> None:
    """Wire previews into the app: the registry, the relay middleware and the expose route."""
    app.state.previews = PreviewRegistry(domain)
    app.add_middleware(PreviewMiddleware)
    app.include_router(router)
