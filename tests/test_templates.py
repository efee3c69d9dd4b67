"""Templates, snapshots and fork, end to end on the real tiers.

Packages come from servers on 127.0.0.1 the tests start: a flat apt repository with a .deb made
by `dpkg-deb --build`, a PEP 503 simple index with a hand-made wheel, and a tiny npm registry.
The build reaches them through `--resolve` pins of made-up names (deb.sealbox.test, …).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import RUN_ROOT, gone
from support.builds import kill_build_owner
from support.counter import counter, until_counted
from test_pools import wait_ready, was_pooled

from sealbox.egress.gateway import ResolvePin
from sealbox.engine.config import EngineConfig
from sealbox.engine.engine import Engine
from sealbox.engine.pools import PoolConfig
from sealbox.engine.spec import ExecRequest, SandboxSpec
from sealbox.engine.templates import TemplateFile, TemplateSpec
from sealbox.errors import CommandError, ConfigError, NotFoundError, SandboxError
from sealbox.runtimes import registry

pytestmark = pytest.mark.timeout(600)

DEB_HOST = "deb.sealbox.test"
PYPI_HOST = "pypi.sealbox.test"
NPM_HOST = "npm.sealbox.test"
OTHER_HOST = "other.sealbox.test"


# ----- local package servers -----------------------------------------------------------------

def make_deb(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: sealbox-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: sealbox tests <t@sealbox.test>\nDescription: test package\n")
    (pkg / "usr" / "bin").mkdir(parents=True)
    script = pkg / "usr" / "bin" / "sealbox-hello"
    script.write_text("#!/bin/sh\necho hello from a deb\n")
    script.chmod(0o755)
    deb = root / "repo" / "sealbox-hello_1.0_all.deb"
    deb.parent.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)],
                   check=True, capture_output=True)
    data = deb.read_bytes()
    (root / "repo" / "Packages").write_text(
        "Package: sealbox-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: sealbox tests <t@sealbox.test>\n"
        f"Filename: ./{deb.name}\nSize: {len(data)}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        f"MD5sum: {hashlib.md5(data).hexdigest()}\nDescription: test package\n\n")
    return deb


def make_wheel(root: Path) -> None:
    name = "sealbox_hello-1.0-py3-none-any.whl"
    files = {
        "sealbox_hello/__init__.py": b"GREETING = 'hello from a wheel'\n",
        "sealbox_hello-1.0.dist-info/METADATA":
            b"Metadata-Version: 2.1\nName: sealbox-hello\nVersion: 1.0\n",
        "sealbox_hello-1.0.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
        f"{len(d)}\n" for p, d in files.items()) + "sealbox_hello-1.0.dist-info/RECORD,,\n"
    files["sealbox_hello-1.0.dist-info/RECORD"] = record.encode()
    whl = root / "pypi" / "files" / name
    whl.parent.mkdir(parents=True)
    with zipfile.ZipFile(whl, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
    index = root / "pypi" / "simple" / "sealbox-hello"
    index.mkdir(parents=True)
    (index / "index.html").write_text(
        f'<html><body><a href="/files/{name}">{name}</a></body></html>')


def make_npm(root: Path, port: int) -> None:
    buf = io.BytesIO()
    pkg_json = json.dumps({"name": "sealbox-hello", "version": "1.0.0",
                           "bin": {"sealbox-hello-js": "cli.js"}}).encode()
    cli = b"#!/usr/bin/env node\nconsole.log('hello from npm')\n"
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for path, data in (("package/package.json", pkg_json), ("package/cli.js", cli)):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o755
            t.addfile(info, io.BytesIO(data))
    tgz = buf.getvalue()
    npm = root / "npm"
    npm.mkdir()
    (npm / "sealbox-hello-1.0.0.tgz").write_bytes(tgz)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()
    (npm / "sealbox-hello").write_text(json.dumps({
        "name": "sealbox-hello", "dist-tags": {"latest": "1.0.0"},
        "versions": {"1.0.0": {
            "name": "sealbox-hello", "version": "1.0.0",
            "bin": {"sealbox-hello-js": "cli.js"},
            "dist": {"tarball": f"http://{NPM_HOST}/npm/sealbox-hello-1.0.0.tgz",
                     "integrity": integrity,
                     "shasum": hashlib.sha1(tgz).hexdigest()}}}}))


class PackageServer:
    """One HTTP server on 127.0.0.1 for apt, pip and npm; records every request's Host+path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self) -> None:
                server.requests.append(f"{self.headers.get('Host', '')}{self.path}")
                if self.path.startswith("/npm/") or self.path == "/sealbox-hello":
                    self.path = self.path if self.path.startswith("/npm/") else "/npm/sealbox-hello"
                elif self.path.startswith("/simple/") or self.path.startswith("/files/"):
                    self.path = "/pypi" + self.path
                elif not self.path.startswith("/repo/"):
                    self.path = "/repo" + self.path
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PackageServer]:
    root = tmp_path_factory.mktemp("packages")
    make_deb(root)
    make_wheel(root)
    server = PackageServer(root)
    make_npm(root, server.port)
    yield server
    server.close()


@pytest.fixture
async def tengine(data_dir: Path, packages: PackageServer) -> AsyncIterator[Engine]:
    pins = [ResolvePin.parse(f"{h}:80:127.0.0.1:{packages.port}")
            for h in (DEB_HOST, PYPI_HOST, NPM_HOST, OTHER_HOST)]
    eng = Engine(EngineConfig(data_dir=data_dir, resolve=pins))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()
        assert not list(Path("/run/sealbox").glob("sb*/layer/*/*")), "layer mounts left"


