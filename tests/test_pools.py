"""Warm pools: never the same sandbox twice, each claimant's own secrets and policy, refill,
the capacity cap, a server restart, and bad input (CLI and API)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import gone
from schemathesis.specs.openapi.schemas import OpenApiSchema

from sealbox.egress.gateway import ResolvePin
from sealbox.egress.secrets import SecretSpec
from sealbox.engine.config import EngineConfig
from sealbox.engine.engine import Engine
from sealbox.engine.pools import POOL_LABEL, PoolConfig, PoolStatus
from sealbox.engine.spec import ExecRequest, SandboxSpec
from sealbox.engine.templates import TemplateFile, TemplateSpec
from sealbox.runtimes import registry
from sealbox.engine import host_limits
from sealbox.errors import CapacityError, ConfigError, SandboxError
from support import upstream as fake_upstream
from support.server import ADMIN_KEY, start_server

SEALBOX = str(Path(sys.executable).parent / "sealbox")
READY_DEADLINE = 120.0
"""Generous: only a bound on waiting for a refill, never a measured claim."""


async def wait_ready(engine: Engine, key: str, ready: int) -> PoolStatus:
    deadline = time.monotonic() + READY_DEADLINE
    while True:
        status = next(p for p in engine.pools.list() if p.key == key)
        if status.ready == ready and status.booting == 0:
            return status
        assert time.monotonic() < deadline, f"pool {key} never reached {ready} ready: {status}"
        await asyncio.sleep(0.05)


def was_pooled(engine: Engine, sandbox_id: str) -> bool:
    created = [e for e in engine.logs(sandbox_id) if e.get("kind") == "created"]
    return bool(created) and bool(created[0].get("pooled"))


async def sh(engine: Engine, sandbox_id: str, cmd: str) -> tuple[int | None, str]:
    r = await engine.run(sandbox_id, ExecRequest(cmd=cmd, timeout=60))
    return r.exit_code, r.stdout + r.stderr


async def test_pool_never_hands_out_a_used_sandbox(engine: Engine) -> None:
    await engine.pools.set(PoolConfig(runtime="namespace", size=2))
    await wait_ready(engine, "base/namespace", 2)
    seen: list[str] = []
    for _ in range(5):
        info = await engine.create(SandboxSpec(runtime="namespace"))
        assert was_pooled(engine, info.id)
        assert POOL_LABEL not in info.metadata
        assert info.id not in seen
        seen.append(info.id)
        # No earlier claimant's marker, in any writable place.
        code, out = await sh(engine, info.id, "ls -A /workspace /tmp; test ! -e /tmp/marker "
                             "&& test ! -e /workspace/marker")
        assert code == 0, out
        assert "marker" not in out
        code, _ = await sh(engine, info.id, "echo used > /tmp/marker; echo used > /workspace/marker")
        assert code == 0
        await engine.kill(info.id)
        assert gone(info.id) == []
        await wait_ready(engine, "base/namespace", 2)  # refill returns the pool to its size
    # Every idle member is fresh too, and none of them was handed out before.
    idle = [i.id for i in engine.list() if i.metadata.get(POOL_LABEL) == "base/namespace"]
    assert len(idle) == 2 and not set(idle) & set(seen)
    # Nobody runs anything in an unclaimed member, not even the admin (owner None).
    with pytest.raises(SandboxError, match="unclaimed warm-pool member"):
        await engine.run(idle[0], ExecRequest(cmd="touch /tmp/planted"))
    with pytest.raises(SandboxError, match="unclaimed warm-pool member"):
        await engine.guest(idle[0]).write_file("/tmp/planted", b"x")
    # The clock starts at the claim, not at the boot.
    before = datetime.now(UTC)
    info = await engine.create(SandboxSpec(runtime="namespace", timeout=30))
    assert info.id in idle and info.created_at >= before
    assert info.expires_at is not None
    assert info.expires_at - info.created_at == timedelta(seconds=30)
    await engine.kill(info.id)


async def test_concurrent_claims_never_share_a_member(engine: Engine) -> None:
    await engine.pools.set(PoolConfig(runtime="namespace", size=3))
    await wait_ready(engine, "base/namespace", 3)
    infos = await asyncio.gather(*(engine.create(SandboxSpec(runtime="namespace"))
                                   for _ in range(6)))
    try:
        ids = [i.id for i in infos]
        assert len(set(ids)) == 6
        assert sum(was_pooled(engine, i) for i in ids) == 3
    finally:
        await asyncio.gather(*(engine.kill(i.id) for i in infos))


async def test_pool_limits_are_part_of_the_match(engine: Engine) -> None:
    await engine.pools.set(PoolConfig(runtime="namespace", size=1))
    await wait_ready(engine, "base/namespace", 1)
    (first,) = [i.id for i in engine.list() if i.metadata.get(POOL_LABEL)]
    status = await engine.pools.set(PoolConfig(runtime="namespace", size=1, memory="256MiB"))
    assert status.memory == 256 * 2**20
    await wait_ready(engine, "base/namespace", 1)
    assert gone(first) == []  # members with the old limits were replaced
    plain = await engine.create(SandboxSpec(runtime="namespace"))
    small = await engine.create(SandboxSpec(runtime="namespace", memory="256MiB"))
    try:
        assert not was_pooled(engine, plain.id) and was_pooled(engine, small.id)
        assert small.memory == 256 * 2**20
    finally:
        await engine.kill(plain.id)
        await engine.kill(small.id)


async def test_killed_idle_member_is_replaced_and_never_claimed(engine: Engine) -> None:
    await engine.pools.set(PoolConfig(runtime="namespace", size=1))
    await wait_ready(engine, "base/namespace", 1)
    (member,) = [i.id for i in engine.list() if i.metadata.get(POOL_LABEL)]
    await engine.kill(member)  # died while idle
    await wait_ready(engine, "base/namespace", 1)
    info = await engine.create(SandboxSpec(runtime="namespace"))
    assert info.id != member
    assert was_pooled(engine, info.id)
    await engine.kill(info.id)


async def test_template_pool_matches_what_the_claimant_means(engine: Engine,
                                                              tmp_path: Path) -> None:
    """Templates are per owner: a member is matched by the content it was booted from, so a
    tenant's own template of the same name, or a rebuilt one, never gets a stale member."""
    f = tmp_path / "who.txt"

    async def build(text: str, owner: str | None) -> None:
        f.write_text(text)
        await engine.build_template(TemplateSpec(
            name="tp", files=[TemplateFile(src=str(f), dest="/opt/who.txt")]), owner=owner)

    await build("operator\n", None)
    await build("alice\n", "alice")
    await engine.pools.set(PoolConfig(template="tp", runtime="namespace", size=1))
    await wait_ready(engine, "tp/namespace", 1)
    mine = await engine.create(SandboxSpec(runtime="namespace", template="tp"))
    theirs = await engine.create(SandboxSpec(runtime="namespace", template="tp"), owner="alice")
    plain = await engine.create(SandboxSpec(runtime="namespace"))
    try:
        assert was_pooled(engine, mine.id)
        assert not was_pooled(engine, theirs.id) and not was_pooled(engine, plain.id)
        assert await sh(engine, mine.id, "cat /opt/who.txt") == (0, "operator\n")
        assert await sh(engine, theirs.id, "cat /opt/who.txt") == (0, "alice\n")
    finally:
        for info in (mine, theirs, plain):
            await engine.kill(info.id)
    await wait_ready(engine, "tp/namespace", 1)
    await build("operator v2\n", None)  # the idle member now holds an outdated template
    again = await engine.create(SandboxSpec(runtime="namespace", template="tp"))
    try:
        assert await sh(engine, again.id, "cat /opt/who.txt") == (0, "operator v2\n")
    finally:
        await engine.kill(again.id)
    await wait_ready(engine, "tp/namespace", 1)
    newest = await engine.create(SandboxSpec(runtime="namespace", template="tp"))
    try:
        assert was_pooled(engine, newest.id)
        assert await sh(engine, newest.id, "cat /opt/who.txt") == (0, "operator v2\n")
    finally:
        await engine.kill(newest.id)


