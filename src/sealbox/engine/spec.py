"""What a user asks for (``SandboxSpec``) and what they get back (``SandboxInfo``)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sealbox.egress.secrets import SecretSpec
from sealbox.engine.units import checked, parse_duration, parse_size
from sealbox.errors import ConfigError

RuntimeName = Literal["auto", "namespace", "gvisor", "microvm"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_TIMEOUT = 1800.0


def _duration(v: Any) -> float | None:
    return None if v is None else checked(parse_duration, v)


VOLUME_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_VOLUME_NAME = re.compile(VOLUME_NAME)
# Where a volume may not be mounted: the tier's own mounts, system directories shown read-only,
# and the agent's directory. Anything under them is refused too.
RESERVED_PATHS = ("/proc", "/dev", "/sys", "/.sealbox", "/etc", "/usr", "/bin", "/sbin", "/lib",
                  "/lib32", "/lib64", "/libx32", "/opt", "/run", "/boot", "/var/run")


def check_volume_name(name: str) -> str:
    if not _VOLUME_NAME.match(name):
        raise ConfigError(f"volume name {name!r} is invalid: use 1-63 lowercase letters, digits, "
                          "'-' or '_', starting with a letter or digit")
    return name


def check_mount_path(path: str) -> str:
    if not path.startswith("/"):
        raise ConfigError(f"mount path {path!r} must be absolute")
    parts = path.split("/")
    if any(p in (".", "..") for p in parts) or "\0" in path or len(path) > 1024:
        raise ConfigError(f"mount path {path!r} must not contain '.' or '..' components")
    norm = "/" + "/".join(p for p in parts if p)
    if norm in ("/", "/workspace", "/tmp", "/var/tmp", "/var", "/home"):
        raise ConfigError(f"cannot mount a volume at {norm}: use a subdirectory such as "
                          f"{norm.rstrip('/')}/data")
    for reserved in RESERVED_PATHS:
        if norm == reserved or norm.startswith(reserved + "/"):
            raise ConfigError(f"cannot mount a volume at {norm}: {reserved} belongs to the sandbox")
    return norm


class VolumeMount(BaseModel):
    """A named volume shown inside the sandbox at ``path``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    read_only: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return checked(check_volume_name, v)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return checked(check_mount_path, v)

    @classmethod
    def parse(cls, text: str) -> VolumeMount:
        """NAME:/path[:ro|:rw] as the CLI takes it."""
        name, sep, rest = text.partition(":")
        path, mode = rest, "rw"
        if rest.endswith((":ro", ":rw")):
            path, mode = rest[:-3], rest[-2:]
        if not sep or not name or not path:
            raise ConfigError(f"--volume {text!r}: use NAME:/path or NAME:/path:ro")
        try:
            return cls(name=name, path=path, read_only=mode == "ro")
        except ValidationError as exc:
            msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"--volume {text!r}: {msg}") from None


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
    volumes: list[VolumeMount] = Field(default_factory=list,
                                       description="named volumes to mount (see /v1/volumes)")
    template: str | None = Field(default=None, description="template name (see /v1/templates);"
                                 " null = the host's system dirs")

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float | None:
        return _duration(v)

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: list[VolumeMount]) -> list[VolumeMount]:
        names: set[str] = set()
        paths: set[str] = set()
        for m in v:
            if m.name in names:
                raise ValueError(f"volume {m.name!r} is mounted twice")
            for p in paths:
                if m.path == p or m.path.startswith(p + "/") or p.startswith(m.path + "/"):
                    raise ValueError(f"volume paths {p} and {m.path} overlap")
            names.add(m.name)
            paths.add(m.path)
        return v

    @field_validator("memory", "disk", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | None:
        return None if v is None else checked(parse_size, v)

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
    volumes: list[VolumeMount] = Field(default_factory=list)
    template: str | None = None
    paused_at: datetime | None = None
    resumed_processes: bool | None = Field(
        default=None, description="after the last resume: whether processes and memory came "
        "back (false: only the files saved at pause did; see resume_note)")
    resume_note: str | None = None


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