def full_spec(name: str, tmp_path: Path) -> TemplateSpec:
    setup = tmp_path / "setup.sh"
    setup.write_text("echo configured > /opt/sealbox-configured\n")
    return TemplateSpec(
        name=name, apt=["sealbox-hello"], pip=["sealbox-hello"], npm=["sealbox-hello"],
        apt_sources=[f"deb [trusted=yes] http://{DEB_HOST}/ ./"],
        pip_index_url=f"http://{PYPI_HOST}/simple/", npm_registry=f"http://{NPM_HOST}/",
        files=[TemplateFile(src=str(setup), dest="/opt/setup.sh", mode=0o755),
               TemplateFile(content_b64=base64.b64encode(b"data\n").decode(),
                            dest="/workspace/data.txt")],
        run=["sh /opt/setup.sh"], env={"TEMPLATE_VAR": "tv"}, workdir="/workspace",
    )


async def sh(engine: Engine, sandbox_id: str, cmd: str) -> tuple[int | None, str]:
    r = await engine.run(sandbox_id, ExecRequest(cmd=cmd))
    return r.exit_code, r.stdout + r.stderr


# ----- build and use -------------------------------------------------------------------------

async def test_build_and_use_on_namespace(tengine: Engine, tmp_path: Path,
                                          packages: PackageServer) -> None:
    events: list[dict[str, Any]] = []
    info = await tengine.build_template(full_spec("py-data", tmp_path), progress=events.append)
    assert info.name == "py-data" and len(info.hash) == 64
    assert [e["title"] for e in events if e["type"] == "step"][:2] == [
        "apt-get update", "apt install sealbox-hello"]
    assert any(r.startswith(DEB_HOST) for r in packages.requests)
    microvm = registry.get("microvm").probe()
    for tier in ["namespace"] + (["microvm"] if microvm.ok else []):
        await check_py_data(tengine, tier)
    # No set-id file and nothing but root ownership reached the layer on the host.
    layer = tengine.templates.dir(info.hash) / "layer"
    for p in layer.rglob("*"):
        st = p.lstat()
        assert st.st_uid == 0 and not st.st_mode & 0o6000, p
    # A sandbox without the template does not see it.
    plain = await tengine.create(SandboxSpec(runtime="namespace"))
    try:
        code, _ = await sh(tengine, plain.id, "command -v sealbox-hello")
        assert code != 0
    finally:
        await tengine.kill(plain.id)


async def check_py_data(tengine: Engine, tier: str) -> None:
    """What `full_spec` installed works in a sandbox of TIER, read-only."""
    sb = await tengine.create(SandboxSpec(runtime=tier, template="py-data"))
    try:
        assert sb.template == "py-data"
        code, out = await sh(tengine, sb.id, "sealbox-hello")
        assert (code, out.strip()) == (0, "hello from a deb")
        code, out = await sh(tengine, sb.id,
                             "python3 -c 'import sealbox_hello; print(sealbox_hello.GREETING)'")
        assert (code, out.strip()) == (0, "hello from a wheel")
        code, out = await sh(tengine, sb.id, "sealbox-hello-js")
        assert (code, out.strip()) == (0, "hello from npm")
        code, out = await sh(tengine, sb.id,
                             "cat /opt/sealbox-configured /workspace/data.txt; echo $TEMPLATE_VAR")
        assert out.split() == ["configured", "data", "tv"]
        code, out = await sh(tengine, sb.id, "dpkg -s sealbox-hello | grep Status")
        assert "install ok installed" in out
        # The layer is read-only inside.
        for path in ("/usr/bin/sealbox-hello", "/opt/setup.sh", "/usr/local/newfile"):
            code, out = await sh(tengine, sb.id, f"echo x > {path}")
            assert code != 0, path
        code, _ = await sh(tengine, sb.id, "rm -f /usr/bin/sealbox-hello")
        assert code != 0
    finally:
        await tengine.kill(sb.id)


async def test_cache_hit_and_changed_input(tengine: Engine, tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("one\n")
    spec = TemplateSpec(name="small", files=[TemplateFile(src=str(f), dest="/opt/f.txt")],
                        run=["echo built >> /opt/built"])
    first = await tengine.build_template(spec)
    log1 = tengine.template_log("small")
    events: list[dict[str, Any]] = []
    again = await tengine.build_template(spec.model_copy(update={"name": "small2"}),
                                         progress=events.append)
    assert again.hash == first.hash
    assert [e["type"] for e in events] == ["cached"]  # no build ran
    assert {t.name for t in tengine.list_templates()} >= {"small", "small2"}
    f.write_text("two\n")
    changed = await tengine.build_template(spec)
    assert changed.hash != first.hash
    assert "==> run echo built" in log1
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="small"))
    try:
        _, out = await sh(tengine, sb.id, "cat /opt/f.txt /opt/built")
        assert out.split() == ["two", "built"]
    finally:
        await tengine.kill(sb.id)


async def test_gvisor_sees_the_layer(tengine: Engine) -> None:
    probe = registry.get("gvisor").probe()
    if not probe.ok:
        pytest.skip(probe.detail)
    await tengine.build_template(TemplateSpec(name="gv", run=["echo gv > /opt/gv.txt"],
                                              env={"GV": "1"}))
    sb = await tengine.create(SandboxSpec(runtime="gvisor", template="gv"))
    try:
        code, out = await sh(tengine, sb.id, "cat /opt/gv.txt; echo $GV; echo x > /opt/y")
        assert out.split()[:2] == ["gv", "1"] and code != 0
        await sh(tengine, sb.id, "echo from-gvisor > /workspace/g")
        await tengine.snapshot(sb.id, "gv-snap")
        child = await tengine.fork(sb.id)
        try:
            assert child.runtime == "gvisor"
            _, out = await sh(tengine, child.id, "cat /workspace/g /opt/gv.txt")
            assert out.split() == ["from-gvisor", "gv"]
        finally:
            await tengine.kill(child.id)
    finally:
        await tengine.kill(sb.id)
    # A snapshot taken on one tier starts on another.
    ns = await tengine.create(SandboxSpec(runtime="namespace", template="gv-snap"))
    try:
        _, out = await sh(tengine, ns.id, "cat /workspace/g /opt/gv.txt")
        assert out.split() == ["from-gvisor", "gv"]
    finally:
        await tengine.kill(ns.id)


