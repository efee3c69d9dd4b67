"""sealbox: self-hosted sandboxes for agent code; real credentials never enter the sandbox."""

from sealbox.engine.spec import ExecResult, SandboxInfo, SandboxState, VolumeMount
from sealbox.engine.templates import TemplateFile, TemplateInfo, TemplateSpec
from sealbox.engine.volumes import VolumeInfo
from sealbox.errors import (
    AuthError,
    CommandError,
    ConfigError,
    ConflictError,
    EgressError,
    LimitExceeded,
    NotFoundError,
    RuntimeUnavailable,
    SandboxError,
    SandboxGone,
    SealboxError,
    ServerError,
)
from sealbox.sdk.async_sandbox import AsyncSandbox, AsyncTemplate, AsyncVolume
from sealbox.sdk.secret import Secret
from sealbox.sdk.sync_sandbox import Sandbox, Template, Volume

__all__ = [
    "AsyncSandbox",
    "AsyncTemplate",
    "AsyncVolume",
    "AuthError",
    "CommandError",
    "ConfigError",
    "ConflictError",
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
    "Template",
    "TemplateFile",
    "TemplateInfo",
    "TemplateSpec",
    "Volume",
    "VolumeInfo",
    "VolumeMount",
]
