"""Every tier sealbox knows, their probes, and `auto` selection."""

from __future__ import annotations

from sealbox.errors import ConfigError, RuntimeUnavailable
from sealbox.runtimes.base import Probe, Runtime
from sealbox.runtimes.gvisor import GvisorRuntime
from sealbox.runtimes.microvm import MicrovmRuntime
from sealbox.runtimes.namespace import NamespaceRuntime

_RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> None:
    _RUNTIMES[runtime.name] = runtime


def names() -> list[str]:
    return list(_RUNTIMES)


def probes() -> dict[str, Probe]:
    return {name: rt.probe() for name, rt in _RUNTIMES.items()}


def get(name: str) -> Runtime:
    """The tier registered as NAME, whether or not it works here."""
    return _RUNTIMES[name]


def lookup(name: str) -> Runtime:
    """The tier NAME, or for "auto" the strongest that works here fully and fast (see
    `Probe.auto_skip`).
    An explicit tier that does not work fails with the probe's reason: never a silent downgrade."""
    if name == "auto":
        working = [rt for rt in _RUNTIMES.values() if rt.probe().ok]
        working = [rt for rt in working if not rt.probe().auto_skip] or working
        if not working:
            reasons = "; ".join(f"{n}: {p.detail}" for n, p in probes().items())
            raise RuntimeUnavailable(f"no isolation tier works on this host ({reasons})")
        return max(working, key=lambda rt: rt.strength)
    if name not in _RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}: choose one of auto, {', '.join(_RUNTIMES)}")
    rt = _RUNTIMES[name]
    probe = rt.probe()
    if not probe.ok:
        raise RuntimeUnavailable(f"runtime {name!r} does not work on this host: {probe.detail}")
    return rt


register(NamespaceRuntime())
register(GvisorRuntime())
register(MicrovmRuntime())