async def test_microvm_boots_layers_and_workspace_snapshots(tengine: Engine) -> None:
    probe = registry.get("microvm").probe()
    if not probe.ok:
        pytest.skip(probe.detail)
    # A layer with new files in /usr, /opt and /etc, a changed /etc file, and a deleted host
    # file (a whiteout): the VM shows it as the other tiers do, in front of its own dirs.
    gone_file = "/usr/share/common-licenses/GPL-1"
    assert Path(gone_file).is_file()  # on the host, and so on the VM's own /usr disk
    await tengine.build_template(TemplateSpec(name="mv", env={"MV": "1"}, run=[
        "echo mv > /opt/mv", "echo '#!/bin/sh\necho from-the-layer' > /usr/local/bin/mvhi",
        "chmod 755 /usr/local/bin/mvhi", "echo conf > /etc/mv.conf",
        # Replaced, as adduser and dpkg do: a host file is never rewritten in place.
        "{ cat /etc/passwd; echo 'mvuser:x:4242:4242::/:/bin/false'; } > /etc/passwd.new "
        "&& mv /etc/passwd.new /etc/passwd", f"rm {gone_file}"]))
    vm = await tengine.create(SandboxSpec(runtime="microvm", template="mv"))
    try:
        code, out = await sh(tengine, vm.id, "cat /opt/mv /etc/mv.conf; mvhi; echo $MV; "
                                             f"test -e {gone_file} || echo whited-out; "
                                             "id -un; uname -r")
        assert code == 0, out
        lines = out.split()
        assert lines[:6] == ["mv", "conf", "from-the-layer", "1", "whited-out", "user"], out
        assert lines[6] != os.uname().release  # the guest kernel: this is the VM
        # Read-only like the other tiers; this sandbox's own /etc/passwd is in front.
        for path in ("/opt/mv", "/usr/local/bin/mvhi", "/etc/mv.conf"):
            code, out = await sh(tengine, vm.id, f"echo x > {path}")
            assert code != 0, (path, out)
        code, out = await sh(tengine, vm.id, "grep -c mvuser /etc/passwd")
        assert out.strip() == "0", out
        # Paused to disk and restored, the VM gets its layer disk back.
        await tengine.pause(vm.id)
        assert (await tengine.resume(vm.id)).resumed_processes is True
        assert await sh(tengine, vm.id, "cat /opt/mv; mvhi") == (0, "mv\nfrom-the-layer\n")
    finally:
        await tengine.kill(vm.id)
    # A template that only fills /workspace has no layer: every tier can start from it.
    ws = await tengine.build_template(TemplateSpec(name="ws-only", run=["echo w > /workspace/w"]))
    assert ws.layer is None
    # Neither has a snapshot of a sandbox without a template.
    sb = await tengine.create(SandboxSpec(runtime="namespace"))
    try:
        await sh(tengine, sb.id, "echo to-the-vm > /workspace/v")
        await tengine.snapshot(sb.id, "plain-ws")
    finally:
        await tengine.kill(sb.id)
    vm = await tengine.create(SandboxSpec(runtime="microvm", template="plain-ws"))
    try:
        _, out = await sh(tengine, vm.id, "cat /workspace/v")
        assert out.strip() == "to-the-vm"
    finally:
        await tengine.kill(vm.id)
    vm = await tengine.create(SandboxSpec(runtime="microvm", template="ws-only"))
    try:
        _, out = await sh(tengine, vm.id, "cat /workspace/w")
        assert out.strip() == "w"
    finally:
        await tengine.kill(vm.id)


# ----- bad specs -----------------------------------------------------------------------------

@pytest.mark.parametrize("body, match", [
    ({"name": "x", "colour": "red"}, "colour"),
    ({"name": "Bad Name"}, "name"),
    ({"name": "x", "apt": ["--allow-unauthenticated"]}, "apt package"),
    ({"name": "x", "pip": ["-e ."]}, "pip requirement"),
    ({"name": "x", "files": [{"src": "/etc/hosts", "dest": "relative"}]}, "dest"),
    ({"name": "x", "files": [{"src": "/etc/hosts", "dest": "/opt/../etc/x"}]}, "dest"),
    ({"name": "x", "apt_sources": ["deb file:/srv ./"]}, "http"),
])
def test_bad_spec_fields(body: dict[str, Any], match: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        TemplateSpec.model_validate(body)


async def test_bad_specs_at_build(tengine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        await tengine.build_template(TemplateSpec(
            name="x", files=[TemplateFile(src=str(tmp_path / "nope"), dest="/opt/nope")]))
    with pytest.raises(CommandError, match="exit code 3") as exc:
        await tengine.build_template(TemplateSpec(
            name="broken", run=["echo step-one-output", "echo about-to-fail; exit 3"]))
    assert "about-to-fail" in exc.value.message  # the log tail
    assert not tengine.templates.exists("broken")
    assert "about-to-fail" in tengine.template_log("broken")
    assert not list(tengine.templates.root.glob(".build-*"))
    with pytest.raises(NotFoundError, match="no template"):
        await tengine.create(SandboxSpec(runtime="namespace", template="broken"))
    with pytest.raises(ConfigError, match="workdir /srv/app does not exist"):
        await tengine.build_template(TemplateSpec(name="nowd", workdir="/srv/app"))
    assert not tengine.templates.exists("nowd")


async def test_build_egress_is_limited(tengine: Engine, packages: PackageServer) -> None:
    probe = (f"python3 -c \"import urllib.request as u; u.urlopen('http://{OTHER_HOST}/leak')\""
             " && echo reached > /workspace/r || echo blocked > /workspace/r")
    await tengine.build_template(TemplateSpec(name="egress", run=[probe],
                                              allow_net=[DEB_HOST]))
    assert not any(r.startswith(OTHER_HOST) for r in packages.requests)
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="egress"))
    try:
        _, out = await sh(tengine, sb.id, "cat /workspace/r")
        assert out.strip() == "blocked"
    finally:
        await tengine.kill(sb.id)
    # The same request is let through once its host is allowed: the block above was the policy.
    allowed = probe.replace("/leak", "/allowed")
    await tengine.build_template(TemplateSpec(name="egress2", run=[allowed],
                                              allow_net=[OTHER_HOST]))
    assert any(r.startswith(OTHER_HOST) and r.endswith("/allowed") for r in packages.requests)


