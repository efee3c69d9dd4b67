"""Upstream name resolution, done by the gateway (never by the sandbox).

Operator pins (``--resolve HOST:PORT:ADDR[:ADDRPORT]``) win and may point anywhere, loopback
included: they come from the operator, not the sandbox. Otherwise the system resolver answers,
and an address in a restricted range is refused unless the sandbox's policy names it
explicitly (DNS-rebinding defence).
"""

from __future__ import annotations

import asyncio
import re
import socket
from dataclasses import dataclass

from sealbox.egress.policy import IPAddress, Policy, normalize_name, parse_address
from sealbox.errors import ConfigError

RESOLVE_TIMEOUT = 5.0
_PIN = re.compile(r"^(?P<host>[^:\[\]]+):(?P<port>[0-9]+):(?P<addr>\[[^\]]+\]|[^:\[\]]+)"
                  r"(?::(?P<aport>[0-9]+))?$")


@dataclass(frozen=True)
class ResolvePin:
    host: str
    port: int
    addr: str
    addr_port: int | None = None

    @classmethod
    def parse(cls, text: str) -> ResolvePin:
        m = _PIN.match(text.strip())
        if m is None:
            raise ConfigError(f"--resolve {text!r}: expected HOST:PORT:ADDR[:ADDRPORT]")
        if parse_address(m["addr"]) is None:
            raise ConfigError(f"--resolve {text!r}: {m['addr']!r} is not an IP address")
        ports = [int(m["port"])] + ([int(m["aport"])] if m["aport"] else [])
        if not all(1 <= p <= 65535 for p in ports):
            raise ConfigError(f"--resolve {text!r}: ports must be from 1 to 65535")
        return cls(normalize_name(m["host"]), ports[0], str(parse_address(m["addr"])),
                   ports[1] if len(ports) > 1 else None)

    def __str__(self) -> str:
        addr = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{self.host}:{self.port}:{addr}" + (f":{self.addr_port}" if self.addr_port else "")


class ResolveError(Exception):
    """The name has no address the sandbox may reach (the reason is safe to show). BLOCKED:
    it resolved, but only to addresses the policy refuses."""

    def __init__(self, reason: str, blocked: bool = False) -> None:
        super().__init__(reason)
        self.blocked = blocked


class Resolver:
    def __init__(self, pins: list[ResolvePin]) -> None:
        self._pins = {(p.host, p.port): p for p in pins}

    def pinned(self, host: str, port: int) -> bool:
        return (host, port) in self._pins

    async def resolve(self, host: str, port: int, policy: Policy) -> tuple[IPAddress, int]:
        """Where to connect for HOST:PORT: a pin, else the first permitted system answer."""
        pin = self._pins.get((host, port))
        if pin is not None:
            addr = parse_address(pin.addr)
            if addr is not None:
                return addr, pin.addr_port or port
        try:
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise ResolveError(f"cannot resolve {host}") from exc
        reasons = []
        for info in infos:
            addr = parse_address(str(info[4][0]))
            if addr is None:
                continue
            decision = policy.check_address(addr, port, named=True)
            if decision.allowed:
                return addr, port
            reasons.append(decision.reason)
        raise ResolveError(f"{host} resolves to no permitted address"
                           + (f" ({reasons[0]})" if reasons else ""), blocked=bool(reasons))
