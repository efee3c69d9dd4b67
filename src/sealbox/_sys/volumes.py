"""Volume images: sparse ext4 files, loop-mounted on the host while a sandbox uses them.

Mounts use ``mount -o loop`` so the kernel sets the loop device to auto-clear: unmounting the
filesystem also detaches the loop device, and nothing else has to remember it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

IMAGE_NAME = "sealbox-volume.img"
"""Every volume image has this file name, so leak checks can spot sealbox loop devices."""
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"


class VolumeSysError(Exception):
    """A mount/mkfs/losetup call failed; the message is the tool's own words."""


def _run(args: list[str]) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise VolumeSysError(f"{args[0]}: {(r.stderr or r.stdout).strip()[-500:]}")


def make_image(path: Path, size: int) -> None:
    """A sparse file of SIZE bytes holding an empty ext4 filesystem (no reserved blocks, so the
    whole size is usable; lazy init so creating a large volume costs no writes)."""
    with open(path, "xb") as f:
        f.truncate(size)
    os.chmod(path, 0o600)
    try:
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
              "-L", "sealbox", str(path)])
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def is_mounted(mountpoint: Path) -> bool:
    return str(mountpoint) in mounts_under(mountpoint.parent)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ROOT in this mount namespace."""
    prefix = str(root).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def mount(image: Path, mountpoint: Path) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(mountpoint)])


def umount(mountpoint: Path) -> None:
    """Unmount (which also frees the auto-clear loop device). A mount still busy after a few
    tries is detached lazily: it disappears once its last user is gone."""
    for _ in range(20):
        if not is_mounted(mountpoint):
            return
        r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.05)
    _run(["umount", "-l", str(mountpoint)])


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give every file of a volume to UID:GID without following symlinks (a symlink the sandbox
    planted must not make the host chown something outside the volume)."""
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def leaked_loops(under: Path | None = None) -> list[str]:
    """Loop devices backed by a sealbox volume image (for leak checks), optionally only those
    whose image is below UNDER."""
    r = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    devices = json.loads(r.stdout).get("loopdevices", [])
    prefix = str(under).rstrip("/") + "/" if under is not None else ""
    return sorted(d["name"] for d in devices
                  if (back := (d.get("back-file") or "").split(" (deleted)")[0])
                  .endswith(IMAGE_NAME) and back.startswith(prefix))