async def test_rm_while_in_use_keeps_the_layer_until_unused(tengine: Engine) -> None:
    info = await tengine.build_template(TemplateSpec(name="inuse", run=["echo v > /opt/v"]))
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="inuse"))
    try:
        tengine.remove_template("inuse")
        assert tengine.templates.dir(info.hash).is_dir()
        _, out = await sh(tengine, sb.id, "cat /opt/v")
        assert out.strip() == "v"
    finally:
        await tengine.kill(sb.id)
    tengine.templates.collect({info.hash})
    assert not tengine.templates.dir(info.hash).exists()


async def test_template_not_found_and_rm(tengine: Engine) -> None:
    with pytest.raises(NotFoundError, match="no template 'nope'"):
        await tengine.create(SandboxSpec(runtime="namespace", template="nope"))
    info = await tengine.build_template(TemplateSpec(name="gone", run=["touch /opt/g"]))
    tengine.remove_template("gone")
    assert not tengine.templates.dir(info.hash).exists()
    with pytest.raises(NotFoundError):
        tengine.remove_template("gone")


# ----- snapshots and fork --------------------------------------------------------------------

async def test_snapshot_then_create(tengine: Engine) -> None:
    await tengine.build_template(TemplateSpec(name="base", run=["echo base > /opt/base"]))
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="base"))
    try:
        await sh(tengine, sb.id, "mkdir -p /workspace/proj && echo v1 > /workspace/proj/a")
        snap = await tengine.snapshot(sb.id, "my-env")
        assert snap.kind == "snapshot" and snap.parent == "base"
    finally:
        await tengine.kill(sb.id)
    new = await tengine.create(SandboxSpec(runtime="namespace", template="my-env"))
    try:
        _, out = await sh(tengine, new.id, "cat /workspace/proj/a /opt/base")
        assert out.split() == ["v1", "base"]
    finally:
        await tengine.kill(new.id)
    with pytest.raises(ConfigError, match="invalid"):
        await tengine.snapshot(new.id, "../etc")


async def test_snapshot_of_plain_sandbox_and_names(tengine: Engine) -> None:
    sb = await tengine.create(SandboxSpec(runtime="namespace"))
    try:
        await sh(tengine, sb.id, "echo plain > /workspace/p")
        for bad in ("", "UPPER", "a/b", "x" * 80, "-lead"):
            with pytest.raises(ConfigError):
                await tengine.snapshot(sb.id, bad)
        snap = await tengine.snapshot(sb.id, "plain")
        assert snap.layer is None and snap.parent is None
    finally:
        await tengine.kill(sb.id)
    new = await tengine.create(SandboxSpec(runtime="namespace", template="plain"))
    try:
        _, out = await sh(tengine, new.id, "cat /workspace/p")
        assert out.strip() == "plain"
    finally:
        await tengine.kill(new.id)


async def test_snapshot_other_tenant_is_not_found(tengine: Engine) -> None:
    sb = await tengine.create(SandboxSpec(runtime="namespace"), owner="alice")
    try:
        with pytest.raises(NotFoundError):
            await tengine.snapshot(sb.id, "stolen", owner="mallory")
        with pytest.raises(NotFoundError):
            await tengine.fork(sb.id, owner="mallory")
        assert not tengine.templates.exists("stolen", "mallory")
    finally:
        await tengine.kill(sb.id)


async def test_fork_diverges_both_ways(tengine: Engine) -> None:
    parent = await tengine.create(SandboxSpec(runtime="namespace", env={"P": "1"}))
    child_id = None
    try:
        await sh(tengine, parent.id, "echo before > /workspace/shared")
        child = await tengine.fork(parent.id)
        child_id = child.id
        assert child.id != parent.id and child.metadata["sealbox.forked_from"] == parent.id
        assert child.metadata["sealbox.fork"] == "workspace"
        _, out = await sh(tengine, child.id, "cat /workspace/shared; echo $P")
        assert out.split() == ["before", "1"]
        await sh(tengine, child.id, "echo child > /workspace/only-child")
        await sh(tengine, parent.id, "echo parent > /workspace/only-parent; "
                                     "echo changed > /workspace/shared")
        code, _ = await sh(tengine, parent.id, "test -e /workspace/only-child")
        assert code != 0
        code, _ = await sh(tengine, child.id, "test -e /workspace/only-parent")
        assert code != 0
        _, out = await sh(tengine, child.id, "cat /workspace/shared")
        assert out.strip() == "before"
    finally:
        await tengine.kill(parent.id)
        if child_id:
            await tengine.kill(child_id)


def console(sandbox_id: str) -> str:
    return (RUN_ROOT / sandbox_id / "private" / "console.log").read_text(errors="replace")


