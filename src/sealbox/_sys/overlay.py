"""Overlay mounts made by host root for template layers, and their removal.

Mounted in the host's mount namespace (under a sandbox's run directory), then bound into the
sandbox by its tier: bubblewrap 0.8 cannot make overlays itself, and an unprivileged overlay
could not write below root-owned host directories anyway.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sealbox.errors import SandboxError


def _escape(path: Path) -> str:
    # The overlay option parser splits on ',' and ':' (a backslash escapes them).
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def mount(target: Path, lowers: list[Path], upper: Path | None = None,
          work: Path | None = None) -> None:
    """Mount an overlay at TARGET: LOWERS (topmost first), read-only unless UPPER is given."""
    target.mkdir(parents=True, exist_ok=True)
    opts = ["lowerdir=" + ":".join(_escape(p) for p in lowers)]
    if upper is not None and work is not None:
        opts += [f"upperdir={_escape(upper)}", f"workdir={_escape(work)}"]
    else:
        opts.append("ro")
    opts += ["nodev", "nosuid"]
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(target)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SandboxError(f"overlay mount at {target} failed: {r.stderr.strip()}")


def bind(source: Path, target: Path) -> None:
    """Show SOURCE at TARGET too (nodev, nosuid); removed by `unmount_all` like an overlay."""
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "--bind", "-o", "nodev,nosuid", str(source), str(target)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SandboxError(f"bind mount at {target} failed: {r.stderr.strip()}")


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ROOT, deepest first."""
    prefix = str(root.resolve()) if root.exists() else str(root)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def lower_dirs_in_use() -> list[str]:
    """Every lower dir of every overlay mounted on this host (any process, any sandbox)."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, _, right = line.partition(" - ")
        fields = right.split()
        if len(fields) < 3 or fields[0] != "overlay":
            continue
        for opt in fields[2].split(","):
            if opt.startswith("lowerdir="):
                found += [d.replace("\\:", ":") for d in opt[9:].split(":")]
    return found


def unmount_all(root: Path) -> None:
    """Detach every mount at or below ROOT (idempotent); before anyone deletes ROOT."""
    for point in mounts_under(root):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """lchown every entry below ROOT (never following a symlink)."""
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(base, name), uid, gid)
    os.lchown(root, uid, gid)