@pytest.mark.parametrize("tier", ["gvisor", "microvm"])
async def test_claim_on_the_other_tiers(engine: Engine, tier: str) -> None:
    probe = registry.probes()[tier]
    if not probe.ok:
        pytest.skip(f"{tier} does not work here: {probe.detail}")
    await engine.pools.set(PoolConfig(runtime=tier, size=1))
    await wait_ready(engine, f"base/{tier}", 1)
    info = await engine.create(SandboxSpec(
        runtime=tier, env={"WHO": tier},
        secrets={"KEY": SecretSpec(value="tier-secret-value", hosts=["a.test"])}))
    try:
        assert was_pooled(engine, info.id) and info.runtime == tier
        placeholder = info.secrets["KEY"].placeholder
        assert await sh(engine, info.id, "echo $WHO $KEY") == (0, f"{tier} {placeholder}\n")
        code, out = await sh(engine, info.id, "test ! -e /tmp/marker && touch /tmp/marker")
        assert code == 0, out
        # What the claim gave reaches its commands after a pause too (microvm: the VM was
        # saved to disk and restored in a new network namespace).
        await engine.pause(info.id)
        assert (await engine.resume(info.id)).resumed_processes is True
        assert await sh(engine, info.id, "echo $WHO $KEY; cat /tmp/marker && echo kept") == (
            0, f"{tier} {placeholder}\nkept\n")
    finally:
        await engine.kill(info.id)
    assert gone(info.id) == []


