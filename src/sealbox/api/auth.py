"""API keys: random ``sbk_`` tokens that the server keeps only as SHA-256 hashes.

Tenant keys live hashed in the engine's store. The admin key is ``SEALBOX_ADMIN_KEY`` when set,
otherwise one created on first start in ``DATA_DIR/admin.key`` (mode 0600); only its hash is
held in memory. The admin acts for every tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sealbox.engine.store import Store
from sealbox.errors import AuthError, ConfigError

KEY_PREFIX = "sbk_"
ADMIN_TENANT = "admin"
ADMIN_KEY_ENV = "SEALBOX_ADMIN_KEY"
ADMIN_KEY_FILE = "admin.key"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The KEY of an ``Authorization: Bearer KEY`` header, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool

    @property
    def owner(self) -> str | None:
        """The engine's tenant filter: None lets the admin see every tenant's sandboxes."""
        return None if self.admin else self.tenant


def load_admin_key(data_dir: Path) -> tuple[str, Path | None]:
    """The admin key's hash, and the file it was read from (None when it came from the env)."""
    env = os.environ.get(ADMIN_KEY_ENV)
    if env:
        return hash_key(env), None
    path = data_dir / ADMIN_KEY_FILE
    try:
        # O_EXCL: two servers starting at once on one data dir must not overwrite each other.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if not key:
            raise AuthError(f"{path} is empty: delete it to create a new admin key") from None
        return hash_key(key), path
    key = new_key()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return hash_key(key), path


class KeyRing:
    def __init__(self, store: Store, admin_hash: str) -> None:
        self._store = store
        self._admin_hash = admin_hash

    def authenticate(self, key: str | None) -> Caller:
        if not key:
            raise AuthError("missing API key: send the header `Authorization: Bearer KEY`")
        digest = hash_key(key)
        if hmac.compare_digest(digest, self._admin_hash):
            return Caller(ADMIN_TENANT, admin=True)
        # Looking a hash up by index reveals at most something about the SHA-256 of the guess,
        # never about a stored key, so this lookup is as safe as a constant-time comparison.
        found = self._store.find_key(digest)
        if found is None:
            raise AuthError("invalid API key")
        tenant, admin = found
        return Caller(tenant, admin)

    def create(self, tenant: str) -> str:
        """A new key for TENANT; returned once, stored only as its hash."""
        if tenant == ADMIN_TENANT:
            raise ConfigError(f"tenant name {ADMIN_TENANT!r} is reserved")
        key = new_key()
        self._store.add_key(hash_key(key), tenant, admin=False)
        return key
