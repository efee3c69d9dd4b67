"""The allowlist parser and decisions (sans-I/O), the DNS stub's answers, the resolver."""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import RCODE, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from sealbox.egress.audit import AuditLog
from sealbox.egress.dns import NameMap, answer
from sealbox.egress.policy import Kind, Policy, parse_rule
from sealbox.egress.resolver import ResolveError, ResolvePin, Resolver
from sealbox.errors import ConfigError

ip = ipaddress.ip_address
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
TLD = st.from_regex(r"[a-z][a-z0-9]{1,6}", fullmatch=True)
NAME = st.builds(lambda labels, tld: ".".join([*labels, tld]),
                 st.lists(LABEL, min_size=1, max_size=3), TLD)
PORT = st.integers(1, 65535)


@given(NAME, st.one_of(st.none(), PORT))
def test_exact_names_round_trip(name: str, port: int | None) -> None:
    text = name if port is None else f"{name}:{port}"
    rule = parse_rule(text.upper())
    assert (rule.kind, rule.name, rule.port) == (Kind.NAME, name, port)
    assert rule.matches_name(name, port or 443)


@given(NAME, LABEL)
def test_wildcard_matches_subdomains_only(suffix: str, label: str) -> None:
    policy = Policy.parse([f"*.{suffix}"])
    assert policy.check_name(f"{label}.{suffix}", 443).allowed
    assert policy.check_name(f"a.{label}.{suffix}", 80).allowed
    assert not policy.check_name(suffix, 443).allowed
    assert not policy.check_name(f"{label}{suffix}", 443).allowed


@given(st.text(max_size=40))
def test_parser_never_crashes(text: str) -> None:
    try:
        parse_rule(text)
    except ConfigError as exc:
        assert exc.message


