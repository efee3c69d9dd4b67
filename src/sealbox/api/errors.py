"""Every error leaves the API as ``{"error": {"code", "message"}}`` with the error's status.

Bad input of any kind is a 400 with code ``invalid`` (never FastAPI's 422); anything unexpected
is a 500 whose body says nothing about the server's insides (the traceback goes to the log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from sealbox.errors import ConfigError, NotFoundError, SealboxError

log = logging.getLogger("sealbox.api")

_HTTP_CODES = {404: NotFoundError.code, 405: "method_not_allowed"}


def error_response(exc: SealboxError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            problems.append(f"the request body is not valid JSON: {err.get('ctx', {}).get('error')}")
            continue
        where = ".".join(str(part) for part in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        problems.append(f"{where}: {msg}" if where else msg)
    return "; ".join(problems) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(SealboxError)
    async def sealbox_error(_: Request, exc: SealboxError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ConfigError(_validation_message(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # Unknown routes and wrong methods: same error shape as everything else.
        fallback = ConfigError.code if exc.status_code < 500 else "internal"
        code = _HTTP_CODES.get(exc.status_code, fallback)
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": {"code": "internal", "message": "internal server error"}},
                            status_code=500)
