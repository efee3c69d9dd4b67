"""Named volumes end to end: real ext4 images, real loop mounts, real sandboxes on every tier
that mounts them, the CLI and the REST API as users drive them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis

from sealbox import Sandbox, Volume
from sealbox._sys import volumes as sysvol
from sealbox.engine.engine import Engine
from sealbox.engine.spec import ExecRequest, SandboxSpec, SandboxState, VolumeMount
from sealbox.engine.volumes import VolumeCreate, mount_root
from sealbox.errors import ConfigError, ConflictError, NotFoundError, QuotaExceeded, from_code
from support.server import ADMIN_KEY, Server, start_server

from conftest import RUN_ROOT
from test_api import Api

pytestmark = pytest.mark.privileged
TIERS = ["namespace", "gvisor", "microvm"]
MiB = 1024 * 1024
SEALBOX = str(Path(sys.executable).parent / "sealbox")


def mounted(data_dir: Path) -> list[str]:
    """Volume mounts of the installation in DATA_DIR (other engineers' test runs have theirs)."""
    return sysvol.mounts_under(mount_root(data_dir, RUN_ROOT))


async def sh(engine: Engine, sid: str, cmd: str) -> tuple[int, str]:
    r = await engine.run(sid, ExecRequest(cmd=cmd))
    return r.exit_code or 0, r.stdout + r.stderr


def mount(name: str, path: str = "/data", ro: bool = False) -> VolumeMount:
    return VolumeMount(name=name, path=path, read_only=ro)


# ----- data lives on -----------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", TIERS)
async def test_data_outlives_its_sandbox_and_next_one_can_write(engine: Engine, runtime: str,
                                                                 data_dir: Path) -> None:
    engine.volumes.create(VolumeCreate(name="keep", size="32MiB"))
    first = await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("keep")]))
    assert first.volumes == [mount("keep")]
    code, out = await sh(engine, first.id, "mkdir -p /data/d && echo one > /data/d/f && "
                                           "chmod 600 /data/d/f && cat /data/d/f")
    assert (code, out) == (0, "one\n")
    assert engine.volumes.get("keep").used_by == [first.id]
    await engine.kill(first.id)
    assert mounted(data_dir) == [] and sysvol.leaked_loops(data_dir) == []
    # A different sandbox (on the namespace tier: a different host uid) reads and writes it.
    second = await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("keep", "/x/y")]))
    code, out = await sh(engine, second.id, "cat /x/y/d/f && echo two >> /x/y/d/f && "
                                            "touch /x/y/d/new && cat /x/y/d/f")
    assert (code, out) == (0, "one\none\ntwo\n"), out
    await engine.kill(second.id)
    assert mounted(data_dir) == [] and sysvol.leaked_loops(data_dir) == []
    assert not mount_root(data_dir, RUN_ROOT).exists()  # no empty mount points left in /run


@pytest.mark.parametrize("runtime", TIERS)
async def test_size_limit_is_enforced_inside_only(engine: Engine, runtime: str,
                                                  data_dir: Path) -> None:
    engine.volumes.create(VolumeCreate(name="small", size="16MiB"))
    info = await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("small")]))
    code, out = await sh(engine, info.id, "head -c 67108864 /dev/zero > /data/big")
    assert code != 0 and "No space left on device" in out, out
    # The sandbox can still work in its volume after filling it (rm frees space).
    code, out = await sh(engine, info.id, "rm /data/big && echo ok > /data/ok && cat /data/ok")
    assert (code, out) == (0, "ok\n")
    await engine.kill(info.id)
    image = next(data_dir.glob(f"volumes/*/small/{sysvol.IMAGE_NAME}"))
    # The host never holds more than the volume's size for it.
    assert image.stat().st_size == 16 * MiB and image.stat().st_blocks * 512 <= 16 * MiB


@pytest.mark.parametrize("runtime", TIERS)
async def test_read_only_mounts_cannot_write_and_can_share(engine: Engine, runtime: str,
                                                           data_dir: Path) -> None:
    engine.volumes.create(VolumeCreate(name="ro", size="16MiB"))
    writer = await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("ro")]))
    assert (await sh(engine, writer.id, "echo data > /data/f"))[0] == 0
    await engine.kill(writer.id)
    readers = [await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("ro", ro=True)]))
               for _ in range(2)]
    for r in readers:
        code, out = await sh(engine, r.id, "cat /data/f; echo x > /data/g")
        assert code != 0 and out.startswith("data\n") and "Read-only file system" in out, out
        # Nor can the sandbox make it writable: no capabilities, no new user namespace.
        code, out = await sh(engine, r.id, "mount -o remount,rw /data; "
                                           "unshare -rm sh -c 'mount -o remount,rw /data'; "
                                           "echo x > /data/g")
        assert code != 0 and "Read-only file system" in out, out
    assert sorted(engine.volumes.get("ro").used_by) == sorted(r.id for r in readers)
    # A writer is refused while readers use it.
    with pytest.raises(ConflictError, match="read-only by sandbox"):
        await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("ro")]))
    for r in readers:
        await engine.kill(r.id)
    assert mounted(data_dir) == []


