"""The `microvm` tier: each sandbox is a QEMU ``-M microvm`` guest with its own kernel.

KVM is used when a probe boot under it answers within a few seconds (nested PVM hosts hang
stock kernels), TCG otherwise. The guest agent speaks over a virtio-serial port whose host end
is a unix socket. The guest's ``/usr`` is a read-only image of the host's (see
`microvm_image`); its root is its initramfs; ``/workspace`` and ``/tmp`` are tmpfs inside the
guest, sized by the disk limit and counted in its memory.

QEMU itself runs as an unprivileged per-sandbox uid, under its seccomp sandbox, inside the
sandbox's network namespace and cgroup (guest memory plus overhead). Limits inside the guest:
memory is the VM size, CPUs the vCPU count and the cgroup quota, pids a pids cgroup in the
guest around the agent and everything it starts. Pause saves the whole VM to disk
(`checkpoint`, QMP migrate to a file) and a later launch restores it (`LaunchSpec.restore`),
mapping the saved memory copy-on-write (see `microvm_snapshot`). What it does not defend
against: bugs in QEMU's device models reachable from the guest (virtio-mmio blk/net/serial,
serial port, TCG itself) combined with a host-kernel bug reachable under QEMU's seccomp
filter; a host ``workspace`` directory is not shared.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sealbox._sys import tap
from sealbox._sys.cgroups import Cgroup
from sealbox.errors import ConfigError, RuntimeUnavailable, SandboxError
from sealbox.guest.client import GuestClient
from sealbox.guest.identity import PIDS_EVENTS
from sealbox.runtimes import microvm_snapshot, probe_cache
from sealbox.runtimes.base import ExitInfo, LaunchSpec, Limits, Probe, kill_child, launched
from sealbox.runtimes.microvm_image import Assets, ext4_image, sandbox_archive
from sealbox.runtimes.microvm_snapshot import (
    NULL_NETDEV,
    RAM_ID,
    SAVE_ARGS,
    Restore,
    Template,
    memory_args,
)
from sealbox.runtimes.namespace import (
    GUEST_FILES,
    HOST_UID_BASE,
    host_uid_for,
    prepare_run_dir,
    sandbox_env,
)

QEMU = "qemu-system-x86_64"
# mapped-ram saves (9.0) and private mappings of a read-only file (rom=off, 8.2).
MIN_QEMU = (9, 0)
DEFAULT_MEMORY = 512 << 20
# QEMU's own memory beside guest RAM: device state, I/O buffers and the TCG code cache.
VMM_OVERHEAD = 256 << 20
TCG_CACHE_MB = 64
VMM_PIDS = 128
KVM_PROBE_TIMEOUT = 3.0
TCG_PROBE_TIMEOUT = 60.0
BOOT_TIMEOUT = 90.0
CONSOLE_LOG_CAP = 1 << 20
# Saving a paused VM: a fixed allowance plus its memory at a slow disk's pace.
SAVE_TIMEOUT = 60.0
SAVE_RATE = 100 << 20
SYNC_TIMEOUT = 10.0
# A checkpoint (see `MicrovmSandbox.checkpoint`): the saved VM, the initramfs it booted from
# (its bytes are part of the machine), and what a restore must match.
STATE, INITRD, MACHINE = "state.bin", "initrd.img", "machine.json"
_PORT = "/dev/virtio-ports/sealbox"
_SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# VM sizes (memory, vCPUs) restored from a template snapshot; others boot cold.
SNAPSHOT_SIZES = frozenset({(DEFAULT_MEMORY, 1)})
# Restored guests keep the template's MAC (it is in the saved device state); each sandbox's
# network is a layer-2 segment of its own, so sharing it is harmless.
TEMPLATE_MAC = "02:5b:00:00:00:01"
log = logging.getLogger("sealbox.microvm")


@dataclass(frozen=True)
class Accel:
    name: str
    """``kvm`` or ``tcg``."""
    args: tuple[str, ...]
    cmdline: str
    groups: tuple[int, ...] = ()
    """Extra groups QEMU needs (the group that may open /dev/kvm)."""


def _kvm_group() -> int | None:
    """The group that can open /dev/kvm, if one can: QEMU never runs as root, so KVM needs it."""
    st = os.stat("/dev/kvm")
    return st.st_gid if st.st_gid != 0 and st.st_mode & 0o060 == 0o060 else None


def _tsc_khz() -> int | None:
    """The host TSC rate. TCG guests read the host's TSC but cannot calibrate it against
    microvm's emulated timers reliably (the kernel then hangs), so they are told."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if " constant_tsc" not in info:
        return None
    for line in info.splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return None


