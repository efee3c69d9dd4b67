"""Inside a microVM template: wait for a sandbox's identity, apply it, become the agent.

A template VM boots once per kernel, rootfs and VM size, runs this as guest root (under
``setpriv --no-new-privs``) and is saved while it blocks on the virtio-serial port, with the
agent already imported. Every sandbox restored from it then sends one message over the port:
a 4-byte big-endian length and a JSON object with the sandbox's files, environment, hostname,
network, limits, the host's clock and fresh entropy. This applies them (the clock and the
kernel RNG first: every restored VM starts with the template's), answers ``ok``, drops to the
sandbox user and runs the agent in this same process, which is what makes a restore fast:
no interpreter start-up and no imports under emulation.

Standard library only; it runs in the guest, next to ``agent.py``.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from typing import Any

if __package__:
    from sealbox.guest import agent
else:  # run as a script from /.sealbox/, next to agent.py (-I leaves the script dir off path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import agent  # type: ignore[import-not-found, no-redef]

PORT = "/dev/virtio-ports/sealbox"
CGROUP = "/.init/cgroup/sandbox"
"""The sandbox's pids cgroup, which /init made."""
PIDS_EVENTS = CGROUP + "/pids.events"
SANDBOX_UID = 1000
BUSYBOX = "/.init/busybox"
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the CRNG from the input pool now
READY = b"ready\n"


def read_exact(fd: int, n: int) -> bytes | None:
    """N bytes from the port, or None if the host side closed it first."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def receive(fd: int) -> dict[str, Any]:
    """The identity message. A write blocks until a host is connected; a read returns EOF
    while none is (after a restore, until the new host connects), so each EOF means: say
    ready again and wait for the next host."""
    while True:
        os.write(fd, READY)
        head = read_exact(fd, 4)
        if head is None:
            continue
        body = read_exact(fd, struct.unpack(">I", head)[0])
        if body is not None:
            message: dict[str, Any] = json.loads(body)
            return message


def apply(msg: dict[str, Any]) -> None:
    with open("/dev/urandom", "wb", buffering=0) as rng:
        rng.write(base64.b64decode(msg["entropy"]))
        fcntl.ioctl(rng, RNDRESEEDCRNG)
    random.seed()
    time.clock_settime(time.CLOCK_REALTIME, float(msg["time"]))
    for path, data in msg["files"].items():
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        os.chmod(path, 0o644)
    socket.sethostname(msg["hostname"])
    # The template mounted these with a default size; the network card is the template's
    # too, now attached to this sandbox's tap.
    script = [f'mount -o remount,size="$1" {d}' for d in ("/tmp", "/var/tmp", "/dev/shm",
                                                           "/workspace")]
    if msg["address"]:
        script += ['ip link set eth0 up', 'ip addr add "$2" dev eth0',
                   'ip route add default via "$3"']
    subprocess.run([BUSYBOX, "sh", "-ec", "\n".join(script), "sh", msg["disk"],
                    msg["address"], msg["gateway"]], check=True, stdin=subprocess.DEVNULL)
    if msg["nproc"]:
        with open(os.path.join(CGROUP, "pids.max"), "w") as f:
            f.write(str(int(msg["nproc"])))
    with open(os.path.join(CGROUP, "cgroup.procs"), "w") as f:
        f.write("0")  # this process, which becomes the agent


def become_sandbox_user(env: dict[str, str]) -> None:
    """What ``setpriv --reuid --regid --clear-groups`` and ``env -i`` do on a cold boot (no new
    privileges was set when this started)."""
    os.chdir("/workspace")
    os.setgroups([])
    os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    os.environ.clear()
    os.environ.update(env)


def main() -> None:
    fd = os.open(PORT, os.O_RDWR | os.O_NOCTTY)
    try:
        msg = receive(fd)
        apply(msg)
    except Exception as exc:  # told to the host, which reports it; then the VM powers off
        os.write(fd, f"error {type(exc).__name__}: {exc}\n".encode())
        raise
    os.write(fd, b"ok\n")
    become_sandbox_user(msg["env"])
    # The agent keeps the port open: closing it would drop the host's first request.
    asyncio.run(agent.Agent("/workspace", PIDS_EVENTS).serve_serial(PORT, fd))


if __name__ == "__main__":
    main()