@pytest.fixture
async def egress_engine(data_dir: Path, tmp_path: Path) -> AsyncIterator[
        tuple[Engine, fake_upstream.EchoServer]]:
    ca = fake_upstream.TestCA.create(tmp_path)
    upstream = fake_upstream.EchoServer(tls=ca.server_context(tmp_path, ["a.test", "b.test"]))
    pins = [ResolvePin(h, 443, "127.0.0.1", upstream.port) for h in ("a.test", "b.test")]
    eng = Engine(EngineConfig(data_dir=data_dir, resolve=pins, upstream_ca=[ca.cert_path]))
    await eng.start()
    try:
        yield eng, upstream
    finally:
        await eng.close()
        upstream.close()


CURL = "curl -sS --max-time 20 -o /dev/null -w '%{http_code}' "


async def test_each_claimant_gets_its_own_secrets_and_policy(
        egress_engine: tuple[Engine, fake_upstream.EchoServer]) -> None:
    engine, upstream = egress_engine
    await engine.pools.set(PoolConfig(runtime="namespace", size=2))
    await wait_ready(engine, "base/namespace", 2)
    a = await engine.create(SandboxSpec(
        runtime="namespace", allow_net=["a.test"], env={"WHO": "a"},
        secrets={"KEY": SecretSpec(value="value-of-a-0123456789", hosts=["a.test"])}))
    b = await engine.create(SandboxSpec(
        runtime="namespace", allow_net=["b.test"], env={"WHO": "b"},
        secrets={"KEY": SecretSpec(value="value-of-b-9876543210", hosts=["b.test"])}))
    try:
        assert was_pooled(engine, a.id) and was_pooled(engine, b.id)
        pa, pb = a.secrets["KEY"].placeholder, b.secrets["KEY"].placeholder
        assert pa and pb and pa != pb
        # Each sees its own placeholder and env; no real value anywhere in its environment.
        code, out = await sh(engine, a.id, "echo $WHO $KEY; cat /proc/self/environ | tr '\\0' '\\n'")
        assert code == 0 and out.startswith(f"a {pa}\n") and "value-of" not in out, out
        code, out = await sh(engine, b.id, "echo $WHO $KEY")
        assert (code, out) == (0, f"b {pb}\n")
        # A's placeholder is swapped for A's value on A's host.
        code, out = await sh(engine, a.id, CURL + '-H "Authorization: Bearer $KEY" https://a.test/x')
        assert (code, out) == (0, "200"), out
        got = {k.lower(): v for k, v in upstream.received[-1].headers.items()}
        assert got["authorization"] == "Bearer value-of-a-0123456789"
        # B's placeholder for B's host, likewise; A's placeholder sent by B stays a string.
        code, out = await sh(engine, b.id, CURL + f'-H "Authorization: Bearer $KEY" '
                             f'-H "X-Other: {pa}" https://b.test/y')
        assert (code, out) == (0, "200"), out
        got = {k.lower(): v for k, v in upstream.received[-1].headers.items()}
        assert got["authorization"] == "Bearer value-of-b-9876543210"
        assert got["x-other"] == pa
        # A host allowed for A is blocked for B (and the other way round).
        before = len(upstream.received)
        code, out = await sh(engine, b.id, CURL + "https://a.test/z")
        assert out != "200", out
        code, out = await sh(engine, a.id, CURL + "https://b.test/z")
        assert out != "200", out
        assert len(upstream.received) == before
        # The audit log of A never holds B's value and vice versa.
        assert "value-of" not in json.dumps(engine.egress_log(a.id) + engine.egress_log(b.id))
    finally:
        await engine.kill(a.id)
        await engine.kill(b.id)


