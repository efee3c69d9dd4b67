"""Placeholders, substitution scope, exfil blocking and redaction (sans-I/O)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from sealbox.egress.audit import AuditLog
from sealbox.egress.secrets import (
    BODY_LIMIT,
    SecretBlocked,
    SecretContext,
    SecretSpec,
)
from sealbox.errors import ConfigError

VALUE = "sk-live-0123456789abcdef"


def ctx(**scope: object) -> SecretContext:
    return SecretContext({"API_KEY": SecretSpec(value=VALUE, hosts=["api.test"], **scope)})


def placeholder(c: SecretContext, name: str = "API_KEY") -> bytes:
    return c.placeholders[name].encode()


def test_placeholders_are_recognisable_unique_and_per_sandbox() -> None:
    a, b = ctx(), ctx()
    for c in (a, b):
        assert re.fullmatch(r"sealbox-secret-[0-9a-f]{32}", c.placeholders["API_KEY"])
    assert a.placeholders != b.placeholders
    # B's placeholder is plain text to A: never substituted, never an exfil.
    rw = a.rewriter("api.test", 443, "GET", "/")
    assert rw.rewrite(b"Bearer " + placeholder(b), "header:authorization") == (
        b"Bearer " + placeholder(b))
    assert not rw.events


def test_spec_validation_and_repr_hide_the_value() -> None:
    spec = SecretSpec(value=VALUE, hosts=["api.test", "*.api.test:8443"], headers=["Authorization"],
                      methods=["get"])
    assert VALUE not in repr(spec) and VALUE not in str(spec.model_dump())
    assert spec.headers == ["authorization"] and spec.methods == ["GET"]
    for bad in ({"hosts": []}, {"hosts": ["*"]}, {"hosts": ["10.0.0.0/8"]}, {"hosts": ["*.com"]},
                {"hosts": ["a.test"], "path_prefixes": ["v1"]}, {"hosts": ["a.test"], "value": ""},
                {"hosts": ["a.test"], "headers": ["bad header"]}):
        with pytest.raises(ValidationError):
            SecretSpec(**{"value": VALUE, **bad})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="environment variable"):
        SecretContext({"BAD-NAME": spec})


def test_substitution_only_for_bound_hosts() -> None:
    c = ctx()
    rw = c.rewriter("api.test", 443, "POST", "/v1/x?key=" + placeholder(c).decode())
    assert rw.rewrite(b"Bearer " + placeholder(c), "header:authorization") == (
        b"Bearer " + VALUE.encode())
    assert rw.rewrite(b'{"k":"' + placeholder(c) + b'"}', "body") == (
        b'{"k":"' + VALUE.encode() + b'"}')
    assert [e.kind for e in rw.events] == ["secret_substituted"] * 2
    for host, port in (("evil.test", 443), ("api.test", 22), ("x.api.test", 443), (None, 443)):
        rw = c.rewriter(host, port, "GET", "/")
        with pytest.raises(SecretBlocked) as info:
            rw.rewrite(b"x" + placeholder(c), "body")
        assert info.value.kind == "secret_exfil_blocked" and info.value.secret == "API_KEY"
        assert VALUE not in str(info.value)


@pytest.mark.parametrize("scope,method,target,where,reason", [
    ({"headers": ["authorization"]}, "GET", "/", "header:x-api-key", "not allowed in"),
    ({"headers": ["authorization"]}, "GET", "/", "body", "not allowed in"),
    ({"methods": ["GET"]}, "DELETE", "/", "header:authorization", "method"),
    ({"path_prefixes": ["/v1/"]}, "GET", "/admin", "header:authorization", "path"),
    ({"path_prefixes": ["/v1/"]}, "GET", "/v1/../admin", "header:authorization", "path"),
    ({"path_prefixes": ["/v1/"]}, "GET", "/v1/%2e%2e/admin", "header:authorization", "path"),
    ({"expires_at": datetime.now(UTC) - timedelta(seconds=1)}, "GET", "/", "body", "expired"),
])
def test_out_of_scope_is_forwarded_unchanged(scope: dict[str, object], method: str, target: str,
                                            where: str, reason: str) -> None:
    c = ctx(**scope)
    rw = c.rewriter("api.test", 443, method, target)
    assert rw.rewrite(placeholder(c), where) == placeholder(c)
    assert rw.events[0].kind == "secret_out_of_scope" and reason in rw.events[0].reason


def test_in_scope_with_every_restriction() -> None:
    c = ctx(headers=["authorization"], methods=["GET"], path_prefixes=["/v1/"],
            expires_at=datetime.now() + timedelta(hours=1))
    rw = c.rewriter("api.test", 443, "get", "/v1/models?x=1")
    assert rw.rewrite(placeholder(c), "header:authorization") == VALUE.encode()


@given(st.binary(max_size=300), st.binary(max_size=300), st.lists(st.integers(1, 80), max_size=20))
def test_streaming_body_substitution_survives_any_split(pre: bytes, post: bytes,
                                                       cuts: list[int]) -> None:
    c = ctx()
    data = pre + placeholder(c) + post + placeholder(c)
    body = c.rewriter("api.test", 443, "POST", "/").body()
    out, pos = [], 0
    for cut in cuts:
        out.append(body.feed(data[pos:pos + cut]))
        pos += cut
    out.append(body.feed(data[pos:]))
    out.append(body.finish())
    assert b"".join(out) == pre + VALUE.encode() + post + VALUE.encode()


def test_streaming_exfil_is_caught_across_chunks() -> None:
    c = ctx()
    body = c.rewriter("evil.test", 443, "POST", "/").body()
    p = placeholder(c)
    assert p[:10] not in body.feed(b"a" * 100 + p[:10])
    with pytest.raises(SecretBlocked):
        body.feed(p[10:])


def test_length_fixed_bodies_refuse_placeholders() -> None:
    c = ctx()
    with pytest.raises(SecretBlocked, match=str(BODY_LIMIT)):
        c.rewriter("api.test", 443, "POST", "/").body(substitute=False).feed(placeholder(c))
    # Towards a host the secret is not bound to, it is an exfiltration attempt, and said so.
    with pytest.raises(SecretBlocked) as blocked:
        c.rewriter("evil.test", 443, "POST", "/").body(substitute=False).feed(placeholder(c))
    assert blocked.value.kind == "secret_exfil_blocked"


@given(st.binary(max_size=200), st.lists(st.integers(1, 30), max_size=20))
def test_redaction_survives_any_split(noise: bytes, cuts: list[int]) -> None:
    c = SecretContext({"A": SecretSpec(value=VALUE, hosts=["a.test"]),
                       "B": SecretSpec(value="short", hosts=["b.test"])})
    data = noise + VALUE.encode() + noise + b"short" + VALUE.encode()
    redactor, out, pos = c.redactor(), [], 0
    for cut in cuts:
        out.append(redactor.feed(data[pos:pos + cut]))
        pos += cut
    out.append(redactor.feed(data[pos:]))
    out.append(redactor.finish())
    result = b"".join(out)
    assert VALUE.encode() not in result and b"short" not in result.replace(noise, b"")
    assert result.count(placeholder(c, "A")) >= 2 and placeholder(c, "B") in result


def test_audit_log_scrubs_values_and_appends_json_lines(tmp_path: object) -> None:
    from pathlib import Path
    path = Path(str(tmp_path)) / "audit.jsonl"
    c = ctx()
    log = AuditLog("sb1", path, scrub=c.redact_text, size=2)
    log.record("blocked", reason=f"oops {VALUE}", host="api.test", port=443)
    log.record("allowed", host="api.test")
    log.record("allowed", host="api.test", bytes=3)
    assert len(log.events()) == 2
    text = path.read_text()
    assert VALUE not in text and c.placeholders["API_KEY"] in text
    assert len(text.splitlines()) == 3
