"""Reaching into a sandbox: preview URLs and the SSH gateway, end to end.

A real server in a subprocess (with --ssh-port), the real OpenSSH client (ssh, scp, sftp),
httpx and websockets for previews, and services started inside a namespace sandbox.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import typer
from typer.testing import CliRunner

from sealbox.api.ssh import SAFE_INHERITED, _SandboxSFTP
from sealbox.cli import reach
from support.server import Server, free_port, start_server

pytestmark = pytest.mark.privileged

ADMIN_KEY = "sbk_reach-admin-key-0123456789abcdefghijklmnopqrstuv"
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=10", "-F", "/dev/null"]

# A small HTTP + WebSocket server for inside the sandbox (standard library only).
SANDBOX_APP = r'''
import base64, hashlib, json, socket, struct, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _send(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(4):
                data = f"data: tick{i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.6)
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/ws"):
            self.websocket()
        elif self.path.startswith("/headers"):
            body = json.dumps({"path": self.path, "headers": dict(self.headers.items())})
            self._send(200, body.encode(), "application/json")
        else:
            self._send(200, b"hello from the sandbox\n")
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self._send(200, b"got:" + self.rfile.read(n))
    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        r, w = self.rfile, self.wfile
        while True:
            head = r.read(2)
            if len(head) < 2:
                return
            op, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", r.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            if op == 8:
                w.write(b"\x88\x02\x03\xe8"); w.flush(); return
            if op in (1, 2):
                out = (b"echo:" if op == 1 else b"") + data
                hdr = bytes([0x80 | op])
                hdr += bytes([len(out)]) if len(out) < 126 else b"\x7e" + struct.pack(">H", len(out))
                w.write(hdr + out); w.flush()
        self.close_connection = True

ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''
APP_PORT = 8080


# ----- server and tenants ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("reach") / "data"
    srv = start_server(data_dir, ADMIN_KEY, ssh_port=free_port())
    yield srv
    srv.stop()
    text = srv.log.read_text()
    assert "Traceback" not in text, text
    key_file = data_dir / "ssh_host_ed25519_key"
    assert key_file.stat().st_mode & 0o777 == 0o600


def _client(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"},
                        timeout=60)


@dataclass
class Tenant:
    name: str
    key: str
    api: httpx.Client
    ssh_key: Path
    sandbox: str


def _keypair(directory: Path, name: str) -> Path:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test",
                    "-f", str(path)], check=True)
    return path


def _tenant(server: Server, tmp: Path, name: str) -> Iterator[Tenant]:
    with _client(server, ADMIN_KEY) as admin:
        resp = admin.post("/v1/keys", json={"tenant": name})
        assert resp.status_code == 201, resp.text
        key = resp.json()["key"]
    api = _client(server, key)
    ssh_key = _keypair(tmp, name)
    resp = api.post("/v1/ssh-keys", json={"public_key": ssh_key.with_suffix(".pub").read_text()})
    assert resp.status_code == 201, resp.text
    resp = api.post("/v1/sandboxes", json={"runtime": "namespace", "timeout": "10m"})
    assert resp.status_code == 201, resp.text
    sandbox = resp.json()["id"]
    yield Tenant(name, key, api, ssh_key, sandbox)
    api.delete(f"/v1/sandboxes/{sandbox}")
    api.close()


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys")
    path.chmod(0o700)
    return path


@pytest.fixture(scope="module")
def alice(server: Server, keydir: Path) -> Iterator[Tenant]:
    yield from _tenant(server, keydir, "alice")


@pytest.fixture(scope="module")
def bob(server: Server, keydir: Path) -> Iterator[Tenant]:
    yield from _tenant(server, keydir, "bob")


def run_in(t: Tenant, cmd: str, background: bool = False) -> dict[str, Any]:
    resp = t.api.post(f"/v1/sandboxes/{t.sandbox}/exec",
                      json={"cmd": cmd, "background": background})
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def wait_port(t: Tenant, port: int) -> None:
    probe = (f"python3 -c \"import socket,time\nfor _ in range(100):\n try:\n"
             f"  socket.create_connection(('127.0.0.1',{port}),1).close(); break\n"
             f" except OSError: time.sleep(0.1)\"")
    run_in(t, probe)


@pytest.fixture(scope="module")
def app(alice: Tenant) -> Tenant:
    """Alice's sandbox runs SANDBOX_APP on APP_PORT."""
    resp = alice.api.put(f"/v1/sandboxes/{alice.sandbox}/files",
                         params={"path": "/workspace/app.py"}, content=SANDBOX_APP.encode())
    assert resp.status_code == 204, resp.text
    run_in(alice, f"python3 /workspace/app.py {APP_PORT} >/tmp/app.log 2>&1", background=True)
    wait_port(alice, APP_PORT)
    return alice