@pytest.mark.parametrize("entry,fragment", [
    ("*.com", "too broad"), ("*.*.com", "invalid label"), ("x*.example.com", "leading label"),
    ("a..b", "invalid label"), ("-a.com", "invalid label"), ("api.com:0", "port"),
    ("api.com:99999", "port"), ("api.com:http", "port must be a number"),
    ("10.0.0.0/33", "not a valid address"), ("", "empty"), ("!", "empty"),
    ("bücher.de", "punycode"), ("user@host.com", "not a host"), ("[::1", "missing ']'"),
])
def test_bad_entries_say_what_is_wrong(entry: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_rule(entry)


def test_a_single_string_is_not_a_list() -> None:
    with pytest.raises(ConfigError, match="list"):
        Policy.parse("api.example.com")  # type: ignore[arg-type]


def test_default_deny_and_default_ports() -> None:
    assert not Policy.parse([]).check_name("api.example.com", 443).allowed
    policy = Policy.parse(["api.example.com", "x.example.com:8443"])
    assert policy.check_name("api.example.com", 80).allowed
    assert policy.check_name("api.example.com", 443).allowed
    assert not policy.check_name("api.example.com", 22).allowed
    assert policy.check_name("x.example.com", 8443).allowed
    assert not policy.check_name("x.example.com", 443).allowed


def test_deny_before_allow_on_every_port() -> None:
    policy = Policy.parse(["*.example.com:8443", "*.example.com", "!secret.example.com"])
    assert policy.check_name("a.example.com", 8443).allowed
    for port in (80, 443, 8443):
        decision = policy.check_name("secret.example.com", port)
        assert not decision.allowed and "denied" in decision.reason


@pytest.mark.parametrize("addr", [
    "169.254.169.254", "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
    "224.0.0.251", "0.0.0.0", "198.18.0.5", "::1", "fe80::1", "fd00::1", "::ffff:10.0.0.1",
])
def test_open_egress_still_blocks_restricted_ranges(addr: str) -> None:
    policy = Policy.parse(["*"])
    assert not policy.check_address(ip(addr), 443).allowed
    assert not policy.check_address(ip(addr), 443, named=True).allowed


def test_open_egress_allows_public_addresses_and_explicit_ranges() -> None:
    policy = Policy.parse(["*"], restricted=[ipaddress.ip_network("10.77.0.0/16")])
    assert policy.check_address(ip("93.184.216.34"), 8080).allowed
    assert policy.check_name("anything.example", 25).allowed
    explicit = Policy.parse(["10.1.0.0/16:5432", "169.254.169.254"])
    assert explicit.check_address(ip("10.1.2.3"), 5432).allowed
    assert not explicit.check_address(ip("10.1.2.3"), 80).allowed
    assert explicit.check_address(ip("169.254.169.254"), 80).allowed
    # The sealbox subnet is restricted even though open egress is on.
    assert not Policy.parse(["*"], [ipaddress.ip_network("10.77.0.0/16")]).check_address(
        ip("10.77.0.1"), 80, named=True).allowed


def test_name_rules_do_not_open_addresses() -> None:
    policy = Policy.parse(["api.example.com"])
    assert not policy.check_address(ip("93.184.216.34"), 443).allowed
    assert policy.check_address(ip("93.184.216.34"), 443, named=True).allowed


# ----- DNS stub ---------------------------------------------------------------------------
def _ask(name: str, qtype: str, policy: Policy, names: NameMap, audit: AuditLog) -> DNSRecord:
    reply = answer(DNSRecord.question(name, qtype).pack(), policy, names, audit)
    assert reply is not None
    return DNSRecord.parse(reply)


def test_dns_answers_allowed_names_with_synthetic_addresses() -> None:
    policy = Policy.parse(["api.example.com", "*.svc.example.com"])
    names, audit = NameMap(), AuditLog("sb1")
    a = _ask("API.example.com.", "A", policy, names, audit)
    addr = ip(str(a.rr[0].rdata))
    assert addr in ipaddress.ip_network("198.18.0.0/15")
    assert names.name_for(addr) == "api.example.com"
    assert ip(str(_ask("api.example.com", "A", policy, names, audit).rr[0].rdata)) == addr
    other = _ask("x.svc.example.com", "A", policy, names, audit)
    assert ip(str(other.rr[0].rdata)) != addr
    aaaa = _ask("api.example.com", "AAAA", policy, names, audit)
    assert aaaa.header.rcode == RCODE.NOERROR and not aaaa.rr
    blocked = _ask("evil.example.net", "A", policy, names, audit)
    assert blocked.header.rcode == RCODE.NXDOMAIN and not blocked.rr
    kinds = [(e["kind"], e["host"]) for e in audit.events()]
    assert ("dns_query", "api.example.com") in kinds
    assert ("dns_blocked", "evil.example.net") in kinds


def test_dns_ignores_garbage() -> None:
    assert answer(b"\x00\x01garbage", Policy.parse(["*"]), NameMap(), AuditLog("sb")) is None


def test_name_map_recycles_least_recently_used() -> None:
    names = NameMap(ipaddress.IPv4Network("198.18.0.0/30"))  # two usable addresses
    a, b = names.address_for("a.test"), names.address_for("b.test")
    names.address_for("a.test")
    c = names.address_for("c.test")
    assert c == b and names.name_for(b) == "c.test" and names.name_for(a) == "a.test"


# ----- resolver ---------------------------------------------------------------------------
def test_resolve_pin_parsing() -> None:
    pin = ResolvePin.parse("API.test:443:127.0.0.1:8443")
    assert pin == ResolvePin("api.test", 443, "127.0.0.1", 8443)
    assert str(pin) == "api.test:443:127.0.0.1:8443"
    assert ResolvePin.parse("h.test:80:[::1]").addr == "::1"
    for bad in ("h.test:443", "h.test:x:1.2.3.4", "h.test:443:not-an-ip", "h.test:0:1.2.3.4",
                "h.test:443:1.2.3.4:70000"):
        with pytest.raises(ConfigError):
            ResolvePin.parse(bad)


async def test_pins_win_even_on_loopback_and_rebinding_is_refused() -> None:
    resolver = Resolver([ResolvePin.parse("api.test:443:127.0.0.1:9443")])
    policy = Policy.parse(["api.test", "localhost"])
    assert await resolver.resolve("api.test", 443, policy) == (ip("127.0.0.1"), 9443)
    # 'localhost' comes from /etc/hosts (no traffic): a name resolving to loopback is refused.
    with pytest.raises(ResolveError) as info:
        await resolver.resolve("localhost", 80, policy)
    assert info.value.blocked


def test_policy_suggestion_from_audit_events() -> None:
    from sealbox.egress.suggest import suggest

    events = [
        {"kind": "allowed", "host": "api.openai.com", "port": 443},
        {"kind": "allowed", "host": "api.openai.com", "port": 443},
        {"kind": "allowed", "host": "pypi.org", "port": 8443},
        {"kind": "dns_blocked", "host": "evil.example"},
        {"kind": "secret_exfil_blocked", "host": "paste.example", "port": 443},
        {"kind": "blocked", "host": "paste.example", "port": 443},
        {"kind": "dns_query", "host": "api.openai.com"},
        {"kind": "policy_changed", "allow_net": ["x"]},
    ]
    s = suggest(events)
    assert s.allow_net == ["api.openai.com", "pypi.org:8443"]
    assert s.blocked == {"evil.example": 1, "paste.example": 2}
