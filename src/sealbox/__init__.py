"""sealbox: self-hosted sandboxes for agent code; real credentials never enter the sandbox."""

from sealbox.engine.spec import ExecResult, SandboxInfo, SandboxState
from sealbox.errors import (
    AuthError,
    CommandError,
    ConfigError,
    EgressError,
    LimitExceeded,
    NotFoundError,
    RuntimeUnavailable,
    SandboxError,
    SandboxGone,
    SealboxError,
    ServerError,
)
from sealbox.sdk.async_sandbox import AsyncSandbox
from sealbox.sdk.secret import Secret
from sealbox.sdk.sync_sandbox import Sandbox

__all__ = [
    "AsyncSandbox",
    "AuthError",
    "CommandError",
    "ConfigError",
    "EgressError",
    "ExecResult",
    "LimitExceeded",
    "NotFoundError",
    "RuntimeUnavailable",
    "Sandbox",
    "SandboxError",
    "SandboxGone",
    "SandboxInfo",
    "SandboxState",
    "SealboxError",
    "Secret",
    "ServerError",
]
