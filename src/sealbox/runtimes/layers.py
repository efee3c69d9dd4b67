"""A template's layer shown read-only inside a sandbox, the same way on every tier that can.

Each system dir the layer has (usr, etc, opt) becomes a read-only overlay — the layer above the
host's own dir — mounted by host root under the sandbox's run dir; the tier binds it in place
of the host dir. The layer's var/ (package databases) is shown at /var, through an overlay too:
the tier's unprivileged user could not reach it in the data dir.

A layer with a ``.sealbox-rootfs`` mark at its top (a template on a Debian base) is a whole
system: each of its system dirs replaces the host's instead of lying over it.
"""

from __future__ import annotations

from pathlib import Path

from sealbox._sys import overlay
from sealbox.runtimes.base import LaunchSpec

OVERLAID = ("usr", "etc", "opt")
ROOTFS_MARK = ".sealbox-rootfs"
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt")


def is_rootfs(layer: Path | None) -> bool:
    return layer is not None and (layer / ROOTFS_MARK).is_file()


def system_root(spec: LaunchSpec) -> Path:
    """Where the sandbox's system dirs come from: the layer if it is a whole system."""
    return spec.layer if spec.layer is not None and is_rootfs(spec.layer) else Path("/")


def layer_binds(spec: LaunchSpec) -> dict[str, Path]:
    """Sandbox dir → host dir to show read-only in its place (mounted by `mount_layer`)."""
    if spec.layer is None:
        return {}
    binds: dict[str, Path] = {}
    rootfs = is_rootfs(spec.layer)
    for top in SYSTEM_DIRS if rootfs else OVERLAID:
        src, host = spec.layer / top, Path("/") / top
        if src.is_dir() and not src.is_symlink() and (
                rootfs or (host.is_dir() and not host.is_symlink())):
            binds["/" + top] = spec.run_dir / "layer" / top
    var = spec.layer / "var"
    if var.is_dir() and not var.is_symlink():
        binds["/var"] = spec.run_dir / "layer" / "var"
    return binds


def mount_layer(spec: LaunchSpec) -> dict[str, Path]:
    binds = layer_binds(spec)
    rootfs = is_rootfs(spec.layer)
    for inside, target in binds.items():
        assert spec.layer is not None
        # The sandbox's /var is empty but for the layer's, as is every dir of a whole-system
        # layer (a read-only overlay needs two lower dirs).
        below = (spec.run_dir / "layer" / ".empty" if rootfs or inside == "/var"
                 else Path(inside))
        below.mkdir(parents=True, exist_ok=True)
        overlay.mount(target, [spec.layer / inside.lstrip("/"), below])
    return binds


def unmount_layer(run_dir: Path) -> None:
    overlay.unmount_all(run_dir / "layer")