async def test_microvm_fork_is_the_running_sandbox(tengine: Engine) -> None:
    """On microvm a fork carries processes and memory; the child has its own name, id,
    secrets' placeholders and kernel randomness, and the two diverge."""
    if not registry.get("microvm").probe().ok:
        pytest.skip(registry.get("microvm").probe().detail)
    from sealbox.egress.secrets import SecretSpec

    parent = await tengine.create(SandboxSpec(runtime="microvm", timeout=300, env={"P": "1"},
                                              secrets={"TOKEN": SecretSpec(
                                                  value="real-value-xyz", hosts=[OTHER_HOST])}))
    child_id = None
    try:
        await tengine.run(parent.id, ExecRequest(cmd=counter(), background=True))
        _, blob = await sh(tengine, parent.id, until_counted() + "; head -c 1000000 "
                           "/dev/urandom > /tmp/blob; sha256sum < /tmp/blob")
        _, before = await sh(tengine, parent.id, "cat /workspace/c")
        child = await tengine.fork(parent.id)
        child_id = child.id
        assert child.metadata["sealbox.forked_from"] == parent.id and child.runtime == "microvm"
        assert child.metadata["sealbox.fork"] == "vm"
        # The same shell, counting on from where the parent was; the same memory-only /tmp.
        check = "cat /workspace/c; sha256sum < /tmp/blob; hostname; echo $SEALBOX_SANDBOX_ID $P"
        code, out = await sh(tengine, child.id, check)
        assert code == 0, out
        lines = out.splitlines()
        assert int(before) <= int(lines[0]) < int(before) + 60, (before, out)
        assert lines[1] == blob.strip() and lines[2] == child.id
        assert lines[3] == f"{child.id} 1"
        p_ph, c_ph = parent.secrets["TOKEN"].placeholder, child.secrets["TOKEN"].placeholder
        assert p_ph and c_ph and p_ph != c_ph
        assert (await sh(tengine, child.id, "echo $TOKEN"))[1].strip() == c_ph
        # Fresh kernel randomness: a copied random state would give both the same bytes (until
        # the kernel reseeds on its own, which is why the console says it was done).
        rand = "head -c 16 /dev/urandom | od -An -tx1"
        assert (await sh(tengine, child.id, rand))[1] != (await sh(tengine, parent.id, rand))[1]
        reseeded = "init: kernel randomness reseeded"
        assert reseeded in console(child.id) and reseeded not in console(parent.id)
        # Both run on, apart: the parent kept its name, its counter and its files.
        code, out = await sh(tengine, parent.id, f"hostname; {check}")
        assert out.splitlines()[0] == parent.id and int(out.splitlines()[1]) > int(before)
        await sh(tengine, child.id, "echo child > /workspace/only-child")
        assert (await sh(tengine, parent.id, "test -e /workspace/only-child"))[0] != 0
        code, out = await sh(tengine, child.id, "c=$(cat /workspace/c); sleep 1; "
                                                "test $(cat /workspace/c) -gt $c && echo counting")
        assert out.strip() == "counting", out
    finally:
        await tengine.kill(parent.id)
        if child_id:
            await tengine.kill(child_id)
    assert gone(parent.id) == [] and (child_id is None or gone(child_id) == [])


async def test_microvm_snapshot_keeps_the_running_sandbox(tengine: Engine) -> None:
    """A microvm snapshot saves the running VM too: every microvm sandbox of the same size
    made from it is a copy, processes and all, each with its own name and randomness. Other
    tiers and sizes start from its files."""
    if not registry.get("microvm").probe().ok:
        pytest.skip(registry.get("microvm").probe().detail)
    src = await tengine.create(SandboxSpec(runtime="microvm", timeout=300))
    try:
        await tengine.run(src.id, ExecRequest(cmd=counter(), background=True))
        await sh(tengine, src.id, until_counted() + "; echo in-memory > /tmp/m")
        info = await tengine.snapshot(src.id, "mem-snap")
        assert info.memory == "microvm"
        _, at_snap = await sh(tengine, src.id, "cat /workspace/c")
    finally:
        await tengine.kill(src.id)
    copies = [await tengine.create(SandboxSpec(runtime="microvm", template="mem-snap"))
              for _ in range(2)]
    # A warm pool of the snapshot holds copies too; a claim gives the claimant's id and env.
    await tengine.pools.set(PoolConfig(template="mem-snap", runtime="microvm", size=1))
    await wait_ready(tengine, "mem-snap/microvm", 1)
    pooled = await tengine.create(SandboxSpec(runtime="microvm", template="mem-snap",
                                              env={"WHO": "claimant"}))
    assert was_pooled(tengine, pooled.id)
    copies.append(pooled)
    try:
        for c in copies:
            code, out = await sh(tengine, c.id, "c=$(cat /workspace/c); sleep 1; "
                                                "echo $c $(cat /workspace/c); cat /tmp/m; hostname;"
                                                " echo $SEALBOX_SANDBOX_ID $WHO")
            assert code == 0, out
            lines = out.split("\n")
            (first, later), m, host = lines[0].split(), lines[1], lines[2]
            # The same shell, counting on from around where the snapshot was taken.
            assert int(first) < int(at_snap) + 60 and int(later) > int(first), out
            assert (m, host) == ("in-memory", c.id)
            assert lines[3].split()[0] == c.id
            assert "init: kernel randomness reseeded" in console(c.id)
        assert lines[3] == f"{pooled.id} claimant"
    finally:
        await tengine.pools.remove("mem-snap", "microvm")
        for c in copies:
            await tengine.kill(c.id)
    # Elsewhere (another tier, another VM size): its files, nothing running.
    for spec in (SandboxSpec(runtime="namespace", template="mem-snap"),
                 SandboxSpec(runtime="microvm", template="mem-snap", memory="256MiB")):
        other = await tengine.create(spec)
        try:
            code, out = await sh(tengine, other.id, "c=$(cat /workspace/c); sleep 0.5; "
                                                    "test $(cat /workspace/c) = $c && echo still; "
                                                    "test -e /tmp/m || echo no-tmp")
            assert out.split() == ["still", "no-tmp"], (spec.runtime, out)
        finally:
            await tengine.kill(other.id)


