"""Reaching into a sandbox, measured: preview URLs against a direct connection to the same
HTTP server outside any sandbox, and `ssh ID@host true` against `sealbox exec ID -- true`.

A real `sealbox server` (with the SSH gateway) runs in a subprocess, as an operator starts it;
the sandbox is a namespace sandbox running `python3 -m http.server`; the direct baseline is
the same command on the host, on loopback, serving the same files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

# The tests' server harness: a real `sealbox server` in a subprocess, as an operator runs it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.server import free_port, running_server  # noqa: E402

ADMIN_KEY = "sbk_bench-admin-key-0123456789abcdefghijklmnopqrstuv"
APP_PORT = 8080
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes",
            "-F", "/dev/null"]
SEALBOX = str(Path(sys.executable).with_name("sealbox"))


def wait_http(url: str, timeout: float = 30.0, **kw: object) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1, **kw)  # type: ignore[arg-type]
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:g}s") from None
            time.sleep(0.1)


@contextmanager
def process(argv: list[str], log: Path, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    """ARGV running for the block; SIGTERM (then SIGKILL) by its own pid afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def curl_speed(url: str, *args: str) -> float:
    r = subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{speed_download}",
                        *args, url], capture_output=True, text=True, timeout=300, check=True)
    return float(r.stdout)


def measure(tmp: Path, quick: bool) -> dict[str, tuple[list[float], list[float]]]:
    """{name: (through sealbox, baseline)} samples, seconds or bytes per second."""
    n_req, n_big, n_exec = (20, 2, 5) if quick else (100, 4, 15)
    data = tmp / "reach-data"
    direct_port = free_port()
    files = tmp / "reach-files"
    files.mkdir()
    (files / "small").write_bytes(b"x" * 1024)
    (files / "big").write_bytes(os.urandom(20 * 1024 * 1024))
    key = tmp / "reach-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    out: dict[str, tuple[list[float], list[float]]] = {}
    with (running_server(data, ADMIN_KEY, ssh_port=free_port()) as server,
          process([sys.executable, "-m", "http.server", str(direct_port), "--bind", "127.0.0.1",
                   "--directory", str(files)], tmp / "reach-direct.log")):
        url, ssh_port = server.url, server.ssh_port
        wait_http(f"http://127.0.0.1:{direct_port}/small")
        with httpx.Client(base_url=url, timeout=120,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
            api.post("/v1/ssh-keys", json={"public_key": key.with_suffix(".pub").read_text()}
                     ).raise_for_status()
            sid = api.post("/v1/sandboxes", json={"runtime": "namespace", "timeout": "30m"}
                           ).raise_for_status().json()["id"]
            try:
                for name in ("small", "big"):
                    api.put(f"/v1/sandboxes/{sid}/files", params={"path": f"/workspace/{name}"},
                            content=(files / name).read_bytes()).raise_for_status()
                api.post(f"/v1/sandboxes/{sid}/exec", json={
                    "cmd": f"python3 -m http.server {APP_PORT} --bind 0.0.0.0 "
                           "--directory /workspace", "background": True}).raise_for_status()
                exposed = api.post(f"/v1/sandboxes/{sid}/ports/{APP_PORT}/expose",
                                   json={"public": False}).raise_for_status().json()
                host = exposed["url"].split("//", 1)[1].rstrip("/")
                auth = {"Host": host, "X-Sealbox-Token": exposed["token"]}
                wait_http(f"{url}/small", headers=auth)
                with (httpx.Client(base_url=url, headers=auth) as preview,
                      httpx.Client(base_url=f"http://127.0.0.1:{direct_port}") as direct):
                    for c in (preview, direct):  # warm: connection open, caches filled
                        c.get("/small").raise_for_status()
                    out["latency"] = (
                        timed(lambda: preview.get("/small").raise_for_status(), n_req),
                        timed(lambda: direct.get("/small").raise_for_status(), n_req))
                curl_auth = ["-H", f"Host: {host}", "-H", f"X-Sealbox-Token: {exposed['token']}"]
                out["throughput"] = (
                    [curl_speed(f"{url}/big", *curl_auth) for _ in range(n_big)],
                    [curl_speed(f"http://127.0.0.1:{direct_port}/big") for _ in range(n_big)])
                ssh = ["ssh", *SSH_OPTS, "-i", str(key), "-p", str(ssh_port),
                       f"{sid}@127.0.0.1", "true"]
                cli = [SEALBOX, "exec", sid, "--", "true"]
                cli_env = {**os.environ, "SEALBOX_URL": url, "SEALBOX_API_KEY": ADMIN_KEY}
                out["ssh"] = (
                    timed(lambda: subprocess.run(ssh, check=True, timeout=60), n_exec),
                    timed(lambda: subprocess.run(cli, check=True, timeout=60, env=cli_env,
                                                 stdout=subprocess.DEVNULL), n_exec))
            finally:
                api.delete(f"/v1/sandboxes/{sid}")
    return out
