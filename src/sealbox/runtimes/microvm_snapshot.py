"""Snapshot fast start for the `microvm` tier.

A cold boot under TCG takes seconds (kernel, init, Python importing the agent). Instead, per
kernel, initramfs, /usr image, QEMU, accelerator and VM size, a *template* VM boots once to the
point where ``guest/identity.py`` (guest root, agent already imported) waits on the agent port
for its sandbox's identity; it is then stopped and saved with QMP ``migrate`` to a file. Each
sandbox of that size starts a QEMU with the same device model restoring it (`memory_args`:
the saved RAM mapped copy-on-write) and sends its identity (`identity_message`) over the port
before the agent protocol starts.

What restored VMs share: the template's kernel memory layout (KASLR offsets), MAC address,
Python hash seed, and every memory page none of them has written. What they do not: the kernel RNG (reseeded from host entropy before anything
of the sandbox runs), the clock, and every per-sandbox file, setting and address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealbox.errors import SandboxError
from sealbox.guest import identity
from sealbox.runtimes.microvm_image import ASSETS_DIR, INIT

SNAPSHOT_ENV = "SEALBOX_MICROVM_SNAPSHOT"
TEMPLATES = ASSETS_DIR / "templates"
# A network backend that drops every frame: the template, and sandboxes without a network,
# still need the same virtio-net device as those restored onto a tap.
NULL_NETDEV = "hubport,id=net0,hubid=0"
BUILD_TIMEOUT = 180.0
# QEMU's default migration bandwidth cap (32 MiB/s) is for live links, not a local file.
SAVE_BANDWIDTH = 8 << 30

_GUEST_DIR = Path(identity.__file__).parent
_GUEST_FILES = ("agent.py", "protocol.py", "identity.py")
# The template runs /init's own set-up (mounts, port, loopback) up to where /init starts the
# agent as the sandbox user; from there the identity step takes over as root.
_SETUP_FROM, _SETUP_TO = ". /.init/sandbox/config.sh\n", "cd /workspace\n"


# Saved stopped, for a consistent state; without the run state in the stream a restored VM
# starts running at once instead of staying paused like its source. Guest RAM is saved
# mapped-ram: each page at a fixed offset in the state file, so a restore can map the file
# (see `memory_args`) instead of reading it.
SAVE_ARGS = ("-global", "migration.store-global-state=off", "-global", "migration.mapped-ram=on")
# The guest RAM's memory backend: one name for every VM, since a restore matches RAM by name.
RAM_ID = "sealbox-ram"
RAM_INFO = "ram.json"
# QEMU's mapped-ram header of one RAM block: version, page size, bitmap and pages offsets.
_RAM_HEADER = struct.Struct(">IQQQ")
_RAM_ALIGN = 1 << 20
# The fd set a saved state travels in (volumes' disks take 1, 2, ...).
STATE_FDSET = 1000


def enabled() -> bool:
    return os.environ.get(SNAPSHOT_ENV, "1") != "0"


def _template_config() -> str:
    setup = INIT.split(_SETUP_FROM, 1)[1].split(_SETUP_TO, 1)[0]
    return (
        "# Sourced by /init in a template VM; never returns to it.\n"
        "SBX_HOSTNAME=sealbox SBX_DISK=50% SBX_ADDRESS= SBX_GATEWAY= SBX_LAYER=\n"
        + setup + _SETUP_TO
        + "/usr/bin/setpriv --no-new-privs /usr/bin/python3 -I /.sealbox/identity.py"
        " </dev/null &\nwait\necho 'init: agent exited'\nreboot -f\n"
    )


def template_files() -> dict[str, bytes]:
    """The archive put before the base initramfs of a template VM."""
    files = {".init/sandbox/config.sh": _template_config().encode()}
    for name in _GUEST_FILES:
        files[f".init/sandbox/files/.sealbox/{name}"] = (_GUEST_DIR / name).read_bytes()
    return files


def machine_key(qemu_argv: list[str], inputs: list[Path]) -> str:
    """Changes whenever a restore could not match a saved state: QEMU's command line (device
    model, memory, vCPUs, kernel command line) and the files behind it."""
    h = hashlib.sha256()
    h.update(json.dumps([*qemu_argv, *SAVE_ARGS]).encode())
    for p in inputs:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}\n".encode())
    return h.hexdigest()[:24]


def template_key(qemu_argv: list[str], inputs: list[Path]) -> str:
    """`machine_key`, and the guest code the template runs."""
    h = hashlib.sha256(machine_key(qemu_argv, inputs).encode())
    for name, data in sorted(template_files().items()):
        h.update(name.encode() + hashlib.sha256(data).digest())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class Template:
    dir: Path

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def state(self) -> Path:
        return self.dir / "state.bin"

    @classmethod
    def find(cls, key: str) -> Template | None:
        t = cls(TEMPLATES / key)
        return (t if t.initrd.is_file() and t.state.is_file() and (t.dir / RAM_INFO).is_file()
                else None)


BuildArgs = Callable[[Path, Path], list[str]]
"""(initrd, agent socket) -> QEMU's argv for the template, without -qmp."""


