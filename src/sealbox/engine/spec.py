"""What a user asks for (``SandboxSpec``) and what they get back (``SandboxInfo``)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sealbox.egress.secrets import SecretSpec
from sealbox.engine.units import parse_duration, parse_size
from sealbox.errors import ConfigError

RuntimeName = Literal["auto", "namespace", "gvisor", "microvm"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_TIMEOUT = 1800.0


def _duration(v: Any) -> float | None:
    # ValueError, not ConfigError, so pydantic names the field in its message.
    try:
        return None if v is None else parse_duration(v)
    except ConfigError as exc:
        raise ValueError(exc.message) from None


class SandboxSpec(BaseModel):
    """A sandbox request. Sizes accept "4GiB"-style strings, durations "30m"-style strings."""

    model_config = ConfigDict(extra="forbid")

    runtime: RuntimeName = "auto"
    allow_net: list[str] = Field(default_factory=list)
    secrets: dict[str, SecretSpec] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = Field(default=DEFAULT_TIMEOUT, description="seconds; null = no cap")
    cpus: float | None = Field(default=None, gt=0, le=256)
    memory: int | None = Field(default=None, description="bytes")
    pids: int | None = Field(default=1024, gt=0)
    disk: int | None = Field(default=2 * 1024**3, description="bytes, per writable mount")
    workspace: str | None = Field(default=None, description="host dir at /workspace (embedded only)")
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float | None:
        return _duration(v)

    @field_validator("memory", "disk", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | None:
        try:
            return None if v is None else parse_size(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @field_validator("memory")
    @classmethod
    def _memory_floor(cls, v: int | None) -> int | None:
        if v is not None and v < 32 * 1024**2:
            raise ValueError("memory must be at least 32MiB")
        return v

    @field_validator("env", "secrets")
    @classmethod
    def _env_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return v


class SandboxState(StrEnum):
    creating = "creating"
    running = "running"
    paused = "paused"
    stopped = "stopped"
    killed = "killed"
    failed = "failed"


class SecretInfo(BaseModel):
    """A secret as shown back to users: never its value."""

    hosts: list[str]
    placeholder: str | None = None


class SandboxInfo(BaseModel):
    id: str
    state: SandboxState
    runtime: str
    created_at: datetime
    expires_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None
    allow_net: list[str] = Field(default_factory=list)
    secrets: dict[str, SecretInfo] = Field(default_factory=dict)
    cpus: float | None = None
    memory: int | None = None
    pids: int | None = None
    disk: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    owner: str | None = None


class ExecRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cmd: list[str] | str
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None
    stdin: str | None = Field(default=None, description="text fed to stdin, then closed")
    background: bool = False

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, v: list[str] | str) -> list[str] | str:
        if not v:
            raise ValueError("cmd must not be empty")
        return v

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float | None:
        return _duration(v)


class ExecResult(BaseModel):
    exit_code: int | None = Field(description="null while a background command still runs")
    pid: int | None = Field(default=None, description="the command's pid inside the sandbox")
    stdout: str
    stderr: str
    truncated: bool = Field(default=False, description="output beyond 16 MiB per stream was "
                            "dropped from this result (use streaming exec for all of it)")
    signal: int | None = None
    timed_out: bool = False
    limit: str | None = Field(default=None, description="the sandbox limit that killed the command")
