"""Secrets: placeholders in, real values out only where they are bound (sans-I/O).

A sandbox sees ``sealbox-secret-<32 hex>`` for each secret. `SecretContext` is one sandbox's
view: it knows only its own placeholders, so another sandbox's placeholder is plain text here.
For a request to an upstream the gateway connects to, `RequestRewriter` swaps a placeholder
for its value when the upstream is one of the secret's hosts and the request is in scope,
leaves it when out of scope, and raises `SecretBlocked` when the upstream is not a bound host.
`SecretContext.redactor` turns real values in responses back into placeholders, across chunk boundaries.
"""

from __future__ import annotations

import re
import secrets as pyrandom
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from sealbox.egress.policy import Kind, Rule, parse_rule
from sealbox.errors import ConfigError

PLACEHOLDER_PREFIX = "sealbox-secret-"
PLACEHOLDER_RE = re.compile(rb"sealbox-secret-[0-9a-f]{32}")
BODY_LIMIT = 1 << 20
"""Request bodies up to this size are buffered, rewritten and get a fixed Content-Length."""
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def new_placeholder() -> str:
    return PLACEHOLDER_PREFIX + pyrandom.token_hex(16)


def check_env_name(name: str) -> None:
    if not _ENV_NAME.match(name):
        raise ConfigError(f"secret name {name!r} is not a valid environment variable name")


class SecretSpec(BaseModel):
    """A credential and where it may go. Never serialised with its value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: SecretStr = Field(min_length=1)
    hosts: list[str] = Field(min_length=1)
    headers: list[str] | None = None
    methods: list[str] | None = None
    path_prefixes: list[str] | None = None
    expires_at: datetime | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            try:
                rule = parse_rule(host)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
            if rule.deny or rule.kind not in (Kind.NAME, Kind.SUFFIX):
                raise ValueError(f"secret host {host!r} must be a name or *.suffix, "
                                 "optionally with :PORT")
        return hosts

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: list[str] | None) -> list[str] | None:
        for h in headers or ():
            if not _TOKEN.match(h):
                raise ValueError(f"{h!r} is not a valid header name")
        return None if headers is None else [h.lower() for h in headers]

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str] | None) -> list[str] | None:
        for m in methods or ():
            if not _TOKEN.match(m):
                raise ValueError(f"{m!r} is not a valid HTTP method")
        return None if methods is None else [m.upper() for m in methods]

    @field_validator("path_prefixes")
    @classmethod
    def _paths(cls, prefixes: list[str] | None) -> list[str] | None:
        for p in prefixes or ():
            if not p.startswith("/"):
                raise ValueError(f"path prefix {p!r} must start with '/'")
        return prefixes

    @field_validator("expires_at")
    @classmethod
    def _expiry(cls, when: datetime | None) -> datetime | None:
        # A naive time is taken as UTC so comparisons never raise later.
        return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when


@dataclass(frozen=True)
class Binding:
    name: str
    placeholder: bytes
    value: bytes
    rules: tuple[Rule, ...]
    spec: SecretSpec

    def bound_to(self, host: str | None, port: int) -> bool:
        return host is not None and any(r.matches_name(host, port) for r in self.rules)


class SecretBlocked(Exception):
    """A placeholder in a request the gateway must not forward. Carries names, never values."""

    def __init__(self, kind: str, secret: str, where: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.secret = secret
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class SecretEvent:
    kind: str  # secret_substituted | secret_out_of_scope
    secret: str
    where: str
    reason: str = ""


class SecretContext:
    """One sandbox's secrets: placeholders issued to it, and the real values (memory only)."""

    def __init__(self, specs: dict[str, SecretSpec],
                 placeholders: dict[str, str] | None = None) -> None:
        """PLACEHOLDERS: those issued before (a sandbox restored with its memory still holds
        them); new ones otherwise."""
        self._by_placeholder: dict[bytes, Binding] = {}
        for name, spec in specs.items():
            check_env_name(name)
            placeholder = (placeholders or {}).get(name) or new_placeholder()
            self._by_placeholder[placeholder.encode()] = Binding(
                name, placeholder.encode(), spec.value.get_secret_value().encode(),
                tuple(parse_rule(h) for h in spec.hosts), spec,
            )
        values = sorted({b.value for b in self._by_placeholder.values()}, key=len, reverse=True)
        self._value_re = re.compile(b"|".join(re.escape(v) for v in values)) if values else None
        self._to_placeholder = {b.value: b.placeholder for b in self._by_placeholder.values()}

    @property
    def placeholders(self) -> dict[str, str]:
        return {b.name: b.placeholder.decode() for b in self._by_placeholder.values()}

    def __bool__(self) -> bool:
        return bool(self._by_placeholder)

    def binds(self, host: str | None, port: int) -> bool:
        """Whether any secret is bound to HOST:PORT (its responses may echo a value)."""
        return any(b.bound_to(host, port) for b in self._by_placeholder.values())

    @property
    def own_placeholders(self) -> list[bytes]:
        return list(self._by_placeholder)

    def lookup(self, placeholder: bytes) -> Binding | None:
        return self._by_placeholder.get(placeholder)

    def redact(self, data: bytes) -> bytes:
        if self._value_re is None:
            return data
        return self._value_re.sub(lambda m: self._to_placeholder[m.group()], data)

    def redact_text(self, text: str) -> str:
        return self.redact(text.encode()).decode(errors="replace") if self else text

    def redactor(self) -> StreamReplacer:
        """Streaming redaction of a response body: each real value becomes its placeholder."""
        return StreamReplacer(self._to_placeholder, lambda m: self._to_placeholder[m])

    def rewriter(self, host: str | None, port: int, method: str, target: str,
                 now: datetime | None = None) -> RequestRewriter:
        return RequestRewriter(self, host, port, method.upper(), target,
                               now or datetime.now(UTC))


