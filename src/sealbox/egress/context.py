"""Everything the gateway knows about one attached sandbox, in one place for the proxy."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from sealbox.egress.audit import AuditLog
from sealbox.egress.dns import NameMap
from sealbox.egress.policy import IPAddress, Policy
from sealbox.egress.resolver import Resolver
from sealbox.egress.secrets import SecretContext
from sealbox.egress.tls import CertificateAuthority


@dataclass
class SandboxContext:
    sandbox_id: str
    host_ip: IPAddress
    policy: Policy  # replaced whole by set_policy; every request reads the current one
    secrets: SecretContext
    names: NameMap
    audit: AuditLog
    resolver: Resolver
    ca: CertificateAuthority
    upstream_tls: ssl.SSLContext
