"""/workspace in and out of a sandbox as a tar stream, made and unpacked *inside* it.

The host never unpacks a sandbox's files: symlinks pointing outside, device files or names
with '..' are the sandbox's own tar's business, inside the sandbox's own mount namespace. The
host only stores the bytes, capped.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sealbox.errors import SandboxError
from sealbox.guest.client import GuestClient, Output

CHUNK = 1 << 20


async def save(guest: GuestClient, dest: Path, cap: int) -> int:
    """Write /workspace as a tar file to DEST; its size. SandboxError past CAP bytes.

    The sandbox runs on while its tar reads: a file that vanishes meanwhile is left out and
    one that changes is taken as tar read it (GNU tar's exit status 1), not a failure."""
    # The entries of /workspace, not "." itself: /workspace is the tier's mount point, whose
    # mode and times a sandbox user may not set (gVisor's tmpfs is root's).
    handle = await guest.exec(["/bin/sh", "-c", "cd /workspace && find . -mindepth 1 "
                               "-maxdepth 1 -print0 | tar --null -T - --numeric-owner "
                               "--ignore-failed-read -cf -"])
    size = 0
    err = bytearray()
    with open(dest, "wb") as f:
        async for item in handle:
            if not isinstance(item, Output):
                status = item
                break
            if item.stream == "stderr":
                err += item.data[: 4096 - len(err)]
                continue
            size += len(item.data)
            if size > cap:
                await handle.signal(9)
                await handle.wait()
                raise SandboxError(f"/workspace is larger than {cap >> 20} MiB: not saved")
            await asyncio.to_thread(f.write, item.data)
        else:
            raise SandboxError("tar ended without an exit status")
    if status.exit_code not in (0, 1):
        raise SandboxError(f"saving /workspace failed: {err.decode(errors='replace').strip()}")
    return size


async def restore(guest: GuestClient, tar: Path, clear: bool = False) -> None:
    """Unpack TAR into /workspace (emptied first if CLEAR)."""
    script = ("find /workspace -mindepth 1 -delete && " if clear else "") + \
        "exec tar -C /workspace --no-same-owner --no-overwrite-dir -xf -"
    handle = await guest.exec(["/bin/sh", "-c", script], stdin=True)
    with open(tar, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            await handle.write_stdin(chunk)
    await handle.close_stdin()
    _, err, status = await handle.collect()
    if status.exit_code != 0:
        text = err.decode(errors="replace").strip()
        full = "space" in text or "Wrote only" in text
        hint = " (it does not fit this sandbox's disk limit)" if full else ""
        raise SandboxError(f"filling /workspace failed{hint}: {text[-500:]}")