async def test_max_sandboxes_is_respected(data_dir: Path) -> None:
    engine = Engine(EngineConfig(data_dir=data_dir, max_sandboxes=2))
    await engine.start()
    try:
        await engine.pools.set(PoolConfig(runtime="namespace", size=3))
        await wait_ready(engine, "base/namespace", 2)  # never 3: the cap counts pool members
        assert len(engine.list()) == 2
        first = await engine.create(SandboxSpec(runtime="namespace"))
        await wait_ready(engine, "base/namespace", 1)
        # Limits that no pool matches: an idle member is evicted to make room for it.
        second = await engine.create(SandboxSpec(runtime="namespace", pids=64))
        assert not was_pooled(engine, second.id)
        assert len(engine.list()) == 2
        with pytest.raises(CapacityError, match="at most 2 sandboxes"):
            await engine.create(SandboxSpec(runtime="namespace"))
        assert len(engine.list()) == 2
        await engine.kill(first.id)
        await wait_ready(engine, "base/namespace", 1)
        assert len(engine.list()) == 2
    finally:
        await engine.close()


async def test_host_task_limit_is_respected(data_dir: Path) -> None:
    """A sandbox that would eat into the host's reserve of processes and threads is refused
    (before anything of it exists), and a pool does not fill past it either."""
    limit = host_limits.task_limit()
    assert 0 < host_limits.tasks_in_use() < limit
    engine = Engine(EngineConfig(data_dir=data_dir, host_task_reserve=limit))
    await engine.start()
    try:
        with pytest.raises(CapacityError, match="kernel.pid_max"):
            await engine.create(SandboxSpec(runtime="namespace"))
        await engine.pools.set(PoolConfig(runtime="namespace", size=1))
        await asyncio.sleep(1.0)
        assert engine.list() == []
        (status,) = engine.pools.list()
        assert status.ready == 0 and "kernel.pid_max" in (status.error or ""), status
    finally:
        await engine.close()
    # With room left (here: none reserved) the same create works.
    engine = Engine(EngineConfig(data_dir=data_dir, host_task_reserve=0))
    await engine.start()
    try:
        sb = await engine.create(SandboxSpec(runtime="namespace"))
        await engine.kill(sb.id)
    finally:
        await engine.close()


async def test_pool_bad_input(engine: Engine) -> None:
    with pytest.raises(ValueError):
        PoolConfig(size=-1)
    with pytest.raises(ValueError):
        PoolConfig.model_validate({"size": 1, "runtime": "docker"})
    with pytest.raises(ConfigError, match="unknown template"):
        await engine.pools.set(PoolConfig(template="no-such-template", size=1))
    assert engine.pools.list() == []
    # A bad request is refused before it could take (and lose) a member.
    await engine.pools.set(PoolConfig(runtime="namespace", size=1))
    await wait_ready(engine, "base/namespace", 1)
    (member,) = [i.id for i in engine.list() if i.metadata.get(POOL_LABEL)]
    with pytest.raises(ConfigError):
        await engine.create(SandboxSpec(runtime="namespace", allow_net=["*.com"]))
    assert engine.get(member).metadata.get(POOL_LABEL) == "base/namespace"
    assert engine.pools.list()[0].ready == 1