def ssh_cmd(server: Server, t: Tenant, *args: str, key: Path | None = None,
            user: str | None = None) -> list[str]:
    return ["ssh", *SSH_OPTS, "-i", str(key or t.ssh_key), "-p", str(server.ssh_port),
            f"{user or t.sandbox}@127.0.0.1", *args]


# ----- SSH ------------------------------------------------------------------------------------

def test_ssh_command_exit_status(server: Server, alice: Tenant) -> None:
    proc = subprocess.run(ssh_cmd(server, alice, "echo hi; echo err >&2; exit 3"),
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == b"hi\n"
    assert proc.stderr == b"err\n"


def test_ssh_stdin_streams(server: Server, alice: Tenant) -> None:
    data = os.urandom(300_000)
    proc = subprocess.run(ssh_cmd(server, alice, "sha256sum"), input=data,
                          capture_output=True, timeout=60)
    import hashlib
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(fd: int, needle: bytes, timeout: float = 30) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {needle!r} in {out[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    assert needle in out, out[-500:]
    return out


def test_ssh_shell_has_a_pty_and_follows_resizes(server: Server, alice: Tenant) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: ssh on a real terminal
        os.execvp("ssh", ssh_cmd(server, alice, "-tt"))
    try:
        _set_size(fd, 40, 100)
        _read_until(fd, b"$")  # the prompt
        os.write(fd, b"tty; stty size\n")
        assert b"/dev/pts/" in _read_until(fd, b"40 100")
        _set_size(fd, 50, 120)  # the kernel sends SIGWINCH to ssh, which tells the server
        time.sleep(0.5)
        os.write(fd, b"stty size; exit 5\n")
        _read_until(fd, b"50 120")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 5
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_ssh_shell_reports_tty(server: Server, alice: Tenant) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("ssh", ssh_cmd(server, alice, "-tt"))
    try:
        _read_until(fd, b"$")
        os.write(fd, b"tty; exit\n")
        out = _read_until(fd, b"/dev/pts/")
        assert b"not a tty" not in out
        os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_scp_both_ways(server: Server, alice: Tenant, tmp_path: Path) -> None:
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(1_500_000))
    base = ["scp", *SSH_OPTS, "-i", str(alice.ssh_key), "-P", str(server.ssh_port)]
    target = f"{alice.sandbox}@127.0.0.1"
    for legacy in ("-O", None):  # the classic scp protocol, then scp over SFTP
        opts = [legacy] if legacy else []
        proc = subprocess.run([*base, *opts, str(src), f"{target}:/workspace/up.bin"],
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        result = run_in(alice, "sha256sum /workspace/up.bin")
        import hashlib
        assert result["stdout"].split()[0] == hashlib.sha256(src.read_bytes()).hexdigest()
        back = tmp_path / f"down{legacy or ''}.bin"
        proc = subprocess.run([*base, *opts, f"{target}:up.bin", str(back)],
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert back.read_bytes() == src.read_bytes()
        run_in(alice, "rm /workspace/up.bin")


def test_sftp_batch(server: Server, alice: Tenant, tmp_path: Path) -> None:
    local = tmp_path / "note.txt"
    local.write_text("sftp works\n")
    batch = tmp_path / "batch"
    batch.write_text(f"mkdir d\ncd d\nput {local} note.txt\nls -l\nrename note.txt n2.txt\n"
                     f"get n2.txt {tmp_path}/back.txt\nrm n2.txt\ncd ..\nrmdir d\npwd\n")
    proc = subprocess.run(["sftp", *SSH_OPTS, "-i", str(alice.ssh_key), "-P",
                           str(server.ssh_port), "-b", str(batch),
                           f"{alice.sandbox}@127.0.0.1"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.decode()
    assert "note.txt" in out and "/workspace" in out
    assert (tmp_path / "back.txt").read_text() == "sftp works\n"
    assert run_in(alice, "test -e /workspace/d; echo $?")["stdout"] == "1\n"


def test_sftp_missing_file_is_an_error(server: Server, alice: Tenant,
                                       tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    batch.write_text(f"get /nonexistent/file {tmp_path}/x\n")
    proc = subprocess.run(["sftp", *SSH_OPTS, "-i", str(alice.ssh_key), "-P",
                           str(server.ssh_port), "-b", str(batch),
                           f"{alice.sandbox}@127.0.0.1"], capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert b"not found" in proc.stderr.lower() or b"no such file" in proc.stderr.lower()


def test_local_forward_reaches_the_sandbox(server: Server, app: Tenant) -> None:
    local = free_port()
    proc = subprocess.Popen(ssh_cmd(server, app, "-N", "-o", "ExitOnForwardFailure=yes",
                                    "-L", f"127.0.0.1:{local}:localhost:{APP_PORT}"),
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                resp = httpx.get(f"http://127.0.0.1:{local}/", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        assert resp.text == "hello from the sandbox\n"
        curl = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{local}/"],
                              capture_output=True, timeout=30)
        assert curl.stdout == b"hello from the sandbox\n", curl.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_forward_elsewhere_is_refused(server: Server, alice: Tenant) -> None:
    async def main() -> None:
        async with asyncssh.connect(
            "127.0.0.1", server.ssh_port, username=alice.sandbox,
            client_keys=[str(alice.ssh_key)], known_hosts=None,
        ) as conn:
            for host, port in (("127.0.0.1", 22), ("10.77.0.1", server.port),
                               ("example.com", 80)):
                if host == "127.0.0.1":
                    continue
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection(host, port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "localhost", 80)

    asyncio.run(main())


def test_wrong_key_refused(server: Server, alice: Tenant, keydir: Path) -> None:
    stranger = _keypair(keydir, "stranger")
    proc = subprocess.run(ssh_cmd(server, alice, "true", key=stranger), capture_output=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 255
    assert b"Permission denied" in proc.stderr


def test_other_tenants_sandbox_refused(server: Server, alice: Tenant, bob: Tenant) -> None:
    proc = subprocess.run(ssh_cmd(server, alice, "true", user=bob.sandbox),
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 255 and b"Permission denied" in proc.stderr
    proc = subprocess.run(ssh_cmd(server, bob, "echo bob"), capture_output=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.stdout == b"bob\n", proc.stderr
    # and nobody gets in as a sandbox that does not exist
    proc = subprocess.run(ssh_cmd(server, alice, "true", user="sbnotasandbox1"),
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 255


def test_ssh_token_as_password(server: Server, alice: Tenant, bob: Tenant) -> None:
    resp = alice.api.post(f"/v1/sandboxes/{alice.sandbox}/ssh-token", json={"ttl": 60})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["port"] == server.ssh_port and body["username"] == alice.sandbox
    assert bob.api.post(f"/v1/sandboxes/{alice.sandbox}/ssh-token").status_code == 404

    async def run(user: str, password: str) -> str:
        async with asyncssh.connect("127.0.0.1", server.ssh_port, username=user,
                                    password=password, known_hosts=None, client_keys=None,
                                    preferred_auth="password") as conn:
            result = await conn.run("echo $SEALBOX_SANDBOX_ID", check=True)
            return str(result.stdout)

    assert asyncio.run(run(alice.sandbox, body["token"])).strip() == alice.sandbox
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(run(bob.sandbox, body["token"]))  # the token is for alice's sandbox only
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(run(alice.sandbox, "sbs_wrong"))


def test_ssh_keys_api(server: Server, alice: Tenant, bob: Tenant, keydir: Path) -> None:
    extra = _keypair(keydir, "extra")
    resp = alice.api.post("/v1/ssh-keys", json={"public_key": "not a key"})
    assert resp.status_code == 400
    added = alice.api.post("/v1/ssh-keys",
                           json={"public_key": extra.with_suffix(".pub").read_text()}).json()
    fingerprints = [k["fingerprint"] for k in alice.api.get("/v1/ssh-keys").json()]
    assert added["fingerprint"] in fingerprints
    assert added["fingerprint"] not in [k["fingerprint"] for k in bob.api.get("/v1/ssh-keys").json()]
    keygen = subprocess.run(["ssh-keygen", "-lf", str(extra.with_suffix(".pub"))],
                            capture_output=True, text=True, check=True)
    assert added["fingerprint"] in keygen.stdout
    proc = subprocess.run(ssh_cmd(server, alice, "echo ok", key=extra), capture_output=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.stdout == b"ok\n"
    assert bob.api.delete(f"/v1/ssh-keys/{added['fingerprint']}").status_code == 404
    assert alice.api.delete(f"/v1/ssh-keys/{added['fingerprint']}").status_code == 204
    proc = subprocess.run(ssh_cmd(server, alice, "echo ok", key=extra), capture_output=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 255


def test_sftp_server_overrides_every_host_operation() -> None:
    """Anything inherited from asyncssh.SFTPServer would act on the host's own files."""
    for name, _ in inspect.getmembers(asyncssh.SFTPServer):
        if name.startswith("_") or name in SAFE_INHERITED:
            continue
        assert name in vars(_SandboxSFTP), f"SFTPServer.{name} is not overridden"


# ----- previews -------------------------------------------------------------------------------

def expose(t: Tenant, port: int, public: bool = False) -> dict[str, Any]:
    resp = t.api.post(f"/v1/sandboxes/{t.sandbox}/ports/{port}/expose", json={"public": public})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def host_of(url: str) -> str:
    return url.split("//", 1)[1].split("/", 1)[0]


def test_preview_private_by_default(server: Server, app: Tenant, bob: Tenant) -> None:
    exposed = expose(app, APP_PORT)
    assert exposed["url"] == f"http://{APP_PORT}-{app.sandbox}.localhost:{server.port}/"
    host = {"Host": host_of(exposed["url"])}
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        resp = anon.get("/", headers=host)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
        resp = anon.get("/", headers=host, params={"sealbox_token": "sbp_wrong"})
        assert resp.status_code == 401
        # bob's key is valid, but not for alice's sandbox: like a sandbox that does not exist
        resp = anon.get("/", headers={**host, "Authorization": f"Bearer {bob.key}"})
        assert resp.status_code == 404
        # the token works: as a query parameter, header, or the cookie the first one set
        resp = anon.get("/", headers=host, params={"sealbox_token": exposed["token"]})
        assert resp.status_code == 200 and resp.text == "hello from the sandbox\n"
        assert "sealbox_token=" in resp.headers["set-cookie"]
        resp = anon.get("/", headers={**host, "X-Sealbox-Token": exposed["token"]})
        assert resp.text == "hello from the sandbox\n"
        resp = anon.get("/", headers={**host, "Cookie": f"sealbox_token={exposed['token']}"})
        assert resp.text == "hello from the sandbox\n"
        # the token is for this port only
        other = anon.get("/", headers={"Host": f"9999-{app.sandbox}.localhost:{server.port}"},
                         params={"sealbox_token": exposed["token"]})
        assert other.status_code == 401
        # path form, with the owner's API key
        resp = anon.get(f"/v1/sandboxes/{app.sandbox}/ports/{APP_PORT}/",
                        headers={"Authorization": f"Bearer {app.key}"})
        assert resp.text == "hello from the sandbox\n"
        resp = anon.get(f"/v1/sandboxes/{app.sandbox}/ports/{APP_PORT}/")
        assert resp.status_code == 401


def test_preview_never_forwards_credentials(server: Server, app: Tenant) -> None:
    exposed = expose(app, APP_PORT)
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        resp = anon.get("/headers?a=1", headers={
            "Host": host_of(exposed["url"]), "X-Sealbox-Token": exposed["token"],
            "Cookie": f"theme=dark; sealbox_token={exposed['token']}"})
        seen = resp.json()
        resp = anon.get(f"/v1/sandboxes/{app.sandbox}/ports/{APP_PORT}/headers",
                        params={"sealbox_token": exposed["token"], "b": "2"},
                        headers={"Authorization": f"Bearer {app.key}"})
        seen2 = resp.json()
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == "/headers?a=1"
    assert "x-sealbox-token" not in headers and exposed["token"] not in str(seen)
    assert headers["cookie"] == "theme=dark"
    assert headers["host"] == host_of(exposed["url"])
    assert seen2["path"] == "/headers?b=2"
    assert app.key not in str(seen2) and exposed["token"] not in str(seen2)


def test_preview_public(server: Server, app: Tenant) -> None:
    exposed = expose(app, APP_PORT, public=True)
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        resp = anon.get("/", headers={"Host": host_of(exposed["url"])})
        assert resp.status_code == 200 and resp.text == "hello from the sandbox\n"
        resp = anon.post("/echo", headers={"Host": host_of(exposed["url"])}, content=b"x" * 100)
        assert resp.text == "got:" + "x" * 100
    expose(app, APP_PORT, public=False)  # back to private for the other tests


def test_preview_streams_and_keeps_alive(server: Server, app: Tenant) -> None:
    exposed = expose(app, APP_PORT)
    arrivals: list[tuple[float, bytes]] = []
    headers = {"Host": host_of(exposed["url"]), "X-Sealbox-Token": exposed["token"]}
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        start = time.monotonic()
        with anon.stream("GET", "/stream", headers=headers) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "text/event-stream"
            for chunk in resp.iter_raw():
                arrivals.append((time.monotonic() - start, chunk))
        for _ in range(3):  # the same client connection serves more requests (keep-alive)
            assert anon.get("/", headers=headers).status_code == 200
    body = b"".join(c for _, c in arrivals)
    assert body == b"".join(f"data: tick{i}\n\n".encode() for i in range(4))
    first = next(t for t, c in arrivals if b"tick0" in c)
    last = next(t for t, c in arrivals if b"tick3" in c)
    assert last - first > 1.2, arrivals  # chunks came as they were made, not all at the end


def test_preview_websocket(server: Server, app: Tenant) -> None:
    exposed = expose(app, APP_PORT)
    # The preview host name, connected to the server's loopback address.
    ws_url = f"ws://{host_of(exposed['url'])}/ws"
    to_server: dict[str, Any] = {"host": "127.0.0.1", "port": server.port}

    async def main() -> None:
        async with connect(ws_url, additional_headers={"X-Sealbox-Token": exposed["token"]},
                           **to_server) as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo:hi"
            await ws.send(b"\x00\x01" * 200)
            assert await ws.recv() == b"\x00\x01" * 200
        # path form, with the API key
        path_url = (f"ws://127.0.0.1:{server.port}/v1/sandboxes/{app.sandbox}/ports/"
                    f"{APP_PORT}/ws")
        async with connect(path_url, additional_headers={
                "Authorization": f"Bearer {app.key}"}) as ws:
            await ws.send("path")
            assert await ws.recv() == "echo:path"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url, **to_server):
                pass
        assert refused.value.response.status_code == 401

    asyncio.run(main())


def test_preview_nothing_listening_is_502(server: Server, app: Tenant) -> None:
    resp = app.api.get(f"/v1/sandboxes/{app.sandbox}/ports/9/")
    assert resp.status_code == 502 and resp.json()["error"]["message"]


def test_expose_checks_owner_and_port(app: Tenant, bob: Tenant) -> None:
    resp = bob.api.post(f"/v1/sandboxes/{app.sandbox}/ports/{APP_PORT}/expose", json={})
    assert resp.status_code == 404
    resp = app.api.post(f"/v1/sandboxes/{app.sandbox}/ports/70000/expose", json={})
    assert resp.status_code == 400


# ----- the sandbox cannot use these paths to reach the host -----------------------------------

def test_sandbox_cannot_reach_gateways_on_the_host(server: Server, alice: Tenant) -> None:
    script = (
        "import socket\n"
        "gw = [l.split() for l in open('/proc/net/route') if l.split()[1] == '00000000'][0][2]\n"
        "host = socket.inet_ntoa(bytes.fromhex(gw)[::-1])\n"
        f"for port in ({server.ssh_port}, {server.port}):\n"
        "    for addr in (host, '127.0.0.1'):\n"
        "        try:\n"
        "            s = socket.create_connection((addr, port), 3)\n"
        "            s.sendall(b'GET /v1/health HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n')\n"
        "            s.settimeout(3)\n"
        "            print(addr, port, repr(s.recv(200)))\n"
        "        except OSError as e:\n"
        "            print(addr, port, 'error', type(e).__name__)\n"
    )
    alice.api.put(f"/v1/sandboxes/{alice.sandbox}/files", params={"path": "/tmp/probe.py"},
                  content=script.encode())
    out = run_in(alice, "python3 /tmp/probe.py")["stdout"]
    assert out.count("\n") == 4, out
    assert "SSH-2.0" not in out and '"status"' not in out and "ok" not in out.lower(), out
    for line in out.splitlines():
        # loopback is the sandbox's own (nothing listens); the host address is the egress
        # gateway, which refuses anything not on the allowlist
        assert "error" in line or "403" in line or "b''" in line, out


# ----- ending ---------------------------------------------------------------------------------

def test_sessions_end_with_the_sandbox(server: Server, alice: Tenant) -> None:
    resp = alice.api.post("/v1/sandboxes", json={"runtime": "namespace", "timeout": "5m"})
    sandbox = resp.json()["id"]
    try:
        proc = subprocess.Popen(ssh_cmd(server, alice, "sleep 300", user=sandbox),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(2)
        assert proc.poll() is None
        exposed = expose(Tenant(alice.name, alice.key, alice.api, alice.ssh_key, sandbox), 80)
        alice.api.delete(f"/v1/sandboxes/{sandbox}")
        proc.communicate(timeout=15)
        assert proc.returncode != 0
        resp = httpx.get(f"{server.url}/", headers={"Host": host_of(exposed["url"]),
                                                     "X-Sealbox-Token": exposed["token"]})
        assert resp.status_code in (401, 404, 502)
        resp = alice.api.get(f"/v1/sandboxes/{sandbox}/ports/80/")
        assert resp.status_code in (404, 502)
        again = subprocess.run(ssh_cmd(server, alice, "true", user=sandbox),
                               capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert again.returncode == 255
    finally:
        alice.api.delete(f"/v1/sandboxes/{sandbox}")


# ----- CLI ------------------------------------------------------------------------------------

@pytest.fixture
def cli(server: Server, alice: Tenant, monkeypatch: pytest.MonkeyPatch) -> typer.Typer:
    monkeypatch.setenv("SEALBOX_URL", server.url)
    monkeypatch.setenv("SEALBOX_API_KEY", alice.key)
    app = typer.Typer()
    app.command()(reach.expose)
    app.command()(reach.code)
    app.add_typer(reach.ssh_key_app, name="ssh-key")
    return app


def test_cli_expose(server: Server, app: Tenant, cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["expose", app.sandbox, str(APP_PORT)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    url = lines[-1]
    assert url == f"http://{APP_PORT}-{app.sandbox}.localhost:{server.port}/"
    token = lines[0].split()[1]
    resp = httpx.get(f"{server.url}/", headers={"Host": host_of(url)},
                     params={"sealbox_token": token})
    assert resp.text == "hello from the sandbox\n"
    result = CliRunner().invoke(cli, ["expose", "sbnosuchsandbox", "80"])
    assert result.exit_code == 1 and "no sandbox" in result.output


def test_cli_ssh_keys(cli: typer.Typer, keydir: Path) -> None:
    key = _keypair(keydir, "clikey")
    runner = CliRunner()
    result = runner.invoke(cli, ["ssh-key", "add", str(key)])
    assert result.exit_code == 2 and "private key" in result.output
    result = runner.invoke(cli, ["ssh-key", "add", str(key.with_suffix(".pub"))])
    assert result.exit_code == 0, result.output
    fingerprint = result.output.split()[1]
    assert fingerprint.startswith("SHA256:")
    assert fingerprint in runner.invoke(cli, ["ssh-key", "ls"]).output
    assert runner.invoke(cli, ["ssh-key", "rm", fingerprint]).exit_code == 0
    assert fingerprint not in runner.invoke(cli, ["ssh-key", "ls"]).output
    assert runner.invoke(cli, ["ssh-key", "rm", fingerprint]).exit_code == 1


def test_cli_code_writes_an_idempotent_ssh_config(server: Server, alice: Tenant,
                                                  cli: typer.Typer, tmp_path: Path) -> None:
    config = tmp_path / "ssh" / "config"
    config.parent.mkdir()
    config.write_text("Host other\n    HostName example.invalid\n")
    args = ["code", alice.sandbox, "--ssh-config", str(config), "--identity", str(alice.ssh_key)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"code --remote ssh-remote+sealbox-{alice.sandbox} /workspace")
    first = config.read_text()
    assert first.startswith("Host other\n    HostName example.invalid\n")
    for line in (f"Host sealbox-{alice.sandbox}", "HostName 127.0.0.1",
                 f"Port {server.ssh_port}", f"User {alice.sandbox}"):
        assert line in first
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert config.read_text() == first  # idempotent
    assert config.stat().st_mode & 0o777 == 0o600
    # the block works as written, with the host key pinned (no trust on first use)
    proc = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes",
                           f"sealbox-{alice.sandbox}", "echo via-config"],
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.stdout == b"via-config\n", proc.stderr


def test_tools_present() -> None:
    for tool in ("ssh", "scp", "sftp", "ssh-keygen", "curl"):
        assert shutil.which(tool), tool