async def test_volume_moves_between_tiers(engine: Engine, data_dir: Path) -> None:
    """Written on namespace (its host uid), then on microvm (a disk the guest gives to its
    uid 1000). From then on the host kernel never mounts it (a VM wrote its blocks): the
    other tiers are refused, microvm sandboxes share it read-only as disks."""
    engine.volumes.create(VolumeCreate(name="move", size="32MiB"))
    ns = await engine.create(SandboxSpec(runtime="namespace", volumes=[mount("move")]))
    assert await sh(engine, ns.id, "echo ns > /data/f && mkdir /data/d") == (0, "")
    await engine.kill(ns.id)
    assert engine.volumes.get("move").vm_only is False
    vm = await engine.create(SandboxSpec(runtime="microvm", volumes=[mount("move", "/w/v")]))
    code, out = await sh(engine, vm.id, "echo vm >> /w/v/f && echo x > /w/v/d/g && "
                                        "cat /w/v/f && stat -c %u /w/v/f /w/v/d")
    assert (code, out) == (0, "ns\nvm\n1000\n1000\n"), out
    assert mounted(data_dir) == []  # a guest's disk: the host has it nowhere
    await engine.kill(vm.id)
    assert engine.volumes.get("move").vm_only is True
    for tier in ("namespace", "gvisor"):
        for ro in (False, True):
            with pytest.raises(ConfigError, match="written by a microVM"):
                await engine.create(SandboxSpec(runtime=tier, volumes=[mount("move", ro=ro)]))
    readers = [await engine.create(SandboxSpec(runtime="microvm",
                                               volumes=[mount("move", ro=True)]))
               for _ in range(2)]
    for r in readers:
        assert await sh(engine, r.id, "cat /data/f /data/d/g") == (0, "ns\nvm\nx\n")
    for r in readers:
        await engine.kill(r.id)
    assert mounted(data_dir) == [] and sysvol.leaked_loops(data_dir) == []


async def test_one_writer_at_a_time(engine: Engine) -> None:
    engine.volumes.create(VolumeCreate(name="w", size="16MiB"))
    a = await engine.create(SandboxSpec(runtime="namespace", volumes=[mount("w")]))
    with pytest.raises(ConflictError, match="read-write by sandbox"):
        await engine.create(SandboxSpec(runtime="namespace", volumes=[mount("w")]))
    with pytest.raises(ConflictError, match="read-write by sandbox"):
        await engine.create(SandboxSpec(runtime="namespace", volumes=[mount("w", ro=True)]))
    # Refused before anything started: nothing of the refused sandboxes exists.
    assert [i.id for i in engine.list()] == [a.id]
    with pytest.raises(ConflictError, match="in use"):
        engine.volumes.delete("w")
    await engine.kill(a.id)
    b = await engine.create(SandboxSpec(runtime="namespace", volumes=[mount("w")]))
    await engine.kill(b.id)
    engine.volumes.delete("w")
    with pytest.raises(NotFoundError):
        engine.volumes.get("w")


# ----- escapes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", TIERS)
async def test_symlinks_and_dotdot_stay_inside(engine: Engine, runtime: str,
                                               tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("host secret\n")
    victim.chmod(0o600)
    engine.volumes.create(VolumeCreate(name="esc", size="16MiB"))
    engine.volumes.create(VolumeCreate(name="other", size="16MiB"))
    other = await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("other")]))
    info = await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("esc")]))
    code, out = await sh(engine, info.id,
                         f"ln -s {victim} /data/v && ln -s / /data/root && "
                         f"ln -s ../../../../../{tmp_path} /data/up; "
                         f"cat /data/v; cat /data/up/victim; cat /data/root{victim}; "
                         f"cat /data/../../{victim}; "
                         # (python, not ls: gVisor 2022 fails ls' statx)
                         "python3 -c 'import os; print(sorted(os.listdir(\"/data/..\")))'; "
                         "python3 -c 'import os; print(os.path.exists(\"/data/../other\"))'")
    assert "host secret" not in out, out
    assert "cat: /data/v: No such file" in out, out
    # `..` of the mount is the sandbox's own root: the host's volume directory (where the
    # other volume is mounted) is not reachable.
    assert "'workspace'" in out and "False\n" in out, out
    await engine.kill(info.id)
    await engine.kill(other.id)
    # Attaching read-write again gives the volume's files to the new sandbox's uid: the host
    # must not follow the planted symlinks while doing so.
    again = await engine.create(SandboxSpec(runtime=runtime, volumes=[mount("esc")]))
    assert victim.stat().st_uid == 0 and victim.stat().st_mode & 0o777 == 0o600
    assert victim.read_text() == "host secret\n"
    assert tmp_path.stat().st_uid == 0
    await engine.kill(again.id)