def _path_of(target: str) -> str:
    path = target.split("?", 1)[0].split("#", 1)[0]
    # Dot segments (also percent-encoded) would let "/allowed/../admin" pass a prefix check.
    segments = unquote(path).replace("\\", "/").split("/")
    return "" if any(s in (".", "..") for s in segments) else path


@dataclass
class RequestRewriter:
    """Substitution for one request to HOST:PORT (the upstream the gateway connects to)."""

    ctx: SecretContext
    host: str | None
    port: int
    method: str
    target: str
    now: datetime
    events: list[SecretEvent] = field(default_factory=list)

    def decide(self, binding: Binding, where: str) -> bytes:
        if not binding.bound_to(self.host, self.port):
            dest = f"{self.host}:{self.port}" if self.host else f"an address on port {self.port}"
            raise SecretBlocked("secret_exfil_blocked", binding.name, where,
                                f"secret {binding.name} is not bound to {dest}")
        spec = binding.spec
        reason = ""
        if spec.expires_at is not None and self.now >= spec.expires_at:
            reason = "expired"
        elif spec.methods is not None and self.method not in spec.methods:
            reason = f"method {self.method} not allowed"
        elif spec.path_prefixes is not None and not any(
                (path := _path_of(self.target)) and path.startswith(p)
                for p in spec.path_prefixes):
            reason = "path not allowed"
        elif spec.headers is not None and where.removeprefix("header:") not in spec.headers:
            reason = f"not allowed in {where}"
        if reason:
            self.events.append(SecretEvent("secret_out_of_scope", binding.name, where, reason))
            return binding.placeholder
        self.events.append(SecretEvent("secret_substituted", binding.name, where))
        return binding.value

    def rewrite(self, data: bytes, where: str) -> bytes:
        """DATA with each of this sandbox's placeholders decided. WHERE: "target",
        "header:<lowercase name>" or "body"."""
        def sub(m: re.Match[bytes]) -> bytes:
            binding = self.ctx.lookup(m.group())
            return m.group() if binding is None else self.decide(binding, where)
        return PLACEHOLDER_RE.sub(sub, data)

    def body(self, substitute: bool = True) -> StreamReplacer:
        """Streaming substitution for the request body. Without SUBSTITUTE (a body whose
        length cannot change), any placeholder of this sandbox is refused."""
        def replace(match: bytes) -> bytes:
            binding = self.ctx.lookup(match)
            if binding is None:
                return match
            if not substitute:
                if not binding.bound_to(self.host, self.port):
                    self.decide(binding, "body")  # raises: an exfiltration attempt, said so
                raise SecretBlocked("blocked", binding.name, "body",
                                    f"placeholder for {binding.name} in a request body over "
                                    f"{BODY_LIMIT} bytes")
            return self.decide(binding, "body")
        # Only this sandbox's placeholders matter: any other is plain text here.
        return StreamReplacer(self.ctx.own_placeholders, replace)


class StreamReplacer:
    """Replaces occurrences of TARGETS in a byte stream. A tail that could be the start of a
    target split across chunks is held back, and only such a tail, so a streamed response
    is not delayed by more than it must be."""

    def __init__(self, targets: Collection[bytes], replace: Callable[[bytes], bytes]) -> None:
        self._targets = sorted(targets, key=len, reverse=True)
        self._pattern = (re.compile(b"|".join(re.escape(t) for t in self._targets))
                         if self._targets else None)
        # Where a held-back tail could begin: only at a byte some target starts with.
        self._starts = (re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in
                                                   {t[0] for t in self._targets if t}) + b"]")
                        if self._targets else None)
        self._replace = replace
        self._tail = b""

    def _partial(self, buf: bytes, start: int) -> int:
        """Length of the longest suffix of BUF[START:] that a target starts with."""
        if self._starts is None:
            return 0
        longest = len(self._targets[0]) - 1
        for m in self._starts.finditer(buf, max(start, len(buf) - longest)):
            suffix = buf[m.start():]
            if any(t.startswith(suffix) for t in self._targets):
                return len(suffix)
        return 0

    def feed(self, data: bytes) -> bytes:
        if self._pattern is None:
            return data
        buf = self._tail + data
        out: list[bytes] = []
        pos = 0
        for m in self._pattern.finditer(buf):
            out.append(buf[pos:m.start()])
            out.append(self._replace(m.group()))
            pos = m.end()
        cut = len(buf) - self._partial(buf, pos)
        out.append(buf[pos:cut])
        self._tail = buf[cut:]
        return b"".join(out)

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail
