"""A template's layer shown read-only inside a sandbox, the same way on every tier that can.

Each system dir the layer has (usr, etc, opt) becomes a read-only overlay — the layer above the
host's own dir — mounted by host root under the sandbox's run dir; the tier binds it in place
of the host dir. The layer's var/ (package databases) is shown at /var, through an overlay too:
the tier's unprivileged user could not reach it in the data dir.
"""

from __future__ import annotations

from pathlib import Path

from sealbox._sys import overlay
from sealbox.runtimes.base import LaunchSpec

OVERLAID = ("usr", "etc", "opt")


def layer_binds(spec: LaunchSpec) -> dict[str, Path]:
    """Sandbox dir → host dir to show read-only in its place (mounted by `mount_layer`)."""
    if spec.layer is None:
        return {}
    binds: dict[str, Path] = {}
    for top in OVERLAID:
        src, host = spec.layer / top, Path("/") / top
        if src.is_dir() and not src.is_symlink() and host.is_dir() and not host.is_symlink():
            binds["/" + top] = spec.run_dir / "layer" / top
    var = spec.layer / "var"
    if var.is_dir() and not var.is_symlink():
        binds["/var"] = spec.run_dir / "layer" / "var"
    return binds


def mount_layer(spec: LaunchSpec) -> dict[str, Path]:
    binds = layer_binds(spec)
    for inside, target in binds.items():
        assert spec.layer is not None
        # The sandbox's /var is empty but for the layer's (an overlay needs two lower dirs).
        below = Path(inside) if inside != "/var" else spec.run_dir / "layer" / ".empty"
        below.mkdir(parents=True, exist_ok=True)
        overlay.mount(target, [spec.layer / inside.lstrip("/"), below])
    return binds


def unmount_layer(run_dir: Path) -> None:
    overlay.unmount_all(run_dir / "layer")