@pytest.mark.parametrize("path", [
    "data", "/", "/workspace", "/proc/x", "/etc", "/etc/ssl", "/dev/shm", "/sys/x", "/.sealbox",
    "/data/../etc", "/usr/local/x", "/run/x",
])
def test_bad_mount_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="mount|path|volume"):
        SandboxSpec(volumes=[{"name": "v", "path": path}])  # type: ignore[list-item]


async def test_bad_volume_input_is_a_clear_error(engine: Engine, data_dir: Path) -> None:
    with pytest.raises(NotFoundError, match="no volume 'nope'"):
        await engine.create(SandboxSpec(runtime="namespace", volumes=[mount("nope")]))
    for name, size in [("Bad Name", "16MiB"), ("../x", "16MiB"), ("ok", "lots"), ("ok", "1KiB"),
                       ("ok", "-5")]:
        with pytest.raises(ValueError):
            VolumeCreate.model_validate({"name": name, "size": size})
    with pytest.raises(ConfigError, match="free on this host"):
        engine.volumes.create(VolumeCreate(name="huge", size="15TiB"))
    engine.volumes.create(VolumeCreate(name="dup", size="16MiB"))
    with pytest.raises(ConflictError, match="already exists"):
        engine.volumes.create(VolumeCreate(name="dup", size="16MiB"))
    with pytest.raises(ValueError, match="twice"):
        SandboxSpec(volumes=[mount("dup"), mount("dup", "/other")])
    with pytest.raises(ValueError, match="overlap"):
        SandboxSpec(volumes=[mount("dup"), mount("dup2", "/data/sub")])
    assert engine.list() == [] and mounted(data_dir) == []


# ----- CLI ---------------------------------------------------------------------------------------

