"""Boot assets of the `microvm` tier, built once per host by ``scripts/microvm-assets``.

* ``vmlinuz``: the kernel of Debian's ``linux-image-*-cloud-amd64``, taken out of the .deb
  (never installed on the host).
* ``initrd.img``: busybox-static, the virtio modules the cloud kernel builds as modules, a
  filtered copy of the host's ``/etc`` and the ``/init`` below. The guest's root file system is
  this initramfs itself (a ramfs only guest root can write).
* ``usr.img``: an ext4 image of the host's ``/usr``, attached read-only. The cloud kernel has no
  9p and virtiofsd would need a host daemon with write access to ``/usr``; a read-only disk
  image needs neither, QEMU enforces ``readonly=on``, and it survives a migration snapshot.

Each sandbox's own files (agent, ``/etc`` entries, read-only files, start-up settings) go in a
small uncompressed cpio archive placed before the base one (`sandbox_archive`).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ASSETS_DIR = Path(os.environ.get("SEALBOX_MICROVM_ASSETS", "/var/lib/sealbox/microvm"))
KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# What the guest needs from the modules: the virtio-mmio transport microvm uses, the agent's
# virtio-serial port, the /usr disk, the network card, and overlayfs for template layers.
MODULES = ("virtio_mmio", "virtio_console", "virtio_blk", "virtio_net", "overlay")
_ETC_SKIP = ("shadow", "gshadow", "shadow-", "gshadow-", "sudoers", "sudoers.d", "ssh",
             "ssl/private", "sealbox", "machine-id")
MANIFEST = "manifest.json"

INIT = r"""#!/.init/busybox sh
# PID 1 of a sealbox microVM: mount, load drivers, configure, run the agent, power off.
B=/.init/busybox
export PATH=/.init/bin
$B mkdir -p /.init/bin && $B --install -s /.init/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t devtmpfs -o nosuid,noexec,mode=0755 dev /dev
mount -t sysfs -o nosuid,nodev,noexec sys /sys
while read -r m; do insmod "/.init/modules/$m" || echo "init: insmod $m failed"; done \
  < /.init/modules.list
# Sets SBX_* and the positional parameters: the agent's environment and command line.
. /.init/sandbox/config.sh
# This sandbox's agent, /etc entries and read-only files (their archive comes first, so the
# base archive unpacked after it would overwrite them in place).
cp -a /.init/sandbox/files/. /
# Disks are known by their serial numbers: the order they appear in is not fixed.
disk() { for b in /sys/block/vd*; do [ "$(cat "$b/serial")" = "$1" ] && echo "/dev/${b##*/}"; done; }
mount -t ext4 -o ro,nodev,nosuid "$(disk sealbox-usr)" /usr || { echo "init: no /usr disk"; reboot -f; }
if [ -n "$SBX_LAYER" ]; then
  # A template's layer over the guest's own dirs, as the other tiers show it: read-only, but
  # /etc keeps a writable top so this sandbox's own entries stay in front of the layer's.
  mkdir -p /.init/layer /.init/layer-rw /.init/empty /opt
  mount -t ext4 -o ro,nodev,nosuid "$(disk sealbox-layer)" /.init/layer \
    || { echo "init: no layer disk"; reboot -f; }
  # A whole-system layer (a Debian base) replaces the guest's dirs: nothing shows through.
  below() { if [ -f /.init/layer/.sealbox-rootfs ]; then echo /.init/empty; else echo "/$1"; fi; }
  for d in usr opt var; do
    [ ! -d "/.init/layer/$d" ] || mount -t overlay -o "ro,lowerdir=/.init/layer/$d:$(below $d)" \
      overlay "/$d" || { echo "init: layer /$d failed"; reboot -f; }
  done
  mount -t tmpfs -o nosuid,nodev,mode=0700,size=16m tmpfs /.init/layer-rw
  mkdir /.init/layer-rw/up /.init/layer-rw/work
  [ ! -d /.init/layer/etc ] || { mount -t overlay -o \
    lowerdir=/.init/layer/etc:$(below etc),upperdir=/.init/layer-rw/up,workdir=/.init/layer-rw/work \
    overlay /etc && cp -a /.init/sandbox/files/etc/. /etc/; } || { echo "init: layer /etc failed"; reboot -f; }
fi
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx
for d in /tmp /var/tmp /dev/shm /workspace; do
  mount -t tmpfs -o "nosuid,nodev,mode=1777,size=$SBX_DISK" tmpfs "$d"
done
# Volumes last, so they may sit under /workspace. A read-only one is never written, not even
# to replay its journal.
i=0
while [ "$i" -lt "${SBX_VOLUMES:-0}" ]; do
  eval "path=\$SBX_VOL_$i ro=\$SBX_VOLRO_$i"
  mkdir -p "$path" && mount -t ext4 -o "nosuid,nodev${ro:+,ro,noload}" \
    "$(disk "sealbox-vol-$i")" "$path" || { echo "init: volume $i failed"; reboot -f; }
  # Read-write: the sandbox user's, as what other tiers' sandboxes wrote there is theirs.
  [ -n "$ro" ] || find "$path" ! -user 1000 -exec chown -h 1000:1000 {} + \
    || { echo "init: volume $i failed"; reboot -f; }
  i=$((i + 1))
done
mount -t tmpfs -o nosuid,nodev,mode=0755,size=16m tmpfs /run
chown 1000:1000 /workspace && chmod 0755 /workspace
for p in /sys/class/virtio-ports/*; do
  name=$(cat "$p/name" 2>/dev/null)
  case "$name" in sealbox|sealbox-ctl) ;; *) continue ;; esac
  port=/dev/${p##*/}
  ln -sf "$port" "/dev/virtio-ports/$name"
  chmod 0600 "$port"
  [ "$name" = sealbox-ctl ] || chown 1000:1000 "$port"
done
umount /sys
# The sandbox's processes live in a pids cgroup of their own: its pids.events tells the agent
# (which may read it, not write it) when the process limit refused a fork.
mkdir -p /.init/cgroup
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /.init/cgroup \
  && echo +pids > /.init/cgroup/cgroup.subtree_control && mkdir /.init/cgroup/sandbox \
  || echo "init: no pids cgroup"
# Root's channel from the host, for what the unprivileged agent cannot do: write volumes
# back before the VM is killed ("sync"); when a saved VM is restored, take the clock, network,
# name and (for a clone of a running VM) fresh kernel randomness of now: "TIME ADDRESS GATEWAY
# RESOLV_CONF_B64 HOSTNAME HOSTS_B64 ENTROPY_HEX|-". A write blocks until a host is connected
# and a read sees EOF while none is, so the loop never spins.
RESEED='import fcntl, os, sys; f = os.open("/dev/urandom", os.O_WRONLY); os.write(f, bytes.fromhex(sys.argv[1])); fcntl.ioctl(f, 0x5207)'
(
  exec 3<>/dev/virtio-ports/sealbox-ctl
  while echo ready >&3; do
    read -r t a g r h hs e <&3 || continue
    if [ "$t" = sync ]; then
      sync && echo ok >&3
    elif { [ "$e" = - ] || { /usr/bin/python3 -I -S -c "$RESEED" "$e" \
            && echo "init: kernel randomness reseeded" > /dev/console; }; } \
        && date -u -s "@$t" >/dev/null && hostname "$h" \
        && echo "$hs" | base64 -d > /etc/hosts && echo "$h" > /etc/hostname \
        && ip addr flush dev eth0 && ip addr add "$a" dev eth0 \
        && ip route replace default via "$g" && ip neigh flush dev eth0 \
        && echo "$r" | base64 -d > /etc/resolv.conf; then
      echo ok >&3
    else
      echo failed >&3
    fi
  done
) </dev/null >/dev/null 2>&1 &
hostname "$SBX_HOSTNAME"
ip link set lo up
if [ -n "$SBX_ADDRESS" ]; then
  ip link set eth0 up && ip addr add "$SBX_ADDRESS" dev eth0 \
    && ip route add default via "$SBX_GATEWAY" || echo "init: network setup failed"
fi
# Only guest root could use these; the sandbox user gets nothing from them either way.
rm -rf /.init/modules /.init/sandbox
cd /workspace
[ -z "$SBX_NPROC" ] || echo "$SBX_NPROC" > /.init/cgroup/sandbox/pids.max
(
  echo 0 > /.init/cgroup/sandbox/cgroup.procs
  exec /usr/bin/setpriv --reuid 1000 --regid 1000 --clear-groups --no-new-privs \
    /usr/bin/env -i "$@"
) </dev/null &
# wait also reaps orphans re-parented to PID 1 while the agent runs.
wait
echo "init: agent exited"
reboot -f
"""


@dataclass(frozen=True)
class Assets:
    kernel: Path
    initrd: Path
    usr_image: Path
    kernel_version: str

    @classmethod
    def load(cls, root: Path = ASSETS_DIR) -> Assets | None:
        """The built assets, or None when `scripts/microvm-assets` has not run (or failed)."""
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            assets = cls(root / "vmlinuz", root / "initrd.img", root / "usr.img",
                         str(manifest["kernel_version"]))
        except (OSError, ValueError, KeyError):
            return None
        if not all(p.is_file() for p in (assets.kernel, assets.initrd, assets.usr_image)):
            return None
        return assets


# ----- cpio (newc) ---------------------------------------------------------------------------
def _cpio_header(name: str, mode: int, size: int, ino: int, nlink: int = 1) -> bytes:
    raw = os.fsencode(name)
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(raw) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields) + raw + b"\0"
    return header + b"\0" * (-len(header) % 4)


class CpioWriter:
    """An in-memory newc archive; every entry owned by root (the kernel unpacks it as such)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _add(self, name: str, mode: int, data: bytes = b"") -> None:
        self._ino += 1
        self._parts.append(_cpio_header(name.lstrip("/"), mode, len(data), self._ino))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._add(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, stat.S_IFLNK | 0o777, os.fsencode(target))

    def finish(self) -> bytes:
        return b"".join(self._parts) + _cpio_header("TRAILER!!!", 0, 0, 0)


def sandbox_archive(files: dict[str, bytes]) -> bytes:
    """An uncompressed archive to put before ``initrd.img`` (the kernel unpacks both)."""
    cpio = CpioWriter()
    dirs = sorted({str(p) for name in files for p in Path(name.lstrip("/")).parents} - {"."})
    for d in dirs:
        cpio.dir(d)
    for name, data in files.items():
        cpio.file(name, data)
    return cpio.finish()


# ----- building ------------------------------------------------------------------------------
def _run(*args: str, cwd: Path | None = None) -> str:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()[-2000:]}")
    return r.stdout


def _kernel_package() -> str:
    """The versioned image package the meta-package depends on (linux-image-6.1.0-N-cloud-amd64)."""
    for line in _run("apt-cache", "depends", KERNEL_PACKAGE).splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if dep.startswith("linux-image-") and dep != KERNEL_PACKAGE:
            return dep
    raise RuntimeError(f"apt-cache finds no kernel behind {KERNEL_PACKAGE}; run apt-get update")


