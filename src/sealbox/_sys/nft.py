"""nftables through the `nft` command: whole rulesets applied atomically from a string."""

from __future__ import annotations

import re
import subprocess

NFT = "nft"
_TIMEOUT = 30


class NftError(OSError):
    """`nft` rejected a command; the message carries its stderr."""


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([NFT, *args], input=stdin, capture_output=True, text=True,
                              timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"cannot run {NFT}: {exc}") from exc


def apply(ruleset: str) -> None:
    """Apply RULESET with ``nft -f -``: one transaction, all of it or nothing."""
    done = _run(["-f", "-"], stdin=ruleset)
    if done.returncode != 0:
        raise NftError(f"nft -f failed: {done.stderr.strip()}")


def list_table(family: str, name: str) -> str | None:
    """The table as `nft list table` prints it, or None if it does not exist."""
    done = _run(["list", "table", family, name])
    if done.returncode != 0:
        if "No such file or directory" in done.stderr:
            return None
        raise NftError(f"nft list table {family} {name} failed: {done.stderr.strip()}")
    return done.stdout


def table_comment(listing: str) -> str | None:
    """The table-level ``comment "..."`` of a `list_table` output (the first line inside it)."""
    lines = listing.splitlines()
    if len(lines) < 2:
        return None
    found = re.fullmatch(r'\s*comment "(.*)"', lines[1])
    return found.group(1) if found else None


def delete_table(family: str, name: str) -> bool:
    """Delete a table; False if it did not exist. Atomic: `add` makes the delete never fail."""
    existed = list_table(family, name) is not None
    apply(f"table {family} {name}\ndelete table {family} {name}\n")
    return existed