def _accel(name: str) -> Accel:
    if name == "kvm":
        group = _kvm_group()
        return Accel("kvm", ("-accel", "kvm", "-cpu", "host"), "",
                     (group,) if group is not None else ())
    khz = _tsc_khz()
    return Accel("tcg", ("-accel", f"tcg,tb-size={TCG_CACHE_MB}", "-cpu", "max"),
                 f"tsc_early_khz={khz}" if khz else "")


def ctl_socket(agent_socket: Path) -> Path:
    """The host end of guest root's control port (see /init), next to the agent's."""
    return agent_socket.with_name("ctl.sock")


@dataclass(frozen=True)
class Disk:
    """An extra disk (a template layer, a volume): root opens the image and QEMU gets the
    descriptor, since the data dir is not QEMU's to read. The guest finds it by SERIAL."""

    serial: str
    fds: tuple[int, ...]
    """Read-only: one, read-only. Read-write: a read-write one and a read-only one (QEMU opens
    the image both ways). Empty once QEMU holds them."""
    read_only: bool


LAYER_SERIAL = "sealbox-layer"


def volume_serial(index: int) -> str:
    return f"sealbox-vol-{index}"


def qemu_args(assets: Assets, accel: Accel, initrd: Path, sock: Path, memory: int, vcpus: int,
              netdev: str | None = None, mac: str | None = None,
              disks: Sequence[Disk] = (), restore: Restore | None = None) -> list[str]:
    """NETDEV is the network card's ``-netdev`` backend (none: no card). RESTORE is a saved
    VM to start from instead of booting (see `memory_args`)."""
    args = [
        QEMU, "-M", f"microvm,rtc=on,pit=on,memory-backend={RAM_ID}", *accel.args,
        "-m", f"{memory >> 20}M", *memory_args(memory, restore),
        "-smp", str(vcpus), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", _SECCOMP,
        "-kernel", str(assets.kernel), "-initrd", str(initrd),
        # panic=-1 reboots on a guest panic, and -no-reboot turns every reboot into an exit.
        "-append", f"console=ttyS0 panic=-1 quiet {accel.cmdline}".strip(),
        "-serial", "stdio",
        "-drive", f"if=none,id=usr,file={assets.usr_image},format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=usr,serial=sealbox-usr",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=sealbox",
        "-chardev", f"socket,id=ctl,path={ctl_socket(sock)},server=on,wait=off",
        "-device", "virtserialport,chardev=ctl,name=sealbox-ctl",
    ]
    for n, disk in enumerate(disks, start=1):
        ro = ",readonly=on" if disk.read_only else ""
        for fd in disk.fds:
            args += ["-add-fd", f"fd={fd},set={n}"]
        args += ["-drive", f"if=none,id=disk{n},file=/dev/fdset/{n},format=raw{ro}",
                 "-device", f"virtio-blk-device,drive=disk{n},serial={disk.serial}"]
    if netdev is not None:
        mac = mac or "02:" + ":".join(f"{b:02x}" for b in os.urandom(5))
        args += ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net0,mac={mac}"]
    return args


@dataclass(frozen=True)
class Identity:
    """What makes a guest this sandbox, whether it boots cold or is restored."""

    settings: dict[str, str]
    """/init's SBX_* values."""
    env: dict[str, str]
    files: dict[str, bytes]
    """Guest path (relative to /) -> content: /etc entries and read-only files."""