def sealbox(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEALBOX, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def documented(schema: OpenApiSchema, resp: httpx.Response) -> httpx.Response:
    """RESP is what /openapi.json says this route answers (status and body)."""
    op = schema.find_operation_by_path(resp.request.method, resp.request.url.path)
    assert op is not None, f"{resp.request.method} {resp.request.url.path} is undocumented"
    assert str(resp.status_code) in {str(c) for c in op.definition.raw.get("responses", {})}, (
        resp.status_code, resp.text)
    op.validate_response(resp)
    return resp


def _wait_http_ready(url: str, auth: dict[str, str], ready: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + READY_DEADLINE
    while True:
        pools = httpx.get(f"{url}/v1/pools", headers=auth).json()
        if pools and pools[0]["ready"] == ready and pools[0]["booting"] == 0:
            return list(pools)
        assert time.monotonic() < deadline, pools
        time.sleep(0.1)


def test_server_pools_cli_api_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    env = {"SEALBOX_URL": server.url, "SEALBOX_API_KEY": ADMIN_KEY}
    old: list[str] = []
    restarted = None
    schema: OpenApiSchema = schemathesis.openapi.from_dict(
        httpx.get(f"{server.url}/openapi.json").json())
    try:
        # Bad input: one clear line from the CLI, a 400 from the API.
        for args, needle in ((["--size", "-1"], "size"), (["--size", "1", "--runtime", "docker"],
                             "runtime"), (["nope-template", "--size", "1"], "unknown template")):
            r = sealbox("pool", "set", *args, env=env)
            assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r
        r = sealbox("server", "--max-sandboxes", "0", env=env)
        assert r.returncode == 2 and "max-sandboxes" in r.stderr, r
        for body in ({"size": -1}, {"size": 1, "runtime": "docker"},
                     {"size": 1, "template": "nope-template"}, {"size": 1, "surprise": 1}):
            resp = documented(schema, httpx.put(f"{server.url}/v1/pools", json=body, headers=auth))
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid", resp.text
        key = httpx.post(f"{server.url}/v1/keys", json={"tenant": "alice"}, headers=auth)
        alice = {"Authorization": f"Bearer {key.json()['key']}"}
        assert documented(schema, httpx.get(f"{server.url}/v1/pools",
                                            headers=alice)).status_code == 403
        assert documented(schema, httpx.put(f"{server.url}/v1/pools", json={"size": 1},
                                            headers=alice)).status_code == 403
        resp = documented(schema, httpx.put(f"{server.url}/v1/pools", headers=auth, json={
            "size": 0, "runtime": "namespace", "memory": "256MiB"}))
        assert resp.json()["memory"] == 256 * 2**20 and resp.json()["ready"] == 0
        documented(schema, httpx.get(f"{server.url}/v1/pools", headers=auth))
        assert documented(schema, httpx.delete(f"{server.url}/v1/pools/base/namespace",
                                               headers=auth)).status_code == 204
        assert documented(schema, httpx.delete(f"{server.url}/v1/pools/base/namespace",
                                               headers=auth)).status_code == 404

        r = sealbox("pool", "set", "--size", "2", "--runtime", "namespace", env=env)
        assert r.returncode == 0 and "base/namespace" in r.stdout, r
        _wait_http_ready(server.url, auth, 2)
        r = sealbox("pool", "ls", env=env)
        assert r.returncode == 0 and "base/namespace" in r.stdout, r
        r = sealbox("ls", env={**env, "COLUMNS": "200"})  # the admin sees members, marked
        assert r.stdout.count("idle warm-pool member (base/namespace)") == 2, r
        # Tenants never see unclaimed members; the admin does.
        assert httpx.get(f"{server.url}/v1/sandboxes", headers=alice).json() == []
        old = [i["id"] for i in httpx.get(f"{server.url}/v1/sandboxes", headers=auth).json()]
        assert len(old) == 2
        # A tenant's create claims one and sees only its own.
        resp = httpx.post(f"{server.url}/v1/sandboxes", json={"runtime": "namespace"},
                          headers=alice, timeout=60)
        assert resp.status_code == 201, resp.text
        claimed = resp.json()["id"]
        assert claimed in old
        assert [i["id"] for i in httpx.get(f"{server.url}/v1/sandboxes",
                                           headers=alice).json()] == [claimed]
        _wait_http_ready(server.url, auth, 2)
        old = [i["id"] for i in httpx.get(f"{server.url}/v1/sandboxes", headers=auth).json()]

        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        restarted = start_server(data)
        pools = _wait_http_ready(restarted.url, auth, 2)  # the pool came back from the store
        assert pools[0]["key"] == "base/namespace" and pools[0]["size"] == 2
        for sid in old:
            assert gone(sid) == [], sid
            assert httpx.get(f"{restarted.url}/v1/sandboxes/{sid}",
                             headers=auth).json()["state"] == "killed"
        new = [i["id"] for i in httpx.get(f"{restarted.url}/v1/sandboxes", headers=auth).json()]
        assert len(new) == 2 and not set(new) & set(old)
        env["SEALBOX_URL"] = restarted.url
        r = sealbox("pool", "rm", "--runtime", "namespace", env=env)
        assert r.returncode == 0, r
        assert httpx.get(f"{restarted.url}/v1/pools", headers=auth).json() == []
        for sid in new:
            assert gone(sid) == [], sid
        r = sealbox("pool", "rm", "--runtime", "namespace", env=env)
        assert r.returncode == 1 and "no pool" in r.stderr, r
        r = sealbox("pool", "set", "--size", "1", "--runtime", "namespace", env=env)
        assert r.returncode == 0, r
        _wait_http_ready(restarted.url, auth, 1)
        new = [i["id"] for i in httpx.get(f"{restarted.url}/v1/sandboxes", headers=auth).json()]
    finally:
        if restarted is not None:
            assert restarted.stop()
        else:
            server.stop()
    for sid in old + new:
        assert gone(sid) == [], sid