async def test_hostile_snapshot_content(tengine: Engine, tmp_path: Path) -> None:
    marker = tmp_path / "host-marker"
    marker.write_text("host secret\n")
    os.chmod(tmp_path, 0o755)
    sb = await tengine.create(SandboxSpec(runtime="namespace", disk="64MiB"))
    try:
        await sh(tengine, sb.id,
                 f"cd /workspace && ln -s /etc/shadow shadow && ln -s {marker} marker && "
                 "ln -s ../../../../../ up && mkfifo fifo && "
                 "head -c 40000000 /dev/zero > big")
        snap = await tengine.snapshot(sb.id, "hostile")
    finally:
        await tengine.kill(sb.id)
    assert marker.read_text() == "host secret\n"
    # What the host stored is the sandbox's own tar: unpacked only inside sandboxes.
    assert not list(tengine.templates.dir(snap.hash).rglob("shadow"))
    new = await tengine.create(SandboxSpec(runtime="namespace", template="hostile"))
    try:
        _, out = await sh(tengine, new.id, "cat /workspace/shadow | wc -c; "
                                           "readlink /workspace/up; cat /workspace/marker")
        lines = out.split("\n")
        assert lines[0].strip() == "0"  # the sandbox's masked /etc/shadow, not the host's
        assert "host secret" not in out
        code, _ = await sh(tengine, new.id, "echo x > /workspace/up/etc/passwd-evil")
        assert code != 0
    finally:
        await tengine.kill(new.id)
    # Past the disk limit: the new sandbox fails to start, cleanly, with a clear error.
    with pytest.raises(SandboxError, match="disk limit"):
        await tengine.create(SandboxSpec(runtime="namespace", template="hostile", disk="32MiB"))
    assert not [i for i in tengine.list() if i.template == "hostile"]


# ----- REST, SDK (remote) and CLI ------------------------------------------------------------