def identity(spec: LaunchSpec, net: tap.GuestNet | None) -> Identity:
    limits = spec.limits
    settings = {
        "SBX_HOSTNAME": spec.hostname,
        "SBX_DISK": str(limits.disk_bytes) if limits.disk_bytes else "50%",
        "SBX_ADDRESS": net.address if net else "", "SBX_GATEWAY": net.gateway if net else "",
        "SBX_NPROC": str(limits.pids or ""),
        "SBX_LAYER": "1" if spec.layer else "",
        "SBX_VOLUMES": str(len(spec.disks)),
    }
    for i, vol in enumerate(spec.disks):
        settings[f"SBX_VOL_{i}"] = vol.sandbox_path
        settings[f"SBX_VOLRO_{i}"] = "1" if vol.read_only else ""
    files = {f"etc/{name}": (spec.run_dir / "etc" / name).read_bytes()
             for name in ("passwd", "group", "hostname", "hosts")}
    for inside, host in spec.ro_files.items():
        files[inside.lstrip("/")] = host.read_bytes()
    return Identity(settings, sandbox_env(spec), files)


def guest_files(spec: LaunchSpec, net: tap.GuestNet | None) -> dict[str, bytes]:
    """The per-sandbox archive of a cold boot: start-up settings, agent, identity files."""
    ident = identity(spec, net)
    argv = [f"{k}={v}" for k, v in ident.env.items()]
    argv += ["/usr/bin/python3", "-I", "/.sealbox/agent.py", "--serial", _PORT,
             "--pids-events", PIDS_EVENTS]
    config = "".join(f"{k}={shlex.quote(v)}\n" for k, v in ident.settings.items())
    config += f"set -- {shlex.join(argv)}\n"
    files = {".init/sandbox/config.sh": config.encode()}
    prefix = ".init/sandbox/files"
    for name in GUEST_FILES:
        files[f"{prefix}/.sealbox/{name}"] = (spec.run_dir / "guest" / name).read_bytes()
    for name, data in ident.files.items():
        files[f"{prefix}/{name}"] = data
    return files


