"""sealbox: self-hosted sandboxes for agent code; real credentials never enter the sandbox."""

from sealbox.errors import (
    AuthError, CommandError, ConfigError, EgressError, LimitExceeded, NotFoundError,
    RuntimeUnavailable, SandboxError, SandboxGone, SealboxError, ServerError,
)

__all__ = [
    "SealboxError", "ConfigError", "NotFoundError", "AuthError", "RuntimeUnavailable",
    "SandboxError", "LimitExceeded", "SandboxGone", "CommandError", "EgressError", "ServerError",
]
