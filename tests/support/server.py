"""A real sealbox server in a subprocess, as an operator starts it (tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ADMIN_KEY = "sbk_test-admin-key-0123456789abcdefghijklmnopqrstuv"
START_TIMEOUT = 30.0


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    ssh_port: int | None = None
    """The SSH gateway's port, if it was started with one."""

    def stop(self) -> bool:
        """SIGTERM, as an operator or systemd would; whether the server shut down cleanly."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        # uvicorn re-raises the signal once it has shut down, so -SIGTERM is a clean exit.
        return code in (0, -signal.SIGTERM) and "Traceback" not in self.log.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(data_dir: Path, admin_key: str | None = ADMIN_KEY,
                 ssh_port: int | None = None, volume_quota: int | None = None) -> Server:
    """A server on a free loopback port, answering; with the SSH gateway on SSH_PORT if given."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SEALBOX_ADMIN_KEY"}
    if admin_key is not None:
        env["SEALBOX_ADMIN_KEY"] = admin_key
    code = ("import sys; from pathlib import Path; from sealbox.api.server import run_server; "
            "run_server(port=int(sys.argv[1]), data_dir=Path(sys.argv[2]), log_level='warning',"
            " ssh_port=int(sys.argv[3]) if sys.argv[3] else None,"
            " volume_quota=int(sys.argv[4]) if sys.argv[4] else None)")
    log = data_dir.parent / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, str(port), str(data_dir),
                                 str(ssh_port or ""), str(volume_quota or "")], env=env,
                                stdout=out,
                                stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log, port, ssh_port)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited at start:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/v1/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server did not answer within {START_TIMEOUT}s:\n{log.read_text()}")


@contextmanager
def running_server(data_dir: Path, admin_key: str | None = ADMIN_KEY,
                   ssh_port: int | None = None) -> Iterator[Server]:
    """`start_server` for the block, stopped after it."""
    server = start_server(data_dir, admin_key, ssh_port)
    try:
        yield server
    finally:
        server.stop()
