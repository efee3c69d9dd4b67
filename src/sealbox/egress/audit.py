"""The egress audit log: every gateway decision for one sandbox, as structured events.

Events stay in a bounded in-memory ring and are appended as JSON lines to a file. Callers pass
names, hosts and paths with placeholders; as a second line of defence every string field goes
through ``scrub`` (the sandbox's redaction) so a real secret value cannot land here.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RING_SIZE = 2000


class AuditLog:
    def __init__(self, sandbox_id: str, path: Path | None = None,
                 scrub: Callable[[str], str] = lambda s: s, size: int = RING_SIZE) -> None:
        self.sandbox_id = sandbox_id
        self.path = path
        self._scrub = scrub
        self._ring: deque[dict[str, Any]] = deque(maxlen=size)

    def set_scrub(self, scrub: Callable[[str], str]) -> None:
        """Replace the redaction (secrets bound after attach bring new values to scrub)."""
        self._scrub = scrub

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        event: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(), "sandbox_id": self.sandbox_id, "kind": kind,
        }
        for key, value in fields.items():
            if value is not None:
                event[key] = self._scrub(value) if isinstance(value, str) else value
        self._ring.append(event)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(event, default=str) + "\n")
        return event

    def events(self) -> list[dict[str, Any]]:
        return list(self._ring)
