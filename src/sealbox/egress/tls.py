"""TLS for the gateway: the installation CA, per-host leaf certificates, the upstream client
context, the sandbox's trust bundle, and a ClientHello reader (to learn SNI before deciding).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealbox.egress.policy import parse_address
from sealbox.errors import EgressError

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=30)
# The sandbox may speak h2 (egress/http2.py turns each stream into an HTTP/1.1 request);
# upstream connections are HTTP/1.1 only, so every request passes the same h11 hooks.
SANDBOX_ALPN = ["h2", "http/1.1"]
UPSTREAM_ALPN = ["http/1.1"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CertificateAuthority:
    """One CA per installation, in DIRECTORY (0700; key 0600), created on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert_path = directory / "ca.pem"
        key_path = directory / "ca.key"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        if not (self.cert_path.exists() and key_path.exists()):
            self._create(key_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise EgressError(f"cannot load the sealbox CA from {directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EgressError(f"the sealbox CA key in {directory} is not an EC key")
        self._key = key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: dict[str, ssl.SSLContext] = {}

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def _create(self, key_path: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = _name("sealbox egress CA")
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        pem_key = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem_key)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _leaf(self, host: str) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        ip = parse_address(host)
        san: x509.GeneralName = (x509.IPAddress(ip) if ip is not None else x509.DNSName(host))
        return (
            x509.CertificateBuilder().subject_name(_name(host[:64]))
            .issuer_name(self.cert.subject).public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server context presenting a leaf for HOST (a name or an address), cached."""
        ctx = self._contexts.get(host)
        if ctx is not None:
            return ctx
        leaf = self._leaf(host)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(SANDBOX_ALPN)
        # load_cert_chain only reads files: a private temp file, removed at once.
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".pem") as f:
            f.write(leaf.public_bytes(serialization.Encoding.PEM) + self.cert_pem)
            f.write(self._leaf_key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
            f.flush()
            ctx.load_cert_chain(f.name)
        self._contexts[host] = ctx
        return ctx

    def write_bundle(self, path: Path) -> None:
        """The sandbox's trust store: the system bundle plus this CA."""
        system = SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.is_file() else b""
        if system and not system.endswith(b"\n"):
            system += b"\n"
        path.write_bytes(system + self.cert_pem)


def upstream_context(extra_cas: list[Path]) -> ssl.SSLContext:
    """Verification for upstream TLS: the system trust store plus the operator's CAs."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(UPSTREAM_ALPN)
    for ca in extra_cas:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise EgressError(f"cannot load upstream CA {ca}: {exc}") from exc
    return ctx


# ----- ClientHello ------------------------------------------------------------------------
class NotTls(Exception):
    pass


@dataclass(frozen=True)
class ClientHello:
    sni: str | None


def is_tls_start(data: bytes) -> bool:
    """Does DATA start like a TLS handshake record?"""
    return len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the ClientHello at the start of DATA; None if more bytes are needed.
    Raises NotTls when DATA is not a TLS ClientHello."""
    handshake = b""
    pos = 0
    while True:  # the handshake message may span several records
        if len(data) < pos + 5:
            return None
        if data[pos] != 0x16 or data[pos + 1] != 0x03:
            raise NotTls("not a TLS handshake record")
        length = struct.unpack_from("!H", data, pos + 3)[0]
        if len(data) < pos + 5 + length:
            return None
        handshake += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 0x01:
                raise NotTls("first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= needed:
                return ClientHello(_sni(handshake[4:needed]))


def _sni(body: bytes) -> str | None:
    try:
        pos = 2 + 32  # version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + struct.unpack_from("!H", body, pos)[0]  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos >= len(body):
            return None
        end = pos + 2 + struct.unpack_from("!H", body, pos)[0]
        pos += 2
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, pos)
            pos += 4
            if ext_type == 0:  # server_name: list length, then (type, length, name)
                name_type, name_len = struct.unpack_from("!BH", body, pos + 2)
                if name_type == 0:
                    return body[pos + 5:pos + 5 + name_len].decode("ascii").lower()
            pos += ext_len
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise NotTls(f"malformed ClientHello: {exc}") from exc
    return None