def test_remote_sdk_and_cli(tmp_path: Path) -> None:
    import sys

    import httpx

    from sealbox import Sandbox, Template
    from support.server import ADMIN_KEY, start_server

    data = tmp_path / "data"
    data.mkdir()
    server = start_server(data)
    env = {**os.environ, "SEALBOX_URL": server.url, "SEALBOX_API_KEY": ADMIN_KEY}
    cli = [sys.executable, "-c", "from sealbox.cli.main import main; main()"]
    try:
        src = tmp_path / "hello.txt"
        src.write_text("inline file\n")
        events: list[dict[str, Any]] = []
        info = Template.build({"name": "remote", "files": [{"src": str(src),
                                                            "dest": "/opt/hello.txt"}],
                               "run": ["echo ran > /workspace/ran"]},
                              progress=events.append, url=server.url, api_key=ADMIN_KEY)
        assert info.name == "remote" and any(e["type"] == "step" for e in events)
        assert [t.name for t in Template.list(url=server.url, api_key=ADMIN_KEY)] == ["remote"]
        assert "==> run echo ran" in Template.logs("remote", url=server.url, api_key=ADMIN_KEY)
        # A bad spec is a 400 before any build starts.
        r = httpx.post(f"{server.url}/v1/templates", json={"name": "x", "bogus": 1},
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"
        # A server never reads its own disk for a build's files.
        r = httpx.post(f"{server.url}/v1/templates", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       json={"name": "x", "files": [{"src": "/etc/hostname", "dest": "/opt/h"}]})
        assert r.status_code == 400 and "inline" in r.json()["error"]["message"]
        r = httpx.post(f"{server.url}/v1/templates", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       json={"name": "x", "run": ["exit 7"]})
        assert r.status_code == 200 and '"type": "error"' in r.text and "exit code 7" in r.text
        assert "x" not in [t.name for t in Template.list(url=server.url, api_key=ADMIN_KEY)]
        with Sandbox.create(runtime="namespace", template="remote", url=server.url,
                            api_key=ADMIN_KEY) as sb:
            assert sb.exec("cat /opt/hello.txt /workspace/ran").stdout.split() == [
                "inline", "file", "ran"]
            sb.files.write("/workspace/mine", b"mine")
            snap = sb.snapshot("remote-snap")
            assert snap.parent == "remote"
            with sb.fork() as child:  # closing the fork leaves the parent's connection open
                assert child.info.metadata["sealbox.fork"] == "workspace"
                assert child.files.read("/workspace/mine") == b"mine"
                assert child.exec("cat /opt/hello.txt").stdout == "inline file\n"
                child.files.write("/workspace/child-only", b"c")
                assert not sb.files.exists("/workspace/child-only")
            assert sb.exec("true").exit_code == 0
            # CLI against the server: snapshot and fork print what they made.
            out = subprocess.run([*cli, "snapshot", sb.id, "cli-snap"], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "cli-snap" in out.stdout, out.stderr
            out = subprocess.run([*cli, "fork", sb.id], env=env, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0 and "a copy of /workspace" in out.stdout, out.stderr
            subprocess.run([*cli, "kill", out.stdout.split()[-1]], env=env, check=True,
                           capture_output=True, timeout=120)
            out = subprocess.run([*cli, "snapshot", sb.id, "Bad/Name"], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and "invalid" in out.stderr
        out = subprocess.run([*cli, "template", "build", "cli-remote", "--file",
                              f"{src}:/opt/from-cli", "--run", "cat /opt/from-cli"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "template cli-remote" in out.stdout, out.stderr
        out = subprocess.run([*cli, "template", "logs", "cli-remote"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert "inline file" in out.stdout  # the client's file reached the server's build
        out = subprocess.run([*cli, "template", "ls"], env=env, capture_output=True, text=True,
                             timeout=120)
        assert {"remote", "remote-snap", "cli-snap", "cli-remote"} <= set(out.stdout.split())
        with Sandbox.create(runtime="namespace", template="cli-snap", url=server.url,
                            api_key=ADMIN_KEY) as sb2:
            assert sb2.files.read("/workspace/mine") == b"mine"
        out = subprocess.run([*cli, "create", "--runtime", "namespace", "--template", "cli-snap"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        created = out.stdout.split()[-1]
        out = subprocess.run([*cli, "exec", created, "--", "cat", "/workspace/mine"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert (out.returncode, out.stdout) == (0, "mine")
        subprocess.run([*cli, "kill", created], env=env, check=True, capture_output=True,
                       timeout=120)
        out = subprocess.run([*cli, "template", "rm", "nope"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 1 and "no template 'nope'" in out.stderr
    finally:
        assert server.stop()


def test_cli_embedded_build(tmp_path: Path, packages: PackageServer) -> None:
    import sys

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: cli-apt\napt: [sealbox-hello]\n"
                    f"apt_sources: ['deb [trusted=yes] http://{DEB_HOST}/ ./']\n")
    env = {**os.environ, "SEALBOX_DATA_DIR": str(tmp_path / "data")}
    env.pop("SEALBOX_URL", None)
    cli = [sys.executable, "-c", "from sealbox.cli.main import main; main()"]
    pin = f"{DEB_HOST}:80:127.0.0.1:{packages.port}"
    out = subprocess.run([*cli, "template", "build", "-f", str(spec), "--resolve", pin],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "template cli-apt" in out.stdout
    out = subprocess.run([*cli, "run", "--runtime", "namespace", "--template", "cli-apt", "--",
                          "sealbox-hello"], env=env, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "hello from a deb"), out.stderr
    out = subprocess.run([*cli, "template", "build", "x", "--colour", "red"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrun: [1, 2\n")
    out = subprocess.run([*cli, "template", "build", "-f", str(bad)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not valid yaml" in out.stderr
    out = subprocess.run([*cli, "template", "logs", "cli-apt"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert "sealbox-hello" in out.stdout


# ----- more security and lifecycle -----------------------------------------------------------

def _overlay_mounts() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "overlay" and left.split()[4].startswith("/run/sealbox"):
            points.append(left.split()[4])
    return points


async def test_build_cannot_touch_the_host_or_plant_setuid(tengine: Engine) -> None:
    env_before = hashlib.sha256(Path("/usr/bin/env").read_bytes()).hexdigest()
    info = await tengine.build_template(TemplateSpec(name="hostile-build", run=[
        "cp /bin/sh /opt/suidsh && chmod 4755 /opt/suidsh && ls -l /opt/suidsh",
        "mkfifo /opt/fifo && ln -s /etc/shadow /opt/link-shadow",
        "rm /usr/bin/env && echo '#!/bin/sh' > /usr/bin/env && echo pwned >> /usr/bin/env",
        "echo x >> /usr/bin/head || echo in-place-refused > /opt/in-place",
        "echo x > /etc/passwd || echo passwd-refused > /opt/passwd",
    ]))
    assert hashlib.sha256(Path("/usr/bin/env").read_bytes()).hexdigest() == env_before
    assert not Path("/opt/suidsh").exists() and not Path("/opt/fifo").exists()
    layer = tengine.templates.dir(info.hash) / "layer"
    suid = (layer / "opt" / "suidsh").lstat()
    assert suid.st_uid == 0 and not suid.st_mode & 0o6000
    assert not (layer / "opt" / "fifo").exists() and not (layer / "opt" / "fifo").is_symlink()
    assert (layer / "opt" / "link-shadow").is_symlink()
    assert not _overlay_mounts()
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="hostile-build"))
    try:
        _, out = await sh(tengine, sb.id, "cat /opt/in-place /opt/passwd /usr/bin/env; "
                                          "stat -c %a /opt/suidsh")
        assert out.split() == ["in-place-refused", "passwd-refused", "#!/bin/sh", "pwned",
                               "755"], out
        # The symlink resolves inside the sandbox, whose /etc/shadow is masked.
        _, out = await sh(tengine, sb.id, "cat /opt/link-shadow")
        assert "root:" not in out
    finally:
        await tengine.kill(sb.id)


async def test_templates_belong_to_their_tenant(tengine: Engine) -> None:
    await tengine.build_template(TemplateSpec(name="alices", run=["touch /opt/a"]), "alice")
    await tengine.build_template(TemplateSpec(name="shared", run=["touch /opt/s"]))
    with pytest.raises(NotFoundError):
        await tengine.create(SandboxSpec(runtime="namespace", template="alices"), owner="bob")
    assert [t.name for t in tengine.list_templates("bob")] == ["shared"]
    assert {t.name for t in tengine.list_templates("alice")} == {"alices", "shared"}
    with pytest.raises(NotFoundError):
        tengine.remove_template("shared", "bob")  # shared for use, not for removal
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="shared"), owner="bob")
    await tengine.kill(sb.id)
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="alices"), owner="alice")
    await tengine.kill(sb.id)


async def test_workdir_start_and_parent_removal(tengine: Engine) -> None:
    await tengine.build_template(TemplateSpec(name="svc", workdir="/opt",
                                              start="exec sleep 300"))
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="svc"))
    try:
        _, out = await sh(tengine, sb.id, "pwd; ps -eo args | grep -c '^sleep 300'")
        assert out.split() == ["/opt", "1"]
        await sh(tengine, sb.id, "echo kept > /workspace/k")
        await tengine.snapshot(sb.id, "svc-snap")
    finally:
        await tengine.kill(sb.id)
    tengine.remove_template("svc")  # the snapshot still uses its layer
    sb = await tengine.create(SandboxSpec(runtime="namespace", template="svc-snap"))
    try:
        _, out = await sh(tengine, sb.id, "cat /workspace/k; pwd")
        assert out.split() == ["kept", "/opt"]
    finally:
        await tengine.kill(sb.id)


async def test_fork_keeps_secrets_with_new_placeholders(tengine: Engine) -> None:
    from sealbox.egress.secrets import SecretSpec

    spec = SandboxSpec(runtime="namespace", secrets={
        "TOKEN": SecretSpec(value="real-value-xyz", hosts=[OTHER_HOST])})
    parent = await tengine.create(spec)
    child_id = None
    try:
        child = await tengine.fork(parent.id)
        child_id = child.id
        p_ph, c_ph = parent.secrets["TOKEN"].placeholder, child.secrets["TOKEN"].placeholder
        assert p_ph and c_ph and p_ph != c_ph
        _, out = await sh(tengine, child.id, "echo $TOKEN")
        assert out.strip() == c_ph and "real-value-xyz" not in out
    finally:
        await tengine.kill(parent.id)
        if child_id:
            await tengine.kill(child_id)


def test_build_owner_killed_midway_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL the process running a build; the next engine's reconcile removes all of it."""

    def in_build(sid: str) -> None:
        assert _overlay_mounts()

    sid = kill_build_owner(tmp_path / "data", TemplateSpec(
        name="slow", run=["touch /opt/x", "sleep 600"]), "==> run sleep 600", in_build)
    assert not [m for m in _overlay_mounts() if sid in m]
    assert not (Path("/run/sealbox") / sid).exists()
    assert not Path(f"/run/netns/sealbox-{sid}").exists()


async def test_build_disk_limit(tengine: Engine) -> None:
    with pytest.raises(CommandError, match="No space left") as exc:
        await tengine.build_template(TemplateSpec(
            name="filler", disk="100MiB", run=["head -c 200000000 /dev/zero > /opt/big"]))
    assert "exit code 1" in exc.value.message
    assert not tengine.templates.exists("filler")
    assert not list(tengine.templates.root.glob(".build-*"))
    assert not _overlay_mounts()
    # The scratch image's loop device auto-clears once the filesystem is released (a sandbox
    # starting elsewhere at that moment may hold a copy of the mount for a few milliseconds).
    data = str(tengine.config.data_dir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _loops_under(data):
        await asyncio.sleep(0.1)
    assert not _loops_under(data)


def _loops_under(prefix: str) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True).stdout
    devices = json.loads(out).get("loopdevices", []) if out.strip() else []
    return [d["name"] for d in devices if (d.get("back-file") or "").startswith(prefix)]


def test_rest_routes_match_openapi_and_tenants(tmp_path: Path) -> None:
    import httpx
    import schemathesis
    from support.server import ADMIN_KEY, start_server
    from test_api import Api

    data = tmp_path / "data"
    data.mkdir()
    server = start_server(data)
    try:
        schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())
        admin = Api(server.url, schema, ADMIN_KEY)
        keys = {t: admin.post("/v1/keys", json={"tenant": t}).json()["key"]
                for t in ("alice", "bob")}
        alice, bob = (Api(server.url, schema, keys[t]) for t in ("alice", "bob"))
        body = {"name": "a-tpl", "files": [{"dest": "/opt/f",
                                            "content_b64": base64.b64encode(b"f\n").decode()}]}
        with alice.stream("POST", "/v1/templates", json=body) as resp:
            assert resp.status_code == 200
            events = [json.loads(line) for line in resp.iter_lines() if line.strip()]
        assert events[-1]["type"] == "done" and events[-1]["template"]["name"] == "a-tpl"
        assert [t["name"] for t in alice.get("/v1/templates").json()] == ["a-tpl"]
        assert alice.get("/v1/templates/a-tpl").json()["hash"] == events[-1]["template"]["hash"]
        assert "==> file /opt/f" in alice.get("/v1/templates/a-tpl/logs").text
        assert bob.get("/v1/templates/a-tpl").status_code == 404
        assert bob.get("/v1/templates").json() == []
        r = bob.post("/v1/sandboxes", json={"runtime": "namespace", "template": "a-tpl"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = alice.post("/v1/sandboxes", json={"runtime": "namespace", "template": "a-tpl"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert r.json()["template"] == "a-tpl"
        try:
            assert bob.post(f"/v1/sandboxes/{sid}/snapshot", json={"name": "s"}).status_code == 404
            assert bob.post(f"/v1/sandboxes/{sid}/fork").status_code == 404
            r = alice.post(f"/v1/sandboxes/{sid}/snapshot", json={"name": "../x"})
            assert r.status_code == 400 and "invalid" in r.json()["error"]["message"]
            r = alice.post(f"/v1/sandboxes/{sid}/snapshot", json={"name": "a-snap"})
            assert r.status_code == 201 and r.json()["parent"] == "a-tpl"
            r = alice.post(f"/v1/sandboxes/{sid}/fork")
            assert r.status_code == 201 and r.json()["owner"] == "alice"
            assert alice.delete(f"/v1/sandboxes/{r.json()['id']}").status_code == 200
        finally:
            alice.delete(f"/v1/sandboxes/{sid}")
        assert alice.delete("/v1/templates/a-snap").status_code == 200
        assert alice.delete("/v1/templates/a-snap").status_code == 404
        for api in (admin, alice, bob):
            api.close()
    finally:
        assert server.stop()


def test_server_shutdown_during_a_build_leaves_nothing(tmp_path: Path) -> None:
    import time

    import httpx
    from support.server import ADMIN_KEY, start_server

    data = tmp_path / "data"
    data.mkdir()
    server = start_server(data)
    lines: list[str] = []

    def build() -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/templates", timeout=120,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                              json={"name": "long", "run": ["touch /opt/x", "sleep 600"]}) as r:
                lines.extend(r.iter_lines())
        except httpx.HTTPError as exc:
            lines.append(f"transport: {exc}")

    thread = threading.Thread(target=build)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list((data / "templates" / "logs").glob("*.log"))
        if logs and "==> run sleep 600" in logs[0].read_text():
            break
        time.sleep(0.2)
    build_dirs = list((data / "templates").glob(".build-*"))
    assert len(build_dirs) == 1 and _overlay_mounts()
    assert server.stop(), server.log.read_text()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert not any('"type": "done"' in line for line in lines)
    assert any('"type": "error"' in line and "shut down" in line for line in lines), lines
    assert not list((data / "templates").glob(".build-*"))
    sandbox_id = build_dirs[0].name.removeprefix(".build-")
    assert not [m for m in _overlay_mounts() if sandbox_id in m]
    assert not (Path("/run/sealbox") / sandbox_id).exists()
    assert not Path(f"/run/netns/sealbox-{sandbox_id}").exists()