def ensure(key: str, initrd: bytes, build_args: BuildArgs, memory: int, uid: int,
           groups: tuple[int, ...] = ()) -> Template:
    """The template for KEY (a VM of MEMORY bytes), built (once, under a lock) if missing, by a
    QEMU running as UID with extra GROUPS; older templates are removed."""
    TEMPLATES.mkdir(parents=True, exist_ok=True)
    with open(TEMPLATES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = Template.find(key)
        if found is not None:
            return found
        for old in TEMPLATES.iterdir():
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        tmp = TEMPLATES / f"{key}.tmp"
        tmp.mkdir(mode=0o755)
        try:
            (tmp / "initrd.img").write_bytes(initrd)
            (tmp / "initrd.img").chmod(0o644)
            _build(Template(tmp), build_args, memory, uid, groups)
            tmp.rename(TEMPLATES / key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Template(TEMPLATES / key)


def _build(t: Template, build_args: BuildArgs, memory: int, uid: int,
           groups: tuple[int, ...]) -> None:
    """Boot the template until its guest says ready, then save it, stopped, to t.state."""
    sockets = t.dir / "run"
    sockets.mkdir(mode=0o700)
    os.chown(sockets, uid, uid)
    agent_sock, qmp_sock = sockets / "agent.sock", sockets / "qmp.sock"
    args = build_args(t.initrd, agent_sock) + [*SAVE_ARGS,
                                               "-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    deadline = time.monotonic() + BUILD_TIMEOUT
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, user=uid, group=uid,
                            extra_groups=list(groups))

    def alive() -> bool:
        return proc.poll() is None

    try:
        with _connect(agent_sock, alive, deadline) as agent:
            agent.settimeout(max(0.1, deadline - time.monotonic()))
            if agent.makefile("rb").readline() != identity.READY:
                raise SandboxError("template VM did not reach its identity step")
            with qmp_session(qmp_sock, deadline, alive) as qmp:
                save(qmp, t.state, deadline, memory)
    except (OSError, SandboxError) as exc:
        proc.kill()
        out = proc.communicate()[0].decode(errors="replace").strip()
        raise SandboxError(f"microvm template build failed: {exc}: {out[-1500:]}") from exc
    finally:
        proc.kill()
        proc.communicate()
        shutil.rmtree(sockets, ignore_errors=True)


def save(qmp: Qmp, state: Path, deadline: float, memory: int) -> None:
    """Stop the VM and save it (devices and memory) to STATE; it stays stopped. Root opens
    the file and hands QEMU (unprivileged) only the descriptor. Its guest RAM (MEMORY bytes)
    is then made an image that restores map copy-on-write (`make_ram_image`)."""
    qmp.call("stop")
    qmp.call("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
    fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # An fd set, not a named fd: mapped-ram writes at offsets, which QEMU does only
        # through its file: transport.
        qmp.call("add-fd", {"fdset-id": STATE_FDSET}, fd=fd)
    finally:
        os.close(fd)
    try:
        qmp.call("migrate", {"uri": f"file:/dev/fdset/{STATE_FDSET}"})
        while (status := qmp.call("query-migrate").get("status")) not in (
                "completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                qmp.call("migrate_cancel")
                raise SandboxError("saving the VM timed out")
            time.sleep(0.02)
    finally:
        qmp.call("remove-fd", {"fdset-id": STATE_FDSET})
    if status != "completed":
        raise SandboxError(f"saving the VM failed: {status}")
    make_ram_image(state, memory)


def make_ram_image(state: Path, memory: int) -> None:
    """Make the guest RAM in a mapped-ram STATE file an image restores map instead of load.

    The RAM block's pages sit at a fixed, aligned offset; a restore maps them privately
    (copy-on-write: every VM restored from one file shares the pages none of them wrote) and
    reads the rest of the stream. Its page bitmap is cleared so that the restore loads no page
    over the mapping. The offset is found right after the save, in QEMU's own stream, and kept
    beside it (RAM_INFO) so a restore never searches a file holding guest memory.
    """
    name = RAM_ID.encode()
    lead = bytes([len(name)]) + name + struct.pack(">Q", memory)
    pages = memory // 4096
    bitmap_size = (pages + 63) // 64 * 8
    with open(state, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        # The RAM section opens the stream and lists blocks biggest first, so guest RAM's
        # header is within its first bytes, before any guest-written byte: a guest cannot
        # plant a false one.
        head = f.read(1 << 20)
        at = head.find(lead)
        header = head[at + len(lead):at + len(lead) + _RAM_HEADER.size] if at >= 0 else b""
        if len(header) != _RAM_HEADER.size:
            raise SandboxError("saved VM has no mapped RAM block (QEMU without mapped-ram?)")
        version, page_size, bitmap_at, pages_at = _RAM_HEADER.unpack(header)
        header_at = at + len(lead)
        if (version != 1 or page_size != 4096 or bitmap_at != header_at + _RAM_HEADER.size
                or pages_at % _RAM_ALIGN or pages_at < bitmap_at + bitmap_size
                or pages_at + memory > size):
            raise SandboxError("saved VM's RAM block is not in the layout this sealbox maps")
        f.seek(bitmap_at)
        f.write(bytes(bitmap_size))
    # QEMU reopens it read-only through a descriptor root hands it; the directories above stay
    # closed to every other uid.
    os.chmod(state, 0o644)
    (state.parent / RAM_INFO).write_text(json.dumps({"offset": pages_at, "size": memory}))


@dataclass(frozen=True)
class Restore:
    """A saved state to restore, opened read-only by root, as two descriptors: QEMU maps one
    (guest RAM) and reads the rest of the stream through the other (its fd set closes what it
    is given)."""

    ram_fd: int
    stream_fd: int
    dir: Path
    """Where the state and its RAM_INFO are."""


def memory_args(memory: int, restore: Restore | None = None) -> list[str]:
    """QEMU's arguments for guest RAM: anonymous for a boot. For a RESTORE, the saved RAM
    mapped privately and read-only on the host side (no guest write ever reaches the file),
    and the rest of the saved stream as the incoming migration."""
    if restore is None:
        return ["-object", f"memory-backend-ram,id={RAM_ID},size={memory >> 20}M"]
    try:
        info = json.loads((restore.dir / RAM_INFO).read_text())
        offset = int(info["offset"])
        if int(info["size"]) != memory:
            raise ValueError(f"saved with {info['size']} bytes of RAM")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SandboxError(f"the saved VM's memory image is unusable: {exc}") from exc
    return ["-object", f"memory-backend-file,id={RAM_ID},size={memory >> 20}M,"
                       f"mem-path=/proc/self/fd/{restore.ram_fd},offset={offset},share=off,"
                       "readonly=on,rom=off",
            "-add-fd", f"fd={restore.stream_fd},set={STATE_FDSET}",
            "-incoming", f"file:/dev/fdset/{STATE_FDSET}"]


@contextlib.contextmanager
def qmp_session(path: Path, deadline: float, alive: Callable[[], bool] = lambda: True
                ) -> Iterator[Qmp]:
    """A QMP connection to the QEMU listening at PATH, past its capabilities handshake."""
    with _connect(path, alive, deadline) as conn:
        qmp = Qmp(conn)
        qmp.call("qmp_capabilities")
        yield qmp


@contextlib.contextmanager
def _connect(path: Path, alive: Callable[[], bool], deadline: float) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        while True:
            try:
                s.connect(str(path))
                break
            except OSError:
                if not alive() or time.monotonic() > deadline:
                    raise SandboxError("the VM exited or did not start") from None
                time.sleep(0.05)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        yield s


class Qmp:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._read()  # the greeting

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise SandboxError("QMP connection closed")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             fd: int | None = None) -> dict[str, Any]:
        msg = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        fds = [fd] if fd is not None else []
        socket.send_fds(self._sock, [msg.encode() + b"\n"], fds)
        while True:
            reply = self._read()
            if "error" in reply:
                raise SandboxError(f"QMP {command}: {reply['error'].get('desc', reply)}")
            if "return" in reply:
                result: dict[str, Any] = reply["return"] if isinstance(reply["return"], dict) else {}
                return result
            # anything else is an asynchronous event


# ----- restore -------------------------------------------------------------------------------
def identity_message(settings: dict[str, str], env: dict[str, str],
                     files: dict[str, bytes]) -> bytes:
    """What `guest/identity.py` reads: SETTINGS are /init's SBX_* values for a cold boot."""
    body = json.dumps({
        "hostname": settings["SBX_HOSTNAME"], "disk": settings["SBX_DISK"],
        "address": settings["SBX_ADDRESS"], "gateway": settings["SBX_GATEWAY"],
        "nproc": int(settings["SBX_NPROC"]) if settings["SBX_NPROC"] else None,
        "env": env, "files": {"/" + k.lstrip("/"): base64.b64encode(v).decode()
                              for k, v in files.items()},
        # Read as late as possible: the guest sets its clock and reseeds its RNG from these.
        "time": time.time(), "entropy": base64.b64encode(os.urandom(64)).decode(),
    }).encode()
    return struct.pack(">I", len(body)) + body


async def hand_identity(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        message: bytes) -> None:
    """Send a restored guest its identity and wait until it has applied it."""
    writer.write(message)
    await writer.drain()
    while True:
        line = await reader.readline()
        if line == identity.READY:  # said again after the restore: the message is on its way
            continue
        if line == b"ok\n":
            return
        why = line.decode(errors="replace").strip() or "the channel closed"
        raise SandboxError(f"restored microVM did not take its identity: {why}")
