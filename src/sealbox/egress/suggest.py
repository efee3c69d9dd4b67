"""`sealbox policy suggest`: the smallest allowlist that covers a sandbox's allowed traffic,
and what was blocked, read from its audit events (sans I/O)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_DEFAULT_PORTS = (80, 443)
_BLOCKED_KINDS = ("blocked", "dns_blocked", "secret_exfil_blocked", "tls_mismatch")


@dataclass
class Suggestion:
    allow_net: list[str] = field(default_factory=list)
    """Entries that let every allowed request of the log through again."""
    blocked: dict[str, int] = field(default_factory=dict)
    """Destination → how often it was blocked (not in the suggestion: widen by hand)."""


def _entry(event: dict[str, Any]) -> str | None:
    host = event.get("host")
    if not isinstance(host, str) or not host:
        return None
    port = event.get("port")
    if isinstance(port, int) and port not in _DEFAULT_PORTS:
        return f"{host}:{port}"
    return host


def suggest(events: Iterable[dict[str, Any]]) -> Suggestion:
    allowed: set[str] = set()
    blocked: dict[str, int] = {}
    for event in events:
        entry = _entry(event)
        if entry is None:
            continue
        if event.get("kind") == "allowed":
            allowed.add(entry)
        elif event.get("kind") in _BLOCKED_KINDS:
            blocked[entry] = blocked.get(entry, 0) + 1
    return Suggestion(sorted(allowed), dict(sorted(blocked.items())))
