"""The egress gateway: the sandbox's only network path.

    gateway    Gateway facade the engine calls (attach/detach/set_policy/audit_events)
    network    veth + host nftables plumbing (privileged calls live in sealbox._sys)
    proxy      per-sandbox listener; dispatch on the original destination; TLS peek
    http       HTTP/1.1 sessions (h11 both ways) with the policy hooks below
    policy     allowlist parsing and decisions          (sans-I/O)
    secrets    placeholders, substitution, redaction    (sans-I/O)
    dns        the DNS stub and synthetic addresses     (answer() is sans-I/O)
    resolver   upstream resolution and --resolve pins
    tls        installation CA, leaf certs, ClientHello parsing
    websocket  frame rewriting after an upgrade         (sans-I/O)
    audit      the per-sandbox audit log
"""

from sealbox.egress.gateway import Attachment, Gateway, GatewayConfig, ResolvePin
from sealbox.egress.secrets import SecretSpec

__all__ = ["Attachment", "Gateway", "GatewayConfig", "ResolvePin", "SecretSpec"]
