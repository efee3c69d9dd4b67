"""Lower parts never import higher ones; privileged calls stay in `sealbox._sys`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "sealbox"
# part -> parts it may import (besides itself, errors and _sys)
ALLOWED = {
    "guest": set(),
    "runtimes": {"guest"},
    "egress": set(),
    "engine": {"runtimes", "egress", "guest"},
    "api": {"engine", "runtimes", "egress", "guest"},
    "sdk": {"engine", "runtimes", "egress", "guest"},
    "cli": {"sdk", "api", "engine", "runtimes", "egress", "guest"},
}
PRIVILEGED_MODULES = {"pyroute2", "ctypes"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "_sys" not in p.parts)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_layering(path: Path) -> None:
    rel = path.relative_to(SRC)
    part = rel.parts[0] if len(rel.parts) > 1 else None
    for name in imports(path):
        top = name.split(".")[0]
        assert top not in PRIVILEGED_MODULES, f"{rel} imports {name}: move it into sealbox._sys"
        if part is None or not name.startswith("sealbox."):
            continue
        target = name.split(".")[1]
        if target in ("errors", "_sys", part):
            continue
        assert target in ALLOWED[part], f"{rel} ({part}) must not import {name}"


def test_agent_is_standard_library_only() -> None:
    agent = SRC / "guest" / "agent.py"
    for name in imports(agent):
        assert not name.startswith("sealbox") or name in ("sealbox.guest", "sealbox.guest.protocol"), name
        assert name.split(".")[0] not in {"pydantic", "httpx", "h11", "anyio"}, name
