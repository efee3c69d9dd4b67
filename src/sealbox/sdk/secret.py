"""`Secret(value, hosts=[...])`: how SDK users hand a credential to the gateway."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import SecretStr

from sealbox.egress.secrets import SecretSpec


class Secret(SecretSpec):
    """A credential the sandbox never sees. Inside, its env var holds a placeholder that the
    gateway swaps for VALUE only on requests to HOSTS (optionally only in HEADERS, for METHODS,
    under PATH_PREFIXES, until EXPIRES_AT)."""

    def __init__(self, value: str, hosts: Sequence[str], *, headers: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None,
                 path_prefixes: Sequence[str] | None = None,
                 expires_at: datetime | None = None) -> None:
        super().__init__(
            value=SecretStr(value), hosts=list(hosts),
            headers=list(headers) if headers is not None else None,
            methods=list(methods) if methods is not None else None,
            path_prefixes=list(path_prefixes) if path_prefixes is not None else None,
            expires_at=expires_at,
        )
