"""The Gateway end to end: a real network namespace attached through `Gateway`, curl inside it
(its resolv.conf and CA bundle bound in with bubblewrap, as a sandbox sees them), the DNS stub,
transparent interception, TLS with the installation CA, and an HTTPS upstream on 127.0.0.1 in
the host namespace reached through a --resolve pin. Only .test names and loopback are used."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import upstream as fake_upstream

from sealbox._sys import netns
from sealbox.egress.gateway import Attachment, Gateway, GatewayConfig, ResolvePin
from sealbox.egress.secrets import SecretSpec
from sealbox.errors import ConfigError

VALUE = "sk-live-GATEWAY-e2e-0123456789"
pytestmark = pytest.mark.privileged


@dataclass
class Sandbox:
    gateway: Gateway
    attachment: Attachment
    ns: str
    upstream: fake_upstream.EchoServer

    async def curl(self, *args: str) -> tuple[int, str, str]:
        """curl inside the sandbox's namespace, seeing the files the sandbox would see."""
        binds: list[str] = []
        for inside, host in self.attachment.ro_files.items():
            if Path(inside).exists():
                binds += ["--ro-bind", str(host), inside]
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.ns, "bwrap", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", *binds, "--", "curl", "-sS", "--max-time", "10", "-D", "-",
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return proc.returncode or 0, out.decode(), err.decode()

    def events(self, kind: str) -> list[dict[str, object]]:
        return [e for e in self.gateway.audit_events(self.attachment.sandbox_id)
                if e["kind"] == kind]


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    ca = fake_upstream.TestCA.create(tmp_path)
    upstream = fake_upstream.EchoServer(tls=ca.server_context(tmp_path, ["api.test", "other.test"]))
    pins = [ResolvePin(h, 443, "127.0.0.1", upstream.port) for h in ("api.test", "other.test")]
    gateway = Gateway(GatewayConfig(data_dir=tmp_path / "data", resolve=pins,
                                    upstream_ca=[ca.cert_path]))
    sandbox_id = "sbgw" + secrets.token_hex(4)
    ns = "sealbox-" + sandbox_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    await asyncio.to_thread(netns.create, ns)  # pyroute2 runs its own event loop
    try:
        await gateway.start()
        attachment = await gateway.attach(
            sandbox_id, ns, ["api.test", "other.test"],
            {"API_KEY": SecretSpec(value=VALUE, hosts=["api.test"])}, run_dir)
        yield Sandbox(gateway, attachment, ns, upstream)
    finally:
        await gateway.stop()
        await asyncio.to_thread(netns.delete, ns)
        upstream.close()


async def test_attachment_shape(sandbox: Sandbox) -> None:
    a = sandbox.attachment
    placeholder = a.placeholders["API_KEY"]
    assert a.env["API_KEY"] == placeholder and VALUE not in json.dumps(a.env)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE"):
        assert a.env[var] == "/etc/ssl/certs/ca-certificates.crt"
    assert set(a.ro_files) == {"/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt",
                               "/run/sealbox/ca.pem"}
    ca_pem = a.ro_files["/run/sealbox/ca.pem"].read_bytes()
    assert ca_pem in a.ro_files["/etc/ssl/certs/ca-certificates.crt"].read_bytes()
    assert a.ro_files["/etc/resolv.conf"].read_text().startswith("nameserver 10.")
    for path in a.ro_files.values():
        assert VALUE not in path.read_text()
    ca_dir = sandbox.gateway.config.data_dir / "ca"
    assert ca_dir.stat().st_mode & 0o777 == 0o700
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600


async def test_curl_gets_substitution_and_never_sees_the_value(sandbox: Sandbox) -> None:
    placeholder = sandbox.attachment.placeholders["API_KEY"]
    code, out, err = await sandbox.curl("-H", f"Authorization: Bearer {placeholder}",
                                        "https://api.test/v1/models")
    assert code == 0, err
    headers = {k.lower(): v for k, v in sandbox.upstream.received[-1].headers.items()}
    assert headers["authorization"] == f"Bearer {VALUE}"
    # The upstream echoed the credential in a header and in its JSON body.
    assert VALUE not in out and out.count(placeholder) >= 2
    assert sandbox.events("dns_query") and sandbox.events("secret_substituted")


async def test_placeholder_to_another_allowed_host_is_blocked(sandbox: Sandbox) -> None:
    placeholder = sandbox.attachment.placeholders["API_KEY"]
    code, out, err = await sandbox.curl("-H", f"X-Key: {placeholder}", "https://other.test/")
    assert code == 0, err
    assert out.startswith("HTTP/2 403") and "x-sealbox-blocked: secret-exfil" in out.lower()
    assert not sandbox.upstream.received
    assert sandbox.events("secret_exfil_blocked")


async def test_names_off_the_allowlist_do_not_resolve(sandbox: Sandbox) -> None:
    code, _, err = await sandbox.curl("https://blocked.test/")
    assert code == 6, err  # curl: could not resolve host
    assert {e["host"] for e in sandbox.events("dns_blocked")} == {"blocked.test"}


async def test_policy_change_applies_to_the_next_request(sandbox: Sandbox) -> None:
    sid = sandbox.attachment.sandbox_id
    assert (await sandbox.curl("https://api.test/"))[1].startswith("HTTP/2 200")
    await sandbox.gateway.set_policy(sid, ["other.test"])
    code, _, _ = await sandbox.curl("https://api.test/")
    assert code == 6  # the DNS stub no longer answers for it
    with pytest.raises(ConfigError):
        await sandbox.gateway.set_policy(sid, ["*.com"])
    await sandbox.gateway.detach(sid)
    await sandbox.gateway.detach(sid)  # idempotent
    # After detach the events come from the log file.
    assert any(e["kind"] == "policy_changed" for e in sandbox.gateway.audit_events(sid))


async def test_bad_secret_names_are_rejected_before_anything_is_set_up(tmp_path: Path) -> None:
    gateway = Gateway(GatewayConfig(data_dir=tmp_path))
    with pytest.raises(ConfigError, match="environment variable"):
        await gateway.attach("sbbad", "sealbox-none", [], {
            "NOT-VALID": SecretSpec(value="x", hosts=["api.test"])}, tmp_path)
    with pytest.raises(ConfigError, match="too broad"):
        await gateway.attach("sbbad", "sealbox-none", ["*.test"], {}, tmp_path)
