"""The one exception tree users catch.

    SealboxError
    ├── ConfigError            bad input: spec, CLI option, API body, path
    ├── NotFoundError          unknown sandbox, file, process
    ├── AuthError              missing or wrong API key / token
    │   └── ForbiddenError     a valid key that may not do this
    ├── RuntimeUnavailable     the chosen tier cannot run on this host (reason from `doctor`)
    ├── SandboxError           the sandbox failed or ended
    │   ├── LimitExceeded      a limit killed it (memory, pids, disk, timeout)
    │   └── SandboxGone        it is no longer running
    ├── CommandError           a command exited non-zero (carries the result)
    ├── ConflictError          the resource is in use (a mounted volume, a volume's writer)
    ├── EgressError            a gateway problem (network plumbing, CA, policy)
    ├── CapacityError          the installation's sandbox cap is reached (max_sandboxes)
    ├── QuotaExceeded          a tenant's own limit is reached (volume_quota)
    └── ServerError            the remote server failed or answered something unexpected

Each has a stable ``code`` used as the REST error code; `from_code` maps it back.
"""

from __future__ import annotations

from typing import Any


class SealboxError(Exception):
    code = "internal"
    http_status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **({"details": self.details} if self.details else {})}


class ConfigError(SealboxError):
    code = "invalid"
    http_status = 400


class NotFoundError(SealboxError):
    code = "not_found"
    http_status = 404


class AuthError(SealboxError):
    code = "unauthorized"
    http_status = 401


class ForbiddenError(AuthError):
    code = "forbidden"
    http_status = 403


class RuntimeUnavailable(SealboxError):
    code = "runtime_unavailable"
    http_status = 409


class SandboxError(SealboxError):
    code = "sandbox_failed"
    http_status = 409


class LimitExceeded(SandboxError):
    code = "limit_exceeded"


class SandboxGone(SandboxError):
    code = "sandbox_gone"
    http_status = 410


class CommandError(SealboxError):
    """A command exited non-zero. ``result`` holds its output and exit code."""

    code = "command_failed"
    http_status = 422

    def __init__(self, message: str, result: Any = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.result = result


class ConflictError(SealboxError):
    code = "conflict"
    http_status = 409


class EgressError(SealboxError):
    code = "egress_failed"
    http_status = 500


class CapacityError(SealboxError):
    code = "capacity"
    http_status = 503


class QuotaExceeded(SealboxError):
    code = "quota_exceeded"
    http_status = 403


class ServerError(SealboxError):
    code = "server_error"
    http_status = 502


_BY_CODE: dict[str, type[SealboxError]] = {
    cls.code: cls
    for cls in (
        SealboxError, ConfigError, NotFoundError, AuthError, ForbiddenError, RuntimeUnavailable,
        SandboxError,
        LimitExceeded, SandboxGone, CommandError, EgressError, ServerError, ConflictError, CapacityError,
        QuotaExceeded,
    )
}


def from_code(code: str, message: str, **details: Any) -> SealboxError:
    """Rebuild the exception a server reported (REST error body → exception)."""
    return _BY_CODE.get(code, ServerError)(message, **details)


__all__ = [
    "AuthError",
    "CapacityError",
    "CommandError",
    "ConfigError",
    "ConflictError",
    "EgressError",
    "LimitExceeded",
    "NotFoundError",
    "QuotaExceeded",
    "RuntimeUnavailable",
    "SandboxError",
    "SandboxGone",
    "SealboxError",
    "ServerError",
    "from_code",
]
