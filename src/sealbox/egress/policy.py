"""The egress allowlist: which names, addresses and ports a sandbox may reach (sans-I/O).

Entry syntax (``allow_net`` and a secret's ``hosts``)::

    api.example.com         exact name, ports 80 and 443
    *.example.com           any name under example.com (not example.com itself)
    api.example.com:8443    one port only
    203.0.113.7, 203.0.113.0/24, [2001:db8::1]:443   addresses and networks
    *                       open egress (any public destination, any port)
    !internal.example.com   deny; deny rules are checked before allow rules

Default: deny. Addresses in private, loopback, link-local (cloud metadata), shared, multicast
and reserved ranges are refused unless an explicit address/network rule names them: a name
rule or ``*`` never opens them (DNS-rebinding defence).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from sealbox.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = frozenset({80, 443})
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_PORT_SUFFIX = re.compile(r"^(?P<host>.*?):(?P<port>[0-9]+)$")


class Kind(Enum):
    NAME = "name"
    SUFFIX = "suffix"
    NETWORK = "network"
    ANY = "any"


@dataclass(frozen=True)
class Rule:
    """One parsed entry. ``port`` None means the default ports (any port for ``*`` and for
    deny rules)."""

    text: str
    kind: Kind
    name: str = ""
    network: IPNetwork | None = None
    port: int | None = None
    deny: bool = False

    def port_ok(self, port: int | None) -> bool:
        if port is None or self.port == port:
            return True
        # Without a port: allow rules mean 80 and 443, deny rules and '*' every port.
        return self.port is None and (self.deny or self.kind is Kind.ANY
                                      or port in DEFAULT_PORTS)

    def matches_name(self, name: str, port: int | None) -> bool:
        """Whether NAME (normalised) on PORT (None: any port) falls under this rule."""
        if not self.port_ok(port):
            return False
        if self.kind is Kind.NAME:
            return name == self.name
        if self.kind is Kind.SUFFIX:
            return name.endswith("." + self.name)
        return self.kind is Kind.ANY

    def matches_address(self, ip: IPAddress, port: int | None) -> bool:
        """Only network rules name addresses; ``*`` is handled by `Policy` (public only)."""
        return self.network is not None and ip in self.network and self.port_ok(port)


def normalize_name(name: str) -> str:
    """Lowercase, no trailing dot; raise ConfigError unless NAME is a DNS name."""
    host = name.strip().lower().removesuffix(".")
    if not host:
        raise ConfigError("empty host name")
    if not host.isascii():
        raise ConfigError(f"host {name!r} is not ASCII: use its punycode (xn--) form")
    if len(host) > 253:
        raise ConfigError(f"host {name!r} is longer than 253 characters")
    for label in host.split("."):
        if not _LABEL.match(label):
            raise ConfigError(
                f"host {name!r} has an invalid label {label!r}: use letters, digits and "
                "hyphens, 1-63 characters, not starting or ending with a hyphen"
            )
    return host


def parse_address(text: str) -> IPAddress | None:
    """TEXT as an IP address (IPv6 may be bracketed), or None if it is not one."""
    try:
        return ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port or [v6]
        close = entry.find("]")
        if close < 0:
            raise ConfigError(f"{entry!r}: missing ']' after an IPv6 address")
        host, rest = entry[1:close], entry[close + 1:]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ConfigError(f"{entry!r}: expected ':PORT' after ']'")
        return host, _parse_port(entry, rest[1:])
    if entry.count(":") > 1:  # a bare IPv6 address or network never carries a port
        return entry, None
    m = _PORT_SUFFIX.match(entry)
    if m is None:
        if ":" in entry:
            raise ConfigError(f"{entry!r}: the port must be a number")
        return entry, None
    return m["host"], _parse_port(entry, m["port"])


def _parse_port(entry: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{entry!r}: port must be a number from 1 to 65535")
    return int(text)


def parse_rule(entry: str) -> Rule:
    """Parse one allowlist entry; ConfigError says what is wrong with a bad one."""
    if not isinstance(entry, str):
        raise ConfigError(f"allowlist entries are strings, got {type(entry).__name__}")
    text = entry.strip()
    deny = text.startswith("!")
    body = text.removeprefix("!").strip()
    if not body:
        raise ConfigError(f"empty allowlist entry {entry!r}")
    if any(c.isspace() for c in body) or "@" in body:
        raise ConfigError(f"{entry!r} is not a host, host:port, address or network")
    host, port = _split_port(body)
    if host == "*":
        return Rule(text, Kind.ANY, port=port, deny=deny)
    if "/" in host or parse_address(host) is not None:
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise ConfigError(f"{entry!r} is not a valid address or network") from None
        return Rule(text, Kind.NETWORK, network=network, port=port, deny=deny)
    if host.startswith("*."):
        suffix = normalize_name(host[2:])
        if "*" in suffix or suffix.count(".") < 1:
            raise ConfigError(
                f"{entry!r} is too broad: a wildcard needs at least two labels after it "
                "(e.g. *.example.com); use '*' for open egress"
            )
        return Rule(text, Kind.SUFFIX, name=suffix, port=port, deny=deny)
    if "*" in host:
        raise ConfigError(f"{entry!r}: '*' is only allowed as a whole leading label ('*.x.y')")
    return Rule(text, Kind.NAME, name=normalize_name(host), port=port, deny=deny)


def is_restricted(ip: IPAddress, extra: Iterable[IPNetwork] = ()) -> bool:
    """Private, loopback, link-local, shared, multicast, reserved, or in EXTRA."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast or any(ip in net for net in extra)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True)
class Policy:
    """A sandbox's parsed allowlist. ``restricted`` adds ranges (the sealbox subnet) to the
    built-in blocked classes."""

    rules: tuple[Rule, ...] = ()
    restricted: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str], restricted: Iterable[IPNetwork] = ()) -> Policy:
        if isinstance(entries, str):
            raise ConfigError("allow_net must be a list of entries, not one string")
        return cls(tuple(parse_rule(e) for e in entries), tuple(restricted))

    @property
    def open(self) -> bool:
        return any(r.kind is Kind.ANY and not r.deny for r in self.rules)

    def check_name(self, name: str, port: int | None) -> Decision:
        """May the sandbox reach NAME on PORT (None: on some port — the DNS question)?"""
        for rule in self.rules:
            if rule.deny and rule.matches_name(name, port):
                return Decision(False, f"denied by rule {rule.text!r}")
        for rule in self.rules:
            if not rule.deny and rule.matches_name(name, port):
                return Decision(True, f"allowed by rule {rule.text!r}")
        where = name if port is None else f"{name}:{port}"
        return Decision(False, f"{where} is not on the allowlist")

    def check_address(self, ip: IPAddress, port: int | None, *, named: bool = False) -> Decision:
        """May the sandbox reach IP on PORT? With NAMED, IP is what an allowed name resolved
        to: any public address is fine, a restricted one needs an explicit network rule."""
        for rule in self.rules:
            if rule.deny and (rule.matches_address(ip, port)
                              or (rule.kind is Kind.ANY and rule.port_ok(port))):
                return Decision(False, f"denied by rule {rule.text!r}")
        for rule in self.rules:
            if not rule.deny and rule.matches_address(ip, port):
                return Decision(True, f"allowed by rule {rule.text!r}")
        if is_restricted(ip, self.restricted):
            return Decision(False, f"{ip} is in a private, loopback, link-local or reserved range")
        if named or any(r.kind is Kind.ANY and not r.deny and r.port_ok(port) for r in self.rules):
            return Decision(True, "public address")
        return Decision(False, f"{ip}:{port} is not on the allowlist")
