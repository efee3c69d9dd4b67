"""Encryption at rest for what the engine must keep of secret values (a paused sandbox's
spec, so it can be booted again after a restart): Fernet (AES-128-CBC + HMAC-SHA256) under
one installation key, ``DATA/secrets.key`` (0600), created on first use.

The key lives next to what it protects, like the CA key: this keeps values out of backups,
copies of the state database and accidental `cat`s, not away from root on this host.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from sealbox.errors import SandboxError

KEY_NAME = "secrets.key"


def _key(data_dir: Path) -> bytes:
    path = data_dir / KEY_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def seal(data_dir: Path, plain: bytes) -> bytes:
    return Fernet(_key(data_dir)).encrypt(plain)


def unseal(data_dir: Path, token: bytes) -> bytes:
    try:
        return Fernet(_key(data_dir)).decrypt(token)
    except (InvalidToken, ValueError):
        raise SandboxError(
            f"saved sandbox state cannot be decrypted with {data_dir / KEY_NAME}: the key "
            "changed or the file is damaged; kill the sandbox and create it again") from None
