"""A per-sandbox lifecycle log (created, exec, ended) kept as JSON lines after the sandbox ends."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory

    def _path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.jsonl"

    def write(self, sandbox_id: str, kind: str, **fields: Any) -> None:
        line = json.dumps({"time": time.time(), "sandbox_id": sandbox_id, "kind": kind, **fields})
        with open(self._path(sandbox_id), "a") as f:
            f.write(line + "\n")

    def read(self, sandbox_id: str) -> list[dict[str, Any]]:
        try:
            lines = self._path(sandbox_id).read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]