def sealbox(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEALBOX, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_cli_volumes_embedded(tmp_path: Path) -> None:
    env = {"SEALBOX_DATA_DIR": str(tmp_path / "data"), "SEALBOX_URL": ""}
    r = sealbox("volume", "create", "cache", "--size", "32MiB", env=env)
    assert r.returncode == 0 and "created volume cache (32 MiB)" in r.stdout, r.stderr
    r = sealbox("run", "--runtime", "namespace", "--volume", "cache:/cache", "--",
                "sh", "-c", "echo hello > /cache/f", env=env)
    assert r.returncode == 0, r.stderr
    r = sealbox("run", "--runtime", "namespace", "--volume", "cache:/cache:ro", "--",
                "cat", "/cache/f", env=env)
    assert (r.returncode, r.stdout) == (0, "hello\n"), r.stderr
    r = sealbox("volume", "ls", env=env)
    assert r.returncode == 0 and "cache" in r.stdout and "32 MiB" in r.stdout
    for args, needle in [
        (["run", "--volume", "nope:/x", "--", "true"], "no volume 'nope'"),
        (["run", "--volume", "cache", "--", "true"], "NAME:/path"),
        (["run", "--volume", "cache:/etc/x", "--", "true"], "/etc"),
        (["run", "--volume", "cache:rel", "--", "true"], "absolute"),
        (["volume", "create", "x", "--size", "huge"], "size"),
        (["volume", "create", "Bad/Name"], "invalid"),
        (["volume", "rm", "nope"], "no volume"),
    ]:
        r = sealbox(*args, env=env)
        assert r.returncode in (1, 2), (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = sealbox("volume", "rm", "cache", env=env)
    assert r.returncode == 0, r.stderr
    assert mounted(tmp_path / "data") == [] and sysvol.leaked_loops(tmp_path / "data") == []


# ----- API: tenants, errors, a server that dies --------------------------------------------------

@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path / "data")
    yield srv
    if srv.proc.poll() is None:
        assert srv.stop(), srv.log.read_text()


def _api(server: Server, tenant: str) -> Api:
    """A tenant's client; every response is checked against the server's /openapi.json."""
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())
    r = httpx.post(f"{server.url}/v1/keys", json={"tenant": tenant},
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 201, r.text
    return Api(server.url, schema, r.json()["key"])


def test_api_volumes_belong_to_their_tenant(server: Server, tmp_path: Path) -> None:
    alice, bob = _api(server, "alice"), _api(server, "bob")
    try:
        r = alice.post("/v1/volumes", json={"name": "cache", "size": "32MiB"})
        assert r.status_code == 201 and r.json()["size"] == 32 * MiB, r.text
        assert bob.get("/v1/volumes/cache").status_code == 404
        assert bob.delete("/v1/volumes/cache").status_code == 404
        assert bob.get("/v1/volumes").json() == []
        r = bob.post("/v1/sandboxes", json={"runtime": "namespace",
                                            "volumes": [{"name": "cache", "path": "/c"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        # Bob's own "cache" is a different volume.
        assert bob.post("/v1/volumes", json={"name": "cache", "size": "16MiB"}).status_code == 201
        r = alice.post("/v1/sandboxes", json={"runtime": "namespace",
                                              "volumes": [{"name": "cache", "path": "/c"}]})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert r.json()["volumes"] == [{"name": "cache", "path": "/c", "read_only": False}]
        r = alice.delete("/v1/volumes/cache")
        assert r.status_code == 409 and sid in r.json()["error"]["message"]
        assert alice.get("/v1/volumes/cache").json()["used_by"] == [sid]
        r = alice.post("/v1/sandboxes", json={"runtime": "namespace",
                                              "volumes": [{"name": "cache", "path": "/d"}]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        for body, code in [
            ({"name": "Bad Name"}, 400), ({"name": "ok", "size": "lots"}, 400),
            ({"name": "ok", "size": 1}, 400), ({"name": "ok", "extra": 1}, 400),
            ({"name": "cache"}, 409),
        ]:
            r = alice.post("/v1/volumes", json=body)
            assert r.status_code == code, (body, r.text)
            assert "Traceback" not in r.text and r.json()["error"]["message"]
        assert alice.get("/v1/volumes/Bad..name").status_code == 400
        r = alice.post("/v1/sandboxes", json={"runtime": "namespace",
                                              "volumes": [{"name": "cache", "path": "/proc/x"}]})
        assert r.status_code == 400 and "/proc" in r.json()["error"]["message"]
        assert alice.delete(f"/v1/sandboxes/{sid}").status_code == 200
        assert alice.delete("/v1/volumes/cache").status_code == 200
        assert mounted(tmp_path / "data") == [] and sysvol.leaked_loops(tmp_path / "data") == []
    finally:
        alice.close()
        bob.close()


def test_volume_quota_per_tenant(tmp_path: Path) -> None:
    """A server's --volume-quota caps each tenant's volumes (their sizes summed), on its own:
    another tenant is not affected, and removing a volume frees its share."""
    server = start_server(tmp_path / "data", volume_quota=100 * MiB)
    alice, bob = _api(server, "alice"), _api(server, "bob")
    try:
        assert alice.post("/v1/volumes", json={"name": "a", "size": "64MiB"}).status_code == 201
        r = alice.post("/v1/volumes", json={"name": "b", "size": "64MiB"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "quota_exceeded", r.text
        assert "over its quota of 100 MiB" in r.json()["error"]["message"], r.text
        assert [v["name"] for v in alice.get("/v1/volumes").json()] == ["a"]  # nothing made
        assert bob.post("/v1/volumes", json={"name": "b", "size": "64MiB"}).status_code == 201
        assert alice.post("/v1/volumes", json={"name": "c", "size": "32MiB"}).status_code == 201
        assert alice.delete("/v1/volumes/a").status_code == 200
        assert alice.post("/v1/volumes", json={"name": "b", "size": "64MiB"}).status_code == 201
    finally:
        alice.close()
        bob.close()
        assert server.stop(), server.log.read_text()
    # The SDK and CLI get the same error class.
    err = from_code("quota_exceeded", "over")
    assert isinstance(err, QuotaExceeded) and err.http_status == 403


def test_server_sigkill_leaves_no_mount_after_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.url, timeout=90, headers=auth) as c:
        assert c.post("/v1/volumes", json={"name": "v", "size": "16MiB"}).status_code == 201
        r = c.post("/v1/sandboxes", json={"runtime": "namespace",
                                          "volumes": [{"name": "v", "path": "/v"}]})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo kept > /v/f"}).raise_for_status()
    assert len(mounted(data)) == 1
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    restarted = start_server(data)
    try:
        assert mounted(data) == [] and sysvol.leaked_loops(data) == []
        with httpx.Client(base_url=restarted.url, timeout=90, headers=auth) as c:
            assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "killed"
            assert c.get("/v1/volumes/v").json()["used_by"] == []
            r = c.post("/v1/sandboxes", json={"runtime": "namespace",
                                              "volumes": [{"name": "v", "path": "/v"}]})
            assert r.status_code == 201, r.text
            r2 = c.post(f"/v1/sandboxes/{r.json()['id']}/exec", json={"cmd": "cat /v/f"})
            assert r2.json()["stdout"] == "kept\n"
            c.delete(f"/v1/sandboxes/{r.json()['id']}")
    finally:
        assert restarted.stop()
    assert mounted(data) == [] and sysvol.leaked_loops(data) == []


# ----- SDK ---------------------------------------------------------------------------------------

def test_sdk_volumes_remote(server: Server, tmp_path: Path) -> None:
    opts = {"url": server.url, "api_key": ADMIN_KEY}
    assert Volume.create("sdkvol", "16MiB", **opts).name == "sdkvol"
    assert [v.name for v in Volume.list(**opts)] == ["sdkvol"]
    with Sandbox.create(runtime="namespace", volumes={"/mnt/v": "sdkvol"}, **opts) as sb:
        assert sb.exec("echo 1 > /mnt/v/f").exit_code == 0
        assert sb.info.volumes == [VolumeMount(name="sdkvol", path="/mnt/v")]
    with Sandbox.create(runtime="namespace", volumes={"sdkvol": "/v"}, **opts) as sb:
        assert sb.exec("cat /v/f").stdout == "1\n"
    with Sandbox.create(runtime="namespace", **opts,
                        volumes=[VolumeMount(name="sdkvol", path="/v", read_only=True)]) as sb:
        assert sb.exec("touch /v/g").exit_code != 0
    assert Volume.delete("sdkvol", **opts).name == "sdkvol"
    with pytest.raises(NotFoundError):
        Volume.get("sdkvol", **opts)
    assert mounted(tmp_path / "data") == []


async def test_damaged_volume_fails_create_cleanly(engine: Engine, data_dir: Path) -> None:
    """A volume whose image is damaged fails the create with a clear error and leaves nothing."""
    engine.volumes.create(VolumeCreate(name="broken", size="16MiB"))
    image = next(data_dir.glob(f"volumes/*/broken/{sysvol.IMAGE_NAME}"))
    with open(image, "r+b") as f:
        f.write(b"\0" * (2 * MiB))  # wipes the superblock
    with pytest.raises(ConfigError, match="cannot mount volume"):
        await engine.create(SandboxSpec(runtime="namespace", volumes=[mount("broken")]))
    assert [i.state for i in engine.list(include_ended=True)] == [SandboxState.failed]
    assert mounted(data_dir) == [] and sysvol.leaked_loops(data_dir) == []


def test_cli_volumes_against_a_server(server: Server, tmp_path: Path) -> None:
    env = {"SEALBOX_URL": server.url, "SEALBOX_API_KEY": ADMIN_KEY}
    assert sealbox("volume", "create", "srv", "--size", "16MiB", env=env).returncode == 0
    r = sealbox("create", "--runtime", "namespace", "--volume", "srv:/srv/data", env=env)
    assert r.returncode == 0, r.stderr
    sid = r.stdout.split()[-1]
    r = sealbox("exec", sid, "--", "sh", "-c", "echo hi > /srv/data/f && cat /srv/data/f",
                env=env)
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    r = sealbox("volume", "ls", env=env)
    assert "srv" in r.stdout and sid in r.stdout
    r = sealbox("volume", "rm", "srv", env=env)
    assert r.returncode == 1 and "in use by sandbox" in r.stderr and "Traceback" not in r.stderr
    r = sealbox("create", "--runtime", "namespace", "--volume", "srv:/x", env=env)
    assert r.returncode == 1 and "one writer at a time" in r.stderr, r.stderr
    assert sealbox("kill", sid, env=env).returncode == 0
    assert sealbox("volume", "rm", "srv", env=env).returncode == 0
    assert mounted(tmp_path / "data") == [] and sysvol.leaked_loops(tmp_path / "data") == []
