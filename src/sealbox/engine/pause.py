"""What a paused sandbox keeps so it survives its owner (a server) dying.

On a tier that can checkpoint (microvm: QEMU saves the whole VM to a file), pause saves the
sandbox there and frees everything it held on the host: memory, processes, network. Resume,
by the same server or any later one, restores the same processes with their memory.

Elsewhere a paused sandbox is frozen in place while its owner lives (cgroup freezer / `runsc
pause`): processes and memory come back exactly on resume. Those tiers cannot save processes
to disk (no CRIU; runsc refuses to checkpoint with host networking, the only networking runsc
2022 has on this kernel), so at pause the engine also saves what can outlive the processes:
the files under /workspace (a tar made by the sandbox itself, through its agent) and what it
takes to boot the sandbox again (spec, secrets). If the owner dies, resume boots a fresh
sandbox with the same id, policy, limits, volumes and those files, and says that processes were
not restored. A checkpointing tier saves the files too: if its checkpoint cannot be restored
(the host's QEMU or kernel changed meanwhile), resume falls back to them.

Layout: ``DATA/paused/ID/`` (0700): ``workspace.tar``, ``checkpoint/`` (the tier's), and
``resume.json`` (0600, encrypted with the installation key, see `sealing`: it holds secret
values, placeholders and env; removed when the sandbox resumes or ends).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sealbox.engine import workspace_tar
from sealbox.engine.sealing import seal, unseal
from sealbox.engine.spec import SandboxInfo, SandboxSpec
from sealbox.errors import SandboxError
from sealbox.guest.client import GuestClient

TAR_NAME = "workspace.tar"
SPEC_NAME = "resume.json"
CHECKPOINT_NAME = "checkpoint"
UNLIMITED_SAVE = 16 * 1024**3
"""Most bytes a pause saves for a sandbox with no disk limit (the host's disk is not theirs)."""
LOST_PROCESSES = ("the server restarted while the sandbox was paused: its processes and memory "
                  "were lost; /workspace was restored from the files saved at pause")


@dataclass(frozen=True)
class Saved:
    spec: SandboxSpec
    """What the caller asked for, with secret values."""
    remaining: float | None
    """Seconds of the timeout left at pause."""
    placeholders: dict[str, str]
    """Secret name -> the placeholder the sandbox holds (a restored memory still has them)."""


class PausedState:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "paused"

    def dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def exists(self, sandbox_id: str) -> bool:
        return (self.dir(sandbox_id) / SPEC_NAME).is_file()

    def checkpoint_dir(self, sandbox_id: str) -> Path:
        return self.dir(sandbox_id) / CHECKPOINT_NAME

    def has_checkpoint(self, sandbox_id: str) -> bool:
        return self.checkpoint_dir(sandbox_id).is_dir()

    def drop_checkpoint(self, sandbox_id: str) -> None:
        shutil.rmtree(self.checkpoint_dir(sandbox_id), ignore_errors=True)

    def discard(self, sandbox_id: str) -> None:
        shutil.rmtree(self.dir(sandbox_id), ignore_errors=True)

    def sweep(self, keep: set[str]) -> None:
        """Remove saved state of sandboxes not in KEEP (ended while nobody was watching)."""
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)

    # ----- saving ------------------------------------------------------------------------
    async def save(self, guest: GuestClient, saved: Saved, sandbox_id: str,
                   limit: int | None) -> None:
        """Save SAVED (with secret values) and, unless /workspace is a host directory, a tar of
        /workspace made inside the sandbox. LIMIT caps the tar (the sandbox's disk limit)."""
        spec = saved.spec
        d = self.dir(sandbox_id)
        self.discard(sandbox_id)
        d.mkdir(parents=True, mode=0o700)
        try:
            if spec.workspace is None:
                # Headers and padding make a tar a little larger than the files.
                cap = int((limit or UNLIMITED_SAVE) * 1.1) + (1 << 20)
                try:
                    await workspace_tar.save(guest, d / TAR_NAME, cap)
                except SandboxError as exc:
                    raise SandboxError(f"cannot pause: {exc}") from None
                (d / TAR_NAME).chmod(0o600)
            body = spec.model_dump(mode="json")
            for name, secret in spec.secrets.items():
                body["secrets"][name]["value"] = secret.value.get_secret_value()
            fd = os.open(d / SPEC_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(seal(self.data_dir, json.dumps(
                    {"spec": body, "remaining": saved.remaining,
                     "placeholders": saved.placeholders}).encode()))
        except BaseException:
            self.discard(sandbox_id)
            raise

    def load(self, sandbox_id: str) -> Saved:
        data: dict[str, Any] = json.loads(
            unseal(self.data_dir, (self.dir(sandbox_id) / SPEC_NAME).read_bytes()))
        return Saved(SandboxSpec.model_validate(data["spec"]), data["remaining"],
                     dict(data.get("placeholders") or {}))

    async def restore_files(self, guest: GuestClient, sandbox_id: str) -> None:
        tar = self.dir(sandbox_id) / TAR_NAME
        if tar.is_file():
            await workspace_tar.restore(guest, tar)


def remaining_time(info: SandboxInfo, at: datetime | None = None) -> float | None:
    """Seconds of the timeout left at AT (default: now); None when there is no timeout."""
    if info.expires_at is None:
        return None
    at = at or datetime.now(UTC)
    return max((info.expires_at - at) / timedelta(seconds=1), 0.001)
