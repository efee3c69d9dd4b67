"""A template build whose owner process is SIGKILLed midway, and the engine started after it:
what reconcile must clean up after a crash."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sealbox.engine.config import EngineConfig
from sealbox.engine.engine import Engine
from sealbox.engine.templates import TemplateSpec

_OWNER = (
    "import asyncio, sys; from pathlib import Path; "
    "from sealbox.egress.gateway import ResolvePin; "
    "from sealbox.engine.config import EngineConfig; from sealbox.engine.engine import Engine; "
    "from sealbox.engine.templates import TemplateSpec\n"
    "async def main():\n"
    "    e = Engine(EngineConfig(data_dir=Path(sys.argv[1]), "
    "resolve=[ResolvePin.parse(p) for p in sys.argv[3:]]))\n"
    "    await e.build_template(TemplateSpec.model_validate_json(sys.argv[2]))\n"
    "asyncio.run(main())\n")


def kill_build_owner(data: Path, spec: TemplateSpec, log_marker: str,
                     before_kill: Callable[[str], None], pins: Sequence[str] = ()) -> str:
    """Build SPEC in a process of its own on DATA; once its log shows LOG_MARKER, call
    BEFORE_KILL(build sandbox id), SIGKILL the process, and start an engine on DATA: the build
    must be recorded as killed, its template absent, its build dir gone. Returns the id."""
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, str(data),
                             spec.model_dump_json(), *pins])
    log_dir = data / "templates" / "logs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(log_dir.glob("*.log")) if log_dir.is_dir() else []
        if logs and log_marker in logs[0].read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the build process ended early"
    build_ids = [p.name.removeprefix(".build-") for p in (data / "templates").glob(".build-*")]
    assert len(build_ids) == 1
    sid = build_ids[0]
    before_kill(sid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    async def restart() -> None:
        eng = Engine(EngineConfig(data_dir=data))
        await eng.start()
        try:
            assert eng.get(sid).state.value == "killed"
            assert not eng.templates.exists(spec.name)
        finally:
            await eng.close()

    asyncio.run(restart())
    assert not list((data / "templates").glob(".build-*"))
    return sid
