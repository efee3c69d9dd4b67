"""Human sizes and durations ("4GiB", "30m") as used by the CLI, SDK and API."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from sealbox.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: str | int) -> int:
    """Bytes from 512, "512MiB", "4GiB", "1.5G". Raises ConfigError on anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"size must be positive, got {value}")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"cannot read size {value!r}: use a number of bytes or e.g. 512MiB, 4GiB")
    unit = (m.group(2) or "").lower()
    size = int(float(m.group(1)) * _SIZE_FACTORS[unit])
    if size <= 0:
        raise ConfigError(f"size must be positive, got {value!r}")
    return size


def parse_duration(value: str | float) -> float:
    """Seconds from 90, 1.5, "30m", "1h30m", "10s", "250ms". Raises ConfigError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"duration must be positive, got {value}")
        return float(value)
    text = str(value).strip().lower()
    try:
        return parse_duration(float(text))
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_FACTORS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text or total <= 0:
        raise ConfigError(f"cannot read duration {value!r}: use seconds or e.g. 30s, 10m, 1h30m")
    return total


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


V = TypeVar("V")
T = TypeVar("T")


def checked(check: Callable[[V], T], value: V) -> T:
    """CHECK(VALUE) inside a pydantic validator: a ConfigError becomes the ValueError that
    pydantic reports against the field (so the message names it)."""
    try:
        return check(value)
    except ConfigError as exc:
        raise ValueError(exc.message) from None