def _module_order(moddir: Path, version: str) -> list[str]:
    """MODULES and their dependencies, dependencies first, as paths under the version dir."""
    _run(str(BUSYBOX), "depmod", "-b", str(moddir.parent.parent.parent), version)
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name.strip()] = rest.split()
    by_name = {Path(p).name.removesuffix(".ko"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    for name in MODULES:
        if name not in by_name:
            raise RuntimeError(f"the cloud kernel {version} has no module {name}")
        visit(by_name[name])
    return order


def _walk_etc(root: Path = Path("/etc")) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if str(rel / d) not in _ETC_SKIP)
        yield str(rel), Path(dirpath)
        for f in sorted(filenames):
            if str(rel / f) not in _ETC_SKIP:
                yield str(rel / f), Path(dirpath) / f


def _initramfs(moddir: Path, modules: list[str]) -> bytes:
    cpio = CpioWriter()
    for d in ("dev", "proc", "sys", "usr", "tmp", "var", "var/tmp", "run", "workspace", "home",
              "root", ".sealbox", ".init", ".init/modules", ".init/sandbox", "etc"):
        cpio.dir(d, 0o700 if d == "root" else 0o755)
    # The usrmerge links, so /bin/sh and /lib64/ld-linux-x86-64.so.2 resolve into the disk.
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if (Path("/") / top).is_symlink():
            cpio.symlink(top, os.readlink(Path("/") / top))
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file(".init/busybox", BUSYBOX.read_bytes(), 0o755)
    for i, rel in enumerate(modules):
        cpio.file(f".init/modules/{i:02d}.ko", (moddir / rel).read_bytes())
    cpio.file(".init/modules.list",
              "".join(f"{i:02d}.ko\n" for i in range(len(modules))).encode())
    for rel, path in _walk_etc():
        name = "etc" if rel == "." else f"etc/{rel}"
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            cpio.symlink(name, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode) and rel != ".":
            cpio.dir(name, stat.S_IMODE(st.st_mode))
        # World-readable files only: what a host user could read anyway.
        elif stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IROTH:
            cpio.file(name, path.read_bytes(), stat.S_IMODE(st.st_mode) & 0o755)
    data = gzip.compress(cpio.finish(), compresslevel=6)
    # A later archive must start on a 4-byte boundary for the kernel to find its header.
    return data + b"\0" * (-len(data) % 4)


def ext4_image(source: Path, target: Path, label: str, mode: int = 0o644) -> None:
    """A read-only-use ext4 image of the tree SOURCE (owners, modes, overlay whiteouts and
    xattrs kept), written beside TARGET and renamed into place."""
    used = int(_run("du", "-sx", "--block-size=1M", str(source)).split()[0])
    inodes = sum(1 + len(dirs) + len(files) for _, dirs, files in os.walk(source))
    size_mb = used + used // 8 + 64
    tmp = target.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    _run("mke2fs", "-q", "-t", "ext4", "-d", str(source), "-O", "^has_journal", "-m", "0",
         "-N", str(inodes + inodes // 4 + 1_000), "-L", label,
         "-E", "root_owner=0:0", str(tmp), f"{size_mb}M")
    tmp.chmod(mode)
    tmp.rename(target)


def _usr_image(target: Path) -> None:
    ext4_image(Path("/usr"), target, "sealbox-usr")


def build(root: Path = ASSETS_DIR, force: bool = False, log: bool = True) -> Assets:
    """Build (or bring up to date) the assets. The /usr image is rebuilt when dpkg changed."""

    def say(msg: str) -> None:
        if log:
            print(f"microvm-assets: {msg}", flush=True)

    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    package = _kernel_package()
    dpkg_stamp = str(Path("/var/lib/dpkg/status").stat().st_mtime_ns)
    try:
        old = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        old = {}
    current = Assets.load(root)
    fresh = current is not None and not force
    boot_ok = (fresh and old.get("package") == package and old.get("init") == INIT
               and old.get("modules") == list(MODULES))
    usr_ok = fresh and old.get("dpkg_status") == dpkg_stamp
    if boot_ok and usr_ok and current is not None:
        say(f"up to date in {root} (kernel {current.kernel_version})")
        return current
    (root / MANIFEST).unlink(missing_ok=True)
    version = old.get("kernel_version", "")
    if not boot_ok:
        with tempfile.TemporaryDirectory(prefix="sealbox-kernel-") as tmp_name:
            tmp = Path(tmp_name)
            say(f"downloading {package} (not installed on the host)")
            _run("apt-get", "download", package, cwd=tmp)
            deb = next(tmp.glob("*.deb"))
            _run("dpkg-deb", "-x", str(deb), str(tmp / "x"))
            vmlinuz = next((tmp / "x" / "boot").glob("vmlinuz-*"))
            version = vmlinuz.name.removeprefix("vmlinuz-")
            moddir = tmp / "x" / "lib" / "modules" / version
            modules = _module_order(moddir, version)
            say(f"kernel {version}; modules {', '.join(Path(m).stem for m in modules)}")
            shutil.copyfile(vmlinuz, root / "vmlinuz")
            (root / "initrd.img").write_bytes(_initramfs(moddir, modules))
    if not usr_ok:
        say("building the read-only /usr disk image (takes a few minutes)")
        _usr_image(root / "usr.img")
    (root / MANIFEST).write_text(json.dumps({
        "package": package, "kernel_version": version, "init": INIT, "modules": list(MODULES),
        "dpkg_status": dpkg_stamp,
    }, indent=1))
    assets = Assets.load(root)
    if assets is None:
        raise RuntimeError(f"assets in {root} are incomplete after the build")
    say(f"ready in {root}")
    return assets


if __name__ == "__main__":
    import sys

    try:
        build(force="--force" in sys.argv[1:])
    except RuntimeError as exc:
        sys.exit(f"microvm-assets: {exc}")
