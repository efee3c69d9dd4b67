"""A shell loop counting in a file: whether a sandbox's processes lived on (pause, fork,
memory snapshots) shows as the count going on from where it was, not from 1."""

from __future__ import annotations

import tarfile
from pathlib import Path


def counter(directory: str = "/workspace") -> str:
    """Counts ten times a second into DIRECTORY/c; each value lands whole (written beside it,
    then renamed), so a freeze or a save never catches it half-written."""
    return (f"i=0; while :; do i=$((i+1)); echo $i > {directory}/c.new && "
            f"mv {directory}/c.new {directory}/c; sleep 0.1; done")


def until_counted(at_least: int = 5, directory: str = "/workspace") -> str:
    """Returns once the counter in DIRECTORY has reached AT_LEAST."""
    return (f"while [ ! -s {directory}/c ] || [ $(cat {directory}/c) -lt {at_least} ]; "
            "do sleep 0.1; done")


def counted_in(tar: Path) -> int:
    """The counter's value in TAR, the /workspace that a pause saved."""
    with tarfile.open(tar) as archive:
        member = archive.extractfile("./c")
        assert member is not None
        return int(member.read())
