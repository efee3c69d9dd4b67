"""`Gateway`: the one object the engine uses. Per sandbox: a network link, a proxy listener and
a DNS stub on the link's host address, secrets with placeholders, an audit log, and the files
the sandbox sees (resolv.conf, CA bundle)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealbox._sys.threads import run_to_completion
from sealbox.egress.audit import RING_SIZE, AuditLog
from sealbox.egress.context import SandboxContext
from sealbox.egress.dns import DnsServer, NameMap, answer
from sealbox.egress.network import Link, Network
from sealbox.egress.policy import IPNetwork, Policy
from sealbox.egress.proxy import ProxyListener
from sealbox.egress.resolver import ResolvePin, Resolver
from sealbox.egress.secrets import SecretContext, SecretSpec
from sealbox.egress.tls import CertificateAuthority, upstream_context
from sealbox.errors import ConfigError, EgressError

SANDBOX_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE")
DNS_PORT = 53

__all__ = ["Attachment", "Gateway", "GatewayConfig", "ResolvePin"]


@dataclass
class GatewayConfig:
    data_dir: Path
    subnet: str = "10.77.0.0/16"
    proxy_port: int = 15001
    resolve: list[ResolvePin] = field(default_factory=list)
    upstream_ca: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Attachment:
    sandbox_id: str
    netns: str
    env: dict[str, str]
    ro_files: dict[str, Path]
    placeholders: dict[str, str]


@dataclass
class _Attached:
    link: Link
    ctx: SandboxContext
    listener: ProxyListener
    dns: DnsServer


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.network = Network(subnet=config.subnet, proxy_port=config.proxy_port,
                               dns_port=DNS_PORT)
        self._resolver = Resolver(list(config.resolve))
        self._tls: tuple[CertificateAuthority, ssl.SSLContext] | None = None
        self._attached: dict[str, _Attached] = {}
        self._log_dir = config.data_dir / "egress"

    def _restricted(self) -> tuple[IPNetwork, ...]:
        return (ipaddress.ip_network(self.config.subnet),)

    async def start(self) -> None:
        """Install the host firewall and make sure the CA exists."""
        await asyncio.to_thread(self.network.install)
        self._tls_ready()

    def _tls_ready(self) -> tuple[CertificateAuthority, ssl.SSLContext]:
        """The installation CA and the upstream verification context, made on first use."""
        if self._tls is None:
            self._tls = (CertificateAuthority(self.config.data_dir / "ca"),
                         upstream_context(list(self.config.upstream_ca)))
        return self._tls

    async def stop(self) -> None:
        for sandbox_id in list(self._attached):
            await self.detach(sandbox_id)

    async def attach(self, sandbox_id: str, netns: str, allow_net: list[str],
                     secrets: dict[str, SecretSpec], run_dir: Path,
                     placeholders: dict[str, str] | None = None) -> Attachment:
        """PLACEHOLDERS: reuse these for SECRETS (a sandbox restored with its memory)."""
        if sandbox_id in self._attached:
            raise EgressError(f"sandbox {sandbox_id} is already attached")
        # Validate everything before touching the host.
        policy = Policy.parse(allow_net, self._restricted())
        for name, spec in secrets.items():
            if not isinstance(spec, SecretSpec):
                raise ConfigError(f"secret {name!r} must be a SecretSpec")
        secret_ctx = SecretContext(secrets, placeholders)
        ca, upstream_tls = self._tls_ready()
        self._log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            link = await run_to_completion(self.network.attach, sandbox_id, netns)
        except asyncio.CancelledError:
            # The veth may exist by now: remove it here, not through the namespace's
            # deletion, which the kernel finishes asynchronously.
            await asyncio.to_thread(self.network.detach_id, sandbox_id)
            raise
        ctx = SandboxContext(
            sandbox_id=sandbox_id, host_ip=link.host_ip, policy=policy, secrets=secret_ctx,
            names=NameMap(),
            audit=AuditLog(sandbox_id, self._log_path(sandbox_id), scrub=secret_ctx.redact_text),
            resolver=self._resolver, ca=ca, upstream_tls=upstream_tls,
        )
        listener = ProxyListener(ctx)
        dns = DnsServer(lambda q: answer(q, ctx.policy, ctx.names, ctx.audit))
        self._attached[sandbox_id] = _Attached(link, ctx, listener, dns)
        try:
            await listener.start(str(link.host_ip), self.config.proxy_port)
            await dns.start(str(link.host_ip), DNS_PORT)
            ro_files = self._write_files(run_dir, link, ca)
        except BaseException:
            await self.detach(sandbox_id)
            raise
        return Attachment(
            sandbox_id=sandbox_id, netns=netns,
            env={**secret_ctx.placeholders, **{k: SANDBOX_BUNDLE for k in CA_ENV}},
            ro_files=ro_files, placeholders=secret_ctx.placeholders,
        )

    def _log_path(self, sandbox_id: str) -> Path:
        return self._log_dir / f"{sandbox_id}.jsonl"

    @staticmethod
    def _write_files(run_dir: Path, link: Link, ca: CertificateAuthority) -> dict[str, Path]:
        # World-readable: the runtime binds them into the sandbox as an unprivileged user.
        directory = run_dir / "egress"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        resolv = directory / "resolv.conf"
        resolv.write_text(f"nameserver {link.host_ip}\noptions ndots:0 attempts:2\n")
        bundle = directory / "ca-certificates.crt"
        ca.write_bundle(bundle)
        ca_pem = directory / "ca.pem"
        ca_pem.write_bytes(ca.cert_pem)
        for path in (resolv, bundle, ca_pem):
            path.chmod(0o644)
        return {"/etc/resolv.conf": resolv, SANDBOX_BUNDLE: bundle,
                "/run/sealbox/ca.pem": ca_pem}

    def check_policy(self, allow_net: list[str]) -> None:
        """Raise ConfigError if ALLOW_NET is not a valid allowlist (before anything is used)."""
        Policy.parse(allow_net, self._restricted())

    async def set_policy(self, sandbox_id: str, allow_net: list[str]) -> None:
        """Replace a sandbox's allowlist; its next DNS answer and next request use it."""
        policy = Policy.parse(allow_net, self._restricted())
        self._get(sandbox_id).ctx.policy = policy
        self._get(sandbox_id).ctx.audit.record("policy_changed", allow_net=list(allow_net))

    def bind_secrets(self, sandbox_id: str, secrets: dict[str, SecretSpec]) -> dict[str, str]:
        """Give an attached sandbox that has no secrets yet its secrets (a warm-pool member
        claimed by a caller): fresh placeholders, issued to this sandbox only. Returns them
        (name -> placeholder); the engine passes them into the sandbox's commands as env."""
        attached = self._get(sandbox_id)
        if attached.ctx.secrets:
            raise EgressError(f"sandbox {sandbox_id} already has secrets bound")
        for name, spec in secrets.items():
            if not isinstance(spec, SecretSpec):
                raise ConfigError(f"secret {name!r} must be a SecretSpec")
        ctx = SecretContext(secrets)
        # Redaction first, so no event can be logged with a value the old scrub does not know.
        attached.ctx.audit.set_scrub(ctx.redact_text)
        attached.ctx.secrets = ctx
        if ctx:
            attached.ctx.audit.record("secrets_bound", names=sorted(ctx.placeholders))
        return ctx.placeholders

    def _get(self, sandbox_id: str) -> _Attached:
        attached = self._attached.get(sandbox_id)
        if attached is None:
            raise EgressError(f"sandbox {sandbox_id} is not attached to the gateway")
        return attached

    def audit_events(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The sandbox's egress events; after it ended, the last ones from its log file."""
        attached = self._attached.get(sandbox_id)
        if attached is not None:
            return attached.ctx.audit.events()
        path = self._log_path(sandbox_id)
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()[-RING_SIZE:]
        return [json.loads(line) for line in lines if line.strip()]

    async def detach(self, sandbox_id: str) -> None:
        attached = self._attached.pop(sandbox_id, None)
        if attached is None:
            return
        attached.dns.close()
        await attached.listener.close()
        await asyncio.to_thread(self.network.detach, attached.link)

    def cleanup_orphans(self, live_ids: set[str]) -> list[str]:
        return self.network.cleanup_orphans(live_ids)
