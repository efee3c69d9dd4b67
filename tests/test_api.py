"""The REST control plane end to end: a real uvicorn server in a subprocess, real HTTP clients.

Every response is checked against the server's own /openapi.json (the path and method exist,
the status is documented, and JSON bodies match their schema).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.schemas import OpenApiSchema
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from support.server import ADMIN_KEY, Server, start_server

pytestmark = pytest.mark.privileged

MiB = 1024 * 1024


def leftovers(sandbox_ids: list[str]) -> list[str]:
    found = [f"netns sealbox-{i}" for i in sandbox_ids if Path(f"/run/netns/sealbox-{i}").exists()]
    for i in sandbox_ids:
        found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/sealbox/{i}")]
        found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"sealbox/{i}")]
    return found


# ----- a client that checks every response against the OpenAPI document ------------------------

class Api:
    def __init__(self, url: str, schema: OpenApiSchema, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url
        self.key = key
        self.schema = schema
        self.http = httpx.Client(base_url=url, headers=headers, timeout=60)

    def check(self, resp: httpx.Response, body: bool = True) -> httpx.Response:
        op = self.schema.find_operation_by_path(resp.request.method, resp.request.url.path)
        assert op is not None, f"{resp.request.method} {resp.request.url.path} is not in /openapi.json"
        documented = {str(code) for code in op.definition.raw.get("responses", {})}
        assert str(resp.status_code) in documented, (
            f"{resp.request.method} {resp.request.url.path} answered {resp.status_code}, "
            f"documented: {sorted(documented)}; body: {resp.text[:300] if body else '(stream)'}")
        # The validator needs the request body, which a streamed upload no longer has.
        if body and not isinstance(resp.request.stream, httpx.SyncByteStream | httpx.AsyncByteStream):
            op.validate_response(resp)
        return resp

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.check(self.http.request(method, path, **kw))

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)

    def close(self) -> None:
        self.http.close()

    @contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        with self.http.stream(method, path, **kw) as resp:
            yield self.check(resp, body=False)


def error_code(resp: httpx.Response) -> str:
    code: str = resp.json()["error"]["code"]
    assert resp.json()["error"]["message"]
    return code


# ----- fixtures: server → tenants → sandbox -----------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("api") / "data"
    srv = start_server(data_dir)
    yield srv
    if srv.proc.poll() is None:  # not yet stopped by test_shutdown_kills_every_sandbox
        assert srv.stop(), srv.log.read_text()


@pytest.fixture(scope="module")
def schema(server: Server) -> OpenApiSchema:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    loaded: OpenApiSchema = schemathesis.openapi.from_dict(doc)
    return loaded


@pytest.fixture(scope="module")
def admin(server: Server, schema: OpenApiSchema) -> Iterator[Api]:
    api = Api(server.url, schema, ADMIN_KEY)
    yield api
    api.close()


def _tenant(admin: Api, name: str) -> Iterator[Api]:
    resp = admin.post("/v1/keys", json={"tenant": name})
    assert resp.status_code == 201
    key = resp.json()["key"]
    assert key.startswith("sbk_") and len(key) > 40
    api = Api(admin.url, admin.schema, key)
    yield api
    api.close()


@pytest.fixture(scope="module")
def alice(admin: Api) -> Iterator[Api]:
    yield from _tenant(admin, "alice")


@pytest.fixture(scope="module")
def bob(admin: Api) -> Iterator[Api]:
    yield from _tenant(admin, "bob")


@pytest.fixture(scope="module")
def sandbox(server: Server, alice: Api) -> Iterator[str]:
    resp = alice.post("/v1/sandboxes", json={
        "runtime": "namespace", "timeout": "10m", "env": {"GREETING": "hi"},
        "secrets": {"API_TOKEN": {"value": "real-secret-value-123", "hosts": ["api.example.com"]}},
    })
    assert resp.status_code == 201, resp.text
    info = resp.json()
    yield info["id"]
    if server.proc.poll() is None:  # else test_shutdown_kills_every_sandbox ended it
        alice.delete(sb(info["id"]))


def sb(sandbox_id: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{sandbox_id}{rest}"


# ----- lifecycle --------------------------------------------------------------------------------

def test_health_needs_no_key(server: Server, schema: OpenApiSchema) -> None:
    anonymous = Api(server.url, schema, None)
    resp = anonymous.get("/v1/health")
    anonymous.close()
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


def test_openapi_documents_errors_not_422(schema: OpenApiSchema, admin: Api) -> None:
    doc = admin.http.get("/openapi.json").json()
    assert "/v1/sandboxes/{sandbox_id}/exec" in doc["paths"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], f"{method} {path}"


def test_create_shows_placeholder_never_the_value(alice: Api, sandbox: str) -> None:
    resp = alice.get(sb(sandbox))
    assert resp.status_code == 200
    info = resp.json()
    assert info["state"] == "running" and info["owner"] == "alice"
    assert info["secrets"]["API_TOKEN"]["placeholder"].startswith("sealbox-secret-")
    assert "real-secret-value-123" not in resp.text
    listed = alice.get("/v1/sandboxes").json()
    assert sandbox in [i["id"] for i in listed]


def test_exec(alice: Api, sandbox: str) -> None:
    resp = alice.post(sb(sandbox, "/exec"), json={"cmd": "echo $GREETING; echo oops >&2; exit 3"})
    assert resp.status_code == 200
    result = resp.json()
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (3, "hi\n", "oops\n")
    resp = alice.post(sb(sandbox, "/exec"), json={"cmd": ["cat"], "stdin": "fed"})
    assert resp.json()["stdout"] == "fed"


def test_exec_stream_yields_chunks_as_they_come(alice: Api, sandbox: str) -> None:
    cmd = "for i in 1 2 3; do echo tick$i; echo err$i >&2; sleep 1; done; exit 7"
    events: list[tuple[float, dict[str, Any]]] = []
    with alice.stream("POST", sb(sandbox, "/exec"), params={"stream": "true"},
                      json={"cmd": cmd}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        for line in resp.iter_lines():
            if line.strip():
                events.append((time.monotonic(), json.loads(line)))
    kinds = [e["type"] for _, e in events]
    assert kinds[-1] == "exit" and "stdout" in kinds and "stderr" in kinds
    stdout = b"".join(base64.b64decode(e["data"]) for _, e in events if e["type"] == "stdout")
    assert stdout == b"tick1\ntick2\ntick3\n"
    first_at = next(t for t, e in events if e["type"] == "stdout")
    exit_at, exit_event = events[-1]
    assert exit_at - first_at > 1.5, "output was buffered until the command ended"
    assert exit_event["exit_code"] == 7 and exit_event["stdout"] == "tick1\ntick2\ntick3\n"


def test_files_roundtrip_5mb_streamed(alice: Api, sandbox: str) -> None:
    chunk = os.urandom(MiB)
    digest = hashlib.sha256(chunk * 5).hexdigest()

    def body() -> Iterator[bytes]:
        for _ in range(5):
            yield chunk

    resp = alice.put(sb(sandbox, "/files"), params={"path": "/workspace/big.bin", "mode": "600"},
                     content=body())
    assert resp.status_code == 204, resp.text
    got = hashlib.sha256()
    size = 0
    with alice.stream("GET", sb(sandbox, "/files"), params={"path": "/workspace/big.bin"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/octet-stream"
        for part in resp.iter_bytes():
            got.update(part)
            size += len(part)
    assert (size, got.hexdigest()) == (5 * MiB, digest)
    stat = alice.get(sb(sandbox, "/files/stat"), params={"path": "/workspace/big.bin"}).json()
    assert stat["size"] == 5 * MiB


def test_file_operations(alice: Api, sandbox: str) -> None:
    assert alice.post(sb(sandbox, "/files/mkdir"), json={"path": "/workspace/d/e"}).status_code == 204
    alice.put(sb(sandbox, "/files"), params={"path": "/workspace/d/a.txt"}, content=b"A")
    resp = alice.post(sb(sandbox, "/files/rename"),
                      json={"src": "/workspace/d/a.txt", "dst": "/workspace/d/b.txt"})
    assert resp.status_code == 204
    names = {e["name"] for e in alice.get(sb(sandbox, "/files/list"),
                                          params={"path": "/workspace/d"}).json()}
    assert names == {"e", "b.txt"}
    assert alice.get(sb(sandbox, "/files"), params={"path": "/workspace/d/b.txt"}).content == b"A"
    resp = alice.get(sb(sandbox, "/files"), params={"path": "/workspace/d/a.txt"})
    assert resp.status_code == 404 and error_code(resp) == "not_found"
    resp = alice.delete(sb(sandbox, "/files"), params={"path": "/workspace/d", "recursive": "true"})
    assert resp.status_code == 204
    resp = alice.get(sb(sandbox, "/files/stat"), params={"path": "/workspace/d"})
    assert resp.status_code == 404


def test_egress_policy_and_logs(alice: Api, sandbox: str) -> None:
    resp = alice.put(sb(sandbox, "/egress"), json={"allow_net": ["example.org"]})
    assert resp.status_code == 200 and resp.json()["allow_net"] == ["example.org"]
    assert alice.get(sb(sandbox, "/egress")).status_code == 200
    kinds = [e["kind"] for e in alice.get(sb(sandbox, "/logs")).json()]
    assert "created" in kinds and "exec" in kinds


def test_pause_resume(alice: Api, sandbox: str) -> None:
    assert alice.post(sb(sandbox, "/pause")).json()["state"] == "paused"
    resp = alice.post(sb(sandbox, "/exec"), json={"cmd": "true"})
    assert resp.status_code == 409, resp.text
    assert alice.post(sb(sandbox, "/resume")).json()["state"] == "running"
    assert alice.post(sb(sandbox, "/exec"), json={"cmd": "true"}).json()["exit_code"] == 0


def test_kill_then_gone(alice: Api) -> None:
    sandbox_id = alice.post("/v1/sandboxes", json={"runtime": "namespace"}).json()["id"]
    resp = alice.delete(sb(sandbox_id))
    assert resp.status_code == 200 and resp.json()["state"] == "killed"
    assert leftovers([sandbox_id]) == []
    resp = alice.post(sb(sandbox_id, "/exec"), json={"cmd": "true"})
    assert resp.status_code == 410 and error_code(resp) == "sandbox_gone"
    assert sandbox_id not in [i["id"] for i in alice.get("/v1/sandboxes").json()]
    ended = alice.get("/v1/sandboxes", params={"all": "true"}).json()
    assert sandbox_id in [i["id"] for i in ended]


# ----- auth, tenants and bad input ------------------------------------------------------------

def test_missing_or_wrong_key_is_401(server: Server, schema: OpenApiSchema) -> None:
    for key in (None, "sbk_wrong"):
        client = Api(server.url, schema, key)
        resp = client.get("/v1/sandboxes")
        client.close()
        assert resp.status_code == 401 and error_code(resp) == "unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"
    with httpx.Client() as raw:
        resp = raw.get(f"{server.url}/v1/sandboxes", headers={"Authorization": f"Basic {ADMIN_KEY}"})
    assert resp.status_code == 401


def test_only_admin_creates_keys(alice: Api, admin: Api) -> None:
    resp = alice.post("/v1/keys", json={"tenant": "mallory"})
    assert resp.status_code == 403 and error_code(resp) == "forbidden"
    for bad in ("admin", "Bad Name", ""):
        resp = admin.post("/v1/keys", json={"tenant": bad})
        assert resp.status_code == 400 and error_code(resp) == "invalid"


def test_other_tenants_sandbox_is_404(bob: Api, admin: Api, sandbox: str) -> None:
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", sb(sandbox), {}), ("DELETE", sb(sandbox), {}),
        ("POST", sb(sandbox, "/exec"), {"json": {"cmd": "id"}}),
        ("POST", sb(sandbox, "/pause"), {}), ("GET", sb(sandbox, "/logs"), {}),
        ("GET", sb(sandbox, "/egress"), {}),
        ("PUT", sb(sandbox, "/egress"), {"json": {"allow_net": ["*.evil.com"]}}),
        ("GET", sb(sandbox, "/files"), {"params": {"path": "/etc/hostname"}}),
        ("PUT", sb(sandbox, "/files"), {"params": {"path": "/tmp/x"}, "content": b"x"}),
    ]
    for method, path, kw in calls:
        resp = bob.request(method, path, **kw)
        assert resp.status_code == 404 and error_code(resp) == "not_found", (method, path)
    unknown = bob.get(sb("sbdoesnotexist0"))
    assert unknown.json()["error"]["message"].replace("sbdoesnotexist0", sandbox) == \
        bob.get(sb(sandbox)).json()["error"]["message"], "404s must not tell the two apart"
    assert sandbox not in [i["id"] for i in bob.get("/v1/sandboxes").json()]
    assert sandbox in [i["id"] for i in admin.get("/v1/sandboxes").json()]
    assert admin.get(sb(sandbox)).status_code == 200


def test_bad_input_is_400_json(alice: Api, sandbox: str) -> None:
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/sandboxes", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/sandboxes", {"json": {"workspace": "/etc"}}),
        ("POST", "/v1/sandboxes", {"json": {"no_such_field": 1}}),
        ("POST", "/v1/sandboxes", {"json": {"memory": "lots"}}),
        ("POST", "/v1/sandboxes", {"json": {"env": {"1BAD": "x"}}}),
        ("POST", sb(sandbox, "/exec"), {"json": {"cmd": ""}}),
        ("POST", sb(sandbox, "/exec"), {"json": ["not", "an", "object"]}),
        ("GET", sb(sandbox, "/files"), {}),
        ("PUT", sb(sandbox, "/files"), {"params": {"path": "/tmp/x", "mode": "999"}, "content": b""}),
        ("GET", "/v1/sandboxes", {"params": {"all": "maybe"}}),
    ]
    for method, path, kw in cases:
        resp = alice.request(method, path, **kw)
        assert resp.status_code == 400, (method, path, kw, resp.text)
        assert error_code(resp) == "invalid" and "Traceback" not in resp.text


def test_unknown_route_is_json_404(alice: Api) -> None:
    resp = alice.http.get("/v1/nothing-here")
    assert resp.status_code == 404 and error_code(resp) == "not_found"


# ----- PTY over WebSocket -----------------------------------------------------------------------

async def _read_until(ws: ClientConnection, needle: bytes, timeout: float = 15) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        msg = await _recv(ws, deadline)
        if isinstance(msg, bytes):
            seen += msg
    return seen


async def _recv(ws: ClientConnection, deadline: float) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))


def _ws_url(api: Api, sandbox_id: str, query: str) -> str:
    return api.url.replace("http", "ws", 1) + sb(sandbox_id, "/pty") + "?" + query


async def test_pty_interactive(alice: Api, sandbox: str) -> None:
    headers = {"Authorization": f"Bearer {alice.key}"}
    async with connect(_ws_url(alice, sandbox, "rows=24&cols=80"), additional_headers=headers) as ws:
        await ws.send(b"tty\n")
        assert b"/dev/pts/" in await _read_until(ws, b"/dev/pts/")
        await ws.send(b"echo round-$((6*7))-trip\n")
        await _read_until(ws, b"round-42-trip")
        await ws.send(json.dumps({"type": "resize", "rows": 40, "cols": 123}))
        await ws.send(b"stty size\n")
        await _read_until(ws, b"40 123")
        await ws.send(json.dumps({"type": "bogus"}))  # ignored, not fatal
        await ws.send(b"exit 3\n")
        deadline = time.monotonic() + 15
        while True:
            msg = await _recv(ws, deadline)
            if isinstance(msg, str):
                assert json.loads(msg) == {"type": "exit", "code": 3, "signal": None}
                break
        await ws.wait_closed()


async def test_pty_token_query_and_refusals(alice: Api, bob: Api, sandbox: str) -> None:
    async with connect(_ws_url(alice, sandbox, f"token={alice.key}")) as ws:
        await ws.send(b"echo via-token\n")
        await _read_until(ws, b"via-token")
    for query, status in ((f"token={bob.key}", 404), ("token=sbk_wrong", 401), ("", 401)):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(_ws_url(alice, sandbox, query)):
                pass
        assert refused.value.response.status_code == status
        assert json.loads(refused.value.response.body or b"{}")["error"]["code"] in (
            "not_found", "unauthorized")


# ----- shutdown (last: it stops the module's server) ----------------------------------------------

def test_shutdown_kills_every_sandbox(server: Server, alice: Api, sandbox: str) -> None:
    """SIGTERM with a command still streaming: the server exits 0 and nothing survives."""
    other = alice.post("/v1/sandboxes", json={"runtime": "namespace"}).json()["id"]
    ids = [sandbox, other]
    assert all(Path(f"/run/netns/sealbox-{i}").exists() for i in ids)
    streaming = threading.Event()

    def hold_a_stream() -> None:
        with contextlib.suppress(httpx.HTTPError), alice.stream(
                "POST", sb(other, "/exec"), params={"stream": "true"},
                json={"cmd": "echo started; sleep 600"}) as resp:
            for _ in resp.iter_lines():
                streaming.set()

    holder = threading.Thread(target=hold_a_stream)
    holder.start()
    assert streaming.wait(30)
    assert server.stop(), server.log.read_text()
    holder.join(30)
    assert not holder.is_alive(), "the open stream outlived the server"
    assert leftovers(ids) == []


def test_admin_key_file_created_once(tmp_path: Path, server: Server) -> None:
    """Without SEALBOX_ADMIN_KEY the first start writes one (0600) and prints only its path."""
    assert server.proc.poll() is not None, "runs after the shared server has stopped"
    data_dir = tmp_path / "data"
    keys = []
    for _ in range(2):
        srv = start_server(data_dir, admin_key=None)
        key_file = data_dir / "admin.key"
        keys.append(key_file.read_text().strip())
        with httpx.Client(base_url=srv.url) as raw:
            resp = raw.get("/v1/sandboxes", headers={"Authorization": f"Bearer {keys[-1]}"})
        assert srv.stop()
        log = srv.log.read_text()
        assert resp.status_code == 200
        assert str(key_file) in log and keys[-1] not in log
        assert key_file.stat().st_mode & 0o777 == 0o600
    assert keys[0] == keys[1] and keys[0].startswith("sbk_")
