"""Commands: one-shot exec (JSON or a streamed NDJSON body) and interactive PTYs (WebSocket)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from sealbox.api.auth import bearer_token
from sealbox.api.deps import CallerDep, EngineDep, get_engine, get_keys
from sealbox.api.errors import error_response
from sealbox.api.models import COMMON_ERRORS, SANDBOX_ERRORS
from sealbox.engine.spec import ExecRequest, ExecResult
from sealbox.errors import SealboxError
from sealbox.guest.client import ExecHandle, ExitStatus, Output

router = APIRouter(prefix="/v1/sandboxes", tags=["exec"])
log = logging.getLogger("sealbox.api")

NDJSON = "application/x-ndjson"
DEFAULT_SHELL = ["/bin/bash", "-l"]
_STREAM_DOC = (
    "With `stream=true` the body is NDJSON, one line per output chunk as it arrives: "
    '`{"type": "stdout"|"stderr", "data": BASE64}`, then `{"type": "exit", ...ExecResult}` '
    '(or `{"type": "error", "code", "message"}` if the sandbox ends first).'
)


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event) + "\n").encode()


async def _ndjson(items: AsyncIterator[Output | ExecResult]) -> AsyncIterator[bytes]:
    try:
        async for item in items:
            if isinstance(item, ExecResult):
                yield _line({"type": "exit", **item.model_dump(mode="json")})
            else:
                yield _line({"type": item.stream, "data": base64.b64encode(item.data).decode()})
    except SealboxError as exc:
        # The status line is already sent: the error travels as the last line.
        yield _line({"type": "error", **exc.to_dict()})


@router.post(
    "/{sandbox_id}/exec", response_model=ExecResult, description=_STREAM_DOC,
    responses={**COMMON_ERRORS, **SANDBOX_ERRORS,
               200: {"content": {NDJSON: {"schema": {"type": "string"}}}}},
)
async def exec_command(
    sandbox_id: str, req: ExecRequest, engine: EngineDep, caller: CallerDep,
    stream: Annotated[bool, Query(description="stream output as NDJSON")] = False,
) -> ExecResult | StreamingResponse:
    """Run a command in the sandbox and return its exit code and output."""
    if not stream:
        return await engine.run(sandbox_id, req, owner=caller.owner)
    # Fail with a proper status (404, 409, 410) before the 200 is sent, not inside the stream.
    engine.guest(sandbox_id, owner=caller.owner)
    return StreamingResponse(_ndjson(engine.exec_stream(sandbox_id, req, owner=caller.owner)),
                             media_type=NDJSON)


@router.websocket("/{sandbox_id}/pty")
async def pty(
    websocket: WebSocket, sandbox_id: str,
    rows: Annotated[int, Query(ge=1, le=1000)] = 24,
    cols: Annotated[int, Query(ge=1, le=1000)] = 80,
    token: Annotated[str | None, Query(description="API key, for clients that cannot set headers")] = None,
    cmd: Annotated[list[str] | None, Query(description="argv (repeat); default a login shell")] = None,
) -> None:
    """An interactive terminal. Binary frames carry terminal bytes both ways; text frames are
    JSON control messages: `{"type": "resize", "rows", "cols"}` from the client, and
    `{"type": "exit", "code", "signal"}` from the server before it closes."""
    try:
        caller = get_keys(websocket).authenticate(
            bearer_token(websocket.headers.get("authorization")) or token)
        req = ExecRequest(cmd=cmd or DEFAULT_SHELL, env={"TERM": "xterm-256color"})
        handle = await get_engine(websocket).exec(sandbox_id, req, owner=caller.owner,
                                                  pty=(rows, cols))
    except SealboxError as exc:
        # Refuse the handshake with the same status and JSON body a plain request would get.
        await websocket.send_denial_response(error_response(exc))
        return
    await websocket.accept()
    inbound = asyncio.create_task(_client_to_pty(websocket, handle))
    outbound = asyncio.create_task(_pty_to_client(websocket, handle))
    try:
        await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        inbound.cancel()
        if not outbound.done():
            # The client went away: like a terminal hangup, it ends the session's processes.
            outbound.cancel()
            with contextlib.suppress(SealboxError):
                await handle.signal(signal.SIGKILL)
    close_code = 1000
    if outbound.done() and not outbound.cancelled() and outbound.exception() is not None:
        log.warning("pty on %s failed", sandbox_id, exc_info=outbound.exception())
        close_code = 1011
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(WebSocketDisconnect):  # the client may have gone meanwhile
            await websocket.close(close_code)


class _Resize(BaseModel):
    type: Literal["resize"]
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


async def _client_to_pty(websocket: WebSocket, handle: ExecHandle) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            await handle.write_stdin(message["bytes"])
        elif message.get("text"):
            try:
                resize = _Resize.model_validate_json(message["text"])
            except ValidationError:
                continue  # an unknown or malformed control message must not end the session
            await handle.resize(resize.rows, resize.cols)


async def _pty_to_client(websocket: WebSocket, handle: ExecHandle) -> None:
    async for item in handle:
        if isinstance(item, ExitStatus):
            await websocket.send_text(json.dumps(
                {"type": "exit", "code": item.exit_code, "signal": item.signal}))
            return
        await websocket.send_bytes(item.data)