def layer_image(layer: Path) -> Path:
    """A template's layer directory as an ext4 image, made once beside it (the template's
    directory is content-addressed, so the image never goes stale)."""
    image = layer.with_name("layer.ext4")
    if not image.is_file():
        with open(layer.with_name(".layer.ext4.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not image.is_file():
                ext4_image(layer, image, "sealbox-layer", mode=0o600)
    return image


def _write_initrd(target: Path, assets: Assets, files: dict[str, bytes]) -> None:
    with open(target, "wb") as out:
        out.write(sandbox_archive(files))
        with open(assets.initrd, "rb") as base:
            shutil.copyfileobj(base, out)


# ----- snapshot templates ----------------------------------------------------------------------
_template_failures: dict[str, str] = {}


def template_for(assets: Assets, accel: Accel, memory: int, vcpus: int
                 ) -> tuple[Template | None, str]:
    """The template a VM of this size is restored from (built on first use), or None and why
    it boots cold."""
    if not microvm_snapshot.enabled():
        return None, f"{microvm_snapshot.SNAPSHOT_ENV}=0"
    if (memory, vcpus) not in SNAPSHOT_SIZES:
        sizes = ", ".join(f"{m >> 20} MiB/{c} vCPU" for m, c in sorted(SNAPSHOT_SIZES))
        return None, f"no snapshot for {memory >> 20} MiB/{vcpus} vCPU (only {sizes})"

    def build_args(initrd: Path, sock: Path) -> list[str]:
        return qemu_args(assets, accel, initrd, sock, memory, vcpus, NULL_NETDEV, TEMPLATE_MAC)

    qemu = shutil.which(QEMU)
    assert qemu is not None  # the probe found it
    key = microvm_snapshot.template_key(build_args(Path("initrd"), Path("sock")),
                                        [assets.kernel, assets.initrd, assets.usr_image,
                                         Path(qemu)])
    if key in _template_failures:
        return None, _template_failures[key]
    found = Template.find(key)
    if found is not None:
        return found, ""
    initrd = sandbox_archive(microvm_snapshot.template_files()) + assets.initrd.read_bytes()
    try:
        return microvm_snapshot.ensure(key, initrd, build_args, memory, HOST_UID_BASE,
                                       accel.groups), ""
    except SandboxError as exc:
        # Remembered: a failing build costs a boot, and cold boots still work.
        log.warning("%s", exc)
        _template_failures[key] = str(exc)
        return None, str(exc)


# ----- probe -----------------------------------------------------------------------------------
def _probe_boot(assets: Assets, accel: Accel, timeout: float, uid: int) -> str | None:
    """Boot a VM whose guest writes one line to the agent port; None if it did, else why not."""
    with tempfile.TemporaryDirectory(prefix="sealbox-microvm-probe-") as tmp_name:
        tmp = Path(tmp_name)
        os.chown(tmp, uid, uid)
        run_dir = tmp / "run"
        spec = LaunchSpec(sandbox_id="probe", netns="", run_dir=run_dir, limits=Limits())
        prepare_run_dir(spec)
        files = guest_files(spec, None)
        files[".init/sandbox/config.sh"] += (
            "set -- /usr/bin/python3 -I -c "
            + shlex.quote(f"open({_PORT!r}, 'wb', 0).write(b'sealbox-ok\\n')") + "\n"
        ).encode()
        initrd = tmp / "initrd.img"
        _write_initrd(initrd, assets, files)
        sock = tmp / "agent.sock"
        args = qemu_args(assets, accel, initrd, sock, 256 << 20, 1)
        start = time.monotonic()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, user=uid, group=uid,
                                extra_groups=list(accel.groups))
        try:
            answer = _read_probe_answer(sock, proc, start + timeout)
            exited = proc.poll() is not None
        finally:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace").strip()
        if answer:
            return None
        if exited:
            return f"qemu exited: {out.splitlines()[-1][:200] if out else 'no output'}"
        return f"guest did not boot within {timeout:g} s"


def _read_probe_answer(sock: Path, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                s.connect(str(sock))
                break
            except OSError:
                time.sleep(0.05)
        else:
            return False
        data = b""
        while b"\n" not in data and time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(64)
            except OSError:
                return False
            if not chunk:
                return False
            data += chunk
        return data.startswith(b"sealbox-ok")


@lru_cache(maxsize=1)
def _probe() -> tuple[Probe, Accel | None]:
    qemu = shutil.which(QEMU)
    assets = Assets.load()
    if qemu is None or assets is None:
        return _probe_uncached()

    def compute() -> dict[str, Any]:
        probe, accel = _probe_uncached()
        return {"ok": probe.ok, "detail": probe.detail, "auto_skip": probe.auto_skip,
                "accel": accel.name if accel else None}

    data = probe_cache.cached("microvm", probe_cache.file_key(qemu, assets.kernel, assets.initrd,
                                                              "/dev/kvm"), compute)
    probe = Probe(bool(data["ok"]), str(data["detail"]), data.get("auto_skip"))
    return probe, _accel(data["accel"]) if data["accel"] else None


def qemu_version() -> tuple[int, int] | None:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"version (\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else None


def _probe_uncached() -> tuple[Probe, Accel | None]:
    if not shutil.which(QEMU):
        return Probe(False, f"{QEMU} is not installed (apt-get install qemu-system-x86)"), None
    version = qemu_version()
    have = ".".join(map(str, version)) if version else "of unknown version"
    if version is None or version < MIN_QEMU:
        return Probe(False, f"QEMU {have} is too old: saved VMs are mapped copy-on-write "
                            f"(mapped-ram), which needs QEMU {MIN_QEMU[0]}.{MIN_QEMU[1]} or "
                            "newer; on Debian 12 scripts/setup installs it from "
                            "bookworm-backports"), None
    assets = Assets.load()
    if assets is None:
        return Probe(False, "microvm assets are missing: run scripts/microvm-assets"), None
    kvm_why = "no /dev/kvm"
    if os.path.exists("/dev/kvm"):
        kvm = _accel("kvm")
        # Whether a guest boots at all is tested as root; sandboxes need the kvm group.
        why = _probe_boot(assets, kvm, KVM_PROBE_TIMEOUT, HOST_UID_BASE if kvm.groups else 0)
        if why is None and kvm.groups:
            return Probe(True, f"QEMU {have} microvm, KVM, kernel {assets.kernel_version}"
                         ), kvm
        kvm_why = (f"KVM present but {why}" if why else
                   "KVM boots but /dev/kvm is root-only (give it a kvm group, mode 0660)")
    tcg = _accel("tcg")
    why = _probe_boot(assets, tcg, TCG_PROBE_TIMEOUT, HOST_UID_BASE)
    if why is not None:
        return Probe(False, f"qemu microvm does not boot here ({kvm_why}; TCG: {why})"), None
    return Probe(True, f"QEMU {have} microvm, TCG: {kvm_why}; kernel {assets.kernel_version}",
                 auto_skip="TCG emulation: seconds per start"), tcg


class MicrovmRuntime:
    name = "microvm"
    strength = 30
    volume_disks = True
    host_tasks = 16  # QEMU's main, vCPU, RCU and I/O threads

    def probe(self) -> Probe:
        probe = _probe()[0]
        if not probe.ok:
            return probe
        start = ("snapshot restore for " + ", ".join(
            f"{m >> 20} MiB/{c} vCPU" for m, c in sorted(SNAPSHOT_SIZES)) + ", cold boot otherwise"
            if microvm_snapshot.enabled() else
            f"cold boot ({microvm_snapshot.SNAPSHOT_ENV}=0)")
        return Probe(probe.ok, f"{probe.detail}; start: {start}", probe.auto_skip)

    async def start(self, spec: LaunchSpec) -> MicrovmSandbox:
        if spec.mounts:
            raise ConfigError("the microvm tier takes volumes as disks, not host mounts")
        probe, accel = await asyncio.get_running_loop().run_in_executor(None, _probe)
        assets = Assets.load()
        if accel is None or assets is None:
            raise RuntimeUnavailable(f"microvm tier unavailable: {probe.detail}")
        if spec.workspace is not None:
            raise ConfigError("the microvm tier cannot mount a host workspace directory yet; "
                              "use --runtime namespace or gvisor for --workspace")
        return await launched(MicrovmSandbox(spec, assets, accel))

    def remove_leftovers(self, sandbox_id: str) -> None:
        """The VMM is the only process in the sandbox's cgroup and its tap lives in the
        sandbox's network namespace: the engine's cleanup of both covers it."""


async def _open_unix(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to one of QEMU's sockets, waiting for QEMU to create it."""
    while True:
        try:
            return await asyncio.open_unix_connection(str(path), limit=1 << 22)
        except (FileNotFoundError, ConnectionRefusedError):
            await asyncio.sleep(0.05)


class MicrovmSandbox:
    def __init__(self, spec: LaunchSpec, assets: Assets, accel: Accel) -> None:
        self.spec = spec
        self.sandbox_id = spec.sandbox_id
        self.assets = assets
        self.accel = accel
        self.cgroup = Cgroup(spec.sandbox_id)
        self.proc: asyncio.subprocess.Process | None = None
        self._private = spec.run_dir / "private"
        self._uid = host_uid_for(spec.sandbox_id)
        self._console = b""
        self._console_task: asyncio.Task[None] | None = None
        self._tap = False
        self._tap_fd: int | None = None
        self._restore: Restore | None = None
        self._disks: list[Disk] = []
        self._identity: Identity | None = None
        """Set when restored from a template: sent to the guest on connect."""
        self._net: tap.GuestNet | None = None
        self._initrd: Path | None = None
        self._card = False
        """Whether the VM has a network card (a checkpoint's restore needs the same devices)."""
        self.boot = ""
        """``restored from template KEY``, ``cold boot (why)`` or from a checkpoint."""
        self._killed = False
        self._stopped = False
        self._clone = False
        """Restored from a running sandbox's copy (a fork), not from its own pause."""

    @property
    def socket_path(self) -> Path:
        return self._private / "agent.sock"

    @property
    def qmp_path(self) -> Path:
        return self._private / "qmp.sock"

    @property
    def vcpus(self) -> int:
        return max(1, math.ceil(self.spec.limits.cpus or 1))

    @property
    def memory(self) -> int:
        return self.spec.limits.memory_bytes or DEFAULT_MEMORY

    def _setup(self) -> list[str]:
        """Blocking part of the launch: files, network, cgroup. Returns QEMU's argv."""
        spec = self.spec
        prepare_run_dir(spec)
        self._private.mkdir(mode=0o700, exist_ok=True)
        os.chown(self._private, self._uid, self._uid)
        lim = spec.limits
        vcpus = self.vcpus
        template, why_cold = (
            (None, "") if spec.restore else
            (None, "a template layer or volume is a disk the snapshot does not have")
            if spec.layer or spec.disks else
            template_for(self.assets, self.accel, self.memory, vcpus))
        net = self._net = tap.guest_net(spec.netns)
        if net is not None:
            self._tap = True
            tap.bridge_tap(spec.netns)
            self._tap_fd = tap.open_tap(spec.netns)
        netdev = None if self._tap_fd is None else f"tap,id=net0,fd={self._tap_fd}"
        self.cgroup.create(lim.cpus, self.memory + VMM_OVERHEAD, VMM_PIDS)
        self._disks = self._open_disks()
        if spec.restore is not None:
            return self._restore_args(spec.restore, vcpus, netdev)
        if template is not None:
            self.boot = f"restored from template {template.dir.name}"
            self._identity = identity(spec, net)
            self._initrd, self._card = template.initrd, True
            return qemu_args(self.assets, self.accel, template.initrd, self.socket_path,
                             self.memory, vcpus, netdev or NULL_NETDEV, TEMPLATE_MAC,
                             restore=self._open_state(template.state))
        self.boot = f"cold boot ({why_cold})"
        initrd = self._private / "initrd.img"
        _write_initrd(initrd, self.assets, guest_files(spec, net))
        self._initrd, self._card = initrd, netdev is not None
        return qemu_args(self.assets, self.accel, initrd, self.socket_path, self.memory, vcpus,
                         netdev, disks=self._disks)

    def _machine_key(self, vcpus: int, card: bool) -> str:
        qemu = shutil.which(QEMU)
        assert qemu is not None  # the probe found it
        layer = self.spec.layer
        # Descriptors differ from run to run; volumes' contents may change while paused.
        return microvm_snapshot.machine_key(
            qemu_args(self.assets, self.accel, Path("initrd"), Path("sock"), self.memory, vcpus,
                      NULL_NETDEV if card else None, TEMPLATE_MAC,
                      [Disk(d.serial, (), d.read_only) for d in self._disks]),
            [self.assets.kernel, self.assets.usr_image, Path(qemu),
             *([] if layer is None else [layer_image(layer)])])

    def _open_disks(self) -> list[Disk]:
        spec = self.spec
        images = ([(LAYER_SERIAL, layer_image(spec.layer), True)] if spec.layer else []) + [
            (volume_serial(i), vol.image, vol.read_only) for i, vol in enumerate(spec.disks)]
        disks: list[Disk] = []
        opened: list[int] = []
        try:
            for serial, image, read_only in images:
                modes = (os.O_RDONLY,) if read_only else (os.O_RDWR, os.O_RDONLY)
                for mode in modes:
                    opened.append(os.open(image, mode | os.O_CLOEXEC))
                disks.append(Disk(serial, tuple(opened[-len(modes):]), read_only))
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return disks

    def _restore_args(self, checkpoint: Path, vcpus: int, netdev: str | None) -> list[str]:
        try:
            saved = json.loads((checkpoint / MACHINE).read_text())
            card = bool(saved["card"])
            self._clone = bool(saved.get("clone"))
            if saved["key"] != self._machine_key(vcpus, card):
                raise SandboxError("this paused microVM was saved by another QEMU, kernel, /usr "
                                   "image or VM size than this host has now; it cannot be "
                                   "restored (kill it)")
            # QEMU (unprivileged) cannot read the root-only checkpoint directory.
            initrd = self._private / INITRD
            shutil.copyfile(checkpoint / INITRD, initrd)
            initrd.chmod(0o644)
            restore = self._open_state(checkpoint / STATE)
        except (OSError, ValueError, KeyError) as exc:
            raise SandboxError(f"the paused microVM's saved state is unreadable: {exc}") from exc
        self._initrd, self._card = initrd, card
        self.boot = ("restored from a copy of a running VM (a fork)" if self._clone else
                     "restored from its pause checkpoint")
        return qemu_args(self.assets, self.accel, initrd, self.socket_path, self.memory, vcpus,
                         (netdev or NULL_NETDEV) if card else None, TEMPLATE_MAC,
                         self._disks, restore=restore)

    def _open_state(self, state: Path) -> Restore:
        """Root opens the saved state; QEMU (unprivileged) only gets the descriptors."""
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._restore = Restore(fd, os.dup(fd), state.parent)
        except OSError:
            os.close(fd)
            raise
        return self._restore

    async def launch(self) -> None:
        loop = asyncio.get_running_loop()
        args = await loop.run_in_executor(None, self._setup)
        args += [*SAVE_ARGS, "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=tap.enter_vmm(self.spec.netns, self.cgroup, self._uid,
                                     list(self.accel.groups)),
            start_new_session=True,
            pass_fds=[fd for fd in (self._tap_fd, *self._restore_fds(),
                                    *(fd for d in self._disks for fd in d.fds))
                      if fd is not None],
        )
        log.info("microVM %s: %s", self.sandbox_id, self.boot)
        # QEMU holds them now; our tap fd would keep the tap's queue open after QEMU dies.
        self._close_fds()
        assert self.proc.stdout is not None
        self._console_task = asyncio.ensure_future(self._read_console(self.proc.stdout))

    async def _read_console(self, stream: asyncio.StreamReader) -> None:
        """Keep the guest console (and QEMU's errors): the tail in memory, the head on disk,
        both capped so a guest flooding its console costs the host nothing."""
        written = 0
        with (self._private / "console.log").open("wb") as out:
            out.write(f"sealbox: {self.boot}\n".encode())
            out.flush()
            while chunk := await stream.read(65536):
                self._console = (self._console + chunk)[-65536:]
                if written < CONSOLE_LOG_CAP:
                    out.write(chunk[:CONSOLE_LOG_CAP - written])
                    out.flush()
                    written += len(chunk)

    def console(self) -> str:
        return self._console.decode(errors="replace")

    async def connect(self) -> GuestClient:
        if self.proc is None or self.proc.returncode is not None:
            raise SandboxError(f"microVM is not running: {self.console()[-2000:] or 'it exited'}")
        attempt = asyncio.ensure_future(self._connect())
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait({attempt, exited}, timeout=BOOT_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled (a warm-pool boot stopped): leave no connect attempt running behind.
            attempt.cancel()
            exited.cancel()
            raise
        if attempt in done:
            exited.cancel()
            return attempt.result()
        attempt.cancel()
        exited.cancel()
        why = "exited during boot" if exited in done else f"did not boot in {BOOT_TIMEOUT:g} s"
        raise SandboxError(f"microVM {why}: {self.console()[-2000:] or 'no console output'}")

    async def _connect(self) -> GuestClient:
        if self.spec.restore is not None:
            await self._reconfigure()
            return await self._reconnect()
        reader, writer = await _open_unix(self.socket_path)
        client: GuestClient | None = None
        try:
            if self._identity is not None:
                ident = self._identity
                await microvm_snapshot.hand_identity(
                    reader, writer, microvm_snapshot.identity_message(
                        ident.settings, ident.env, ident.files))
            client = await GuestClient.from_streams(reader, writer)
            await client.ping()
        except BaseException:
            # Failed or cancelled (a warm-pool boot stopped): leave no open channel behind.
            if client is not None:
                client.abort()
            else:
                writer.close()
            raise
        return client

    async def _reconfigure(self) -> None:
        """A restored checkpoint's guest still has the clock, addresses and name it was saved
        with: guest root takes those of now (see /init) before anything else talks to it, and a
        clone's kernel also takes fresh randomness (its random state is its source's)."""
        net = self._net
        resolv = self.spec.ro_files.get("/etc/resolv.conf")

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode() or "-"

        said = await self._control(" ".join([
            str(round(time.time())), net.address if net else "-", net.gateway if net else "-",
            b64(resolv.read_bytes() if resolv else b""), self.spec.hostname,
            b64((self.spec.run_dir / "etc" / "hosts").read_bytes()),
            os.urandom(64).hex() if self._clone else "-"]))
        if said != "ok":
            raise SandboxError(f"the restored microVM did not take its new clock and network: "
                               f"{said or 'EOF'}")

    async def _control(self, line: str) -> str:
        """Send LINE to guest root's control port (see /init); its one-line answer."""
        reader, writer = await _open_unix(ctl_socket(self.socket_path))
        try:
            while (said := await reader.readline()) == b"ready\n" and line:
                writer.write(line.encode() + b"\n")
                await writer.drain()
                line = ""
            return said.decode(errors="replace").strip()
        finally:
            writer.close()

    async def _write_back(self) -> None:
        """Before a kill: the guest writes its read-write volumes' cached data to their images,
        as a host file system would keep it. Bounded: a guest that does not answer loses only
        its own unwritten data."""
        if self.proc is None or self.proc.returncode is not None or self._stopped or all(
                d.read_only for d in self.spec.disks):
            return
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._control("sync"), SYNC_TIMEOUT)

    async def _reconnect(self) -> GuestClient:
        """The agent's channel after a restore. The agent reopens its port when it sees the
        old host gone, and a port's close drops what arrived just before: ping until heard."""
        while True:
            client = await GuestClient.from_streams(*await _open_unix(self.socket_path))
            try:
                for _ in range(5):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(client.ping(), 1.0)
                        return client
                    if client.closed:
                        break
            except SandboxError:
                pass
            except BaseException:
                client.abort()
                raise
            await client.close()

    def limit_events(self) -> dict[str, int]:
        # Guest OOM kills are printed on its console; the VMM's own show in its cgroup.
        guest_ooms = self._console.count(b"Out of memory: Killed process")
        return {"memory": guest_ooms + self.cgroup.oom_kills(), "pids": 0}

    async def wait(self) -> ExitInfo:
        if self.proc is None:
            raise SandboxError("microVM was never started")
        code = await self.proc.wait()
        if self._console_task is not None:
            await self._console_task
        limit = next((k for k, v in self.limit_events().items() if v > 0), None)
        detail = self.console()[-2000:]
        if "Kernel panic" in detail:
            detail = "guest kernel panic: " + detail
        return ExitInfo(code=code, limit=limit, detail=detail)

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        loop = asyncio.get_running_loop()
        await self._write_back()
        await kill_child(self.proc)
        if self.cgroup.exists():
            await loop.run_in_executor(None, self.cgroup.kill_all)
        if self._console_task is not None:
            await self._console_task
        await loop.run_in_executor(None, self._teardown)

    def _close_fds(self) -> None:
        for fd in (self._tap_fd, *self._restore_fds(),
                   *(fd for d in self._disks for fd in d.fds)):
            if fd is not None:
                os.close(fd)
        self._tap_fd = self._restore = None
        # Which disks it has stays known: a checkpoint's key names them.
        self._disks = [Disk(d.serial, (), d.read_only) for d in self._disks]

    def _restore_fds(self) -> tuple[int, ...]:
        r = self._restore
        return () if r is None else (r.ram_fd, r.stream_fd)

    def _teardown(self) -> None:
        self._close_fds()
        self.cgroup.remove()
        if self._tap:
            tap.remove_tap(self.spec.netns)
        shutil.rmtree(self._private, ignore_errors=True)

    can_checkpoint = True

    async def checkpoint(self, dest: Path, *, keep_running: bool = False) -> None:
        """Stop the VM and save it into DEST (a new directory): memory, devices, and what a
        restore must match. It stays stopped (`kill` then frees it) unless KEEP_RUNNING, when
        the copy is a clone: its restore gives the guest fresh randomness. On failure it runs
        on."""
        await asyncio.get_running_loop().run_in_executor(
            None, self._checkpoint, dest, keep_running)

    def _checkpoint(self, dest: Path, keep_running: bool) -> None:
        assert self._initrd is not None
        dest.mkdir(mode=0o700)
        shutil.copyfile(self._initrd, dest / INITRD)
        (dest / MACHINE).write_text(json.dumps(
            {"key": self._machine_key(self.vcpus, self._card), "card": self._card,
             "clone": keep_running}))
        deadline = time.monotonic() + SAVE_TIMEOUT + self.memory / SAVE_RATE
        with microvm_snapshot.qmp_session(self.qmp_path, deadline) as qmp:
            try:
                microvm_snapshot.save(qmp, dest / STATE, deadline, self.memory)
            except BaseException:
                with contextlib.suppress(OSError, SandboxError):
                    qmp.call("cont")
                raise
            if keep_running:
                qmp.call("cont")
            else:
                self._stopped = True  # its volumes' state is in the checkpoint, with its memory

    async def pause(self) -> None:
        self.cgroup.freeze(True)
        self._stopped = True

    async def resume(self) -> None:
        self.cgroup.freeze(False)
        self._stopped = False

