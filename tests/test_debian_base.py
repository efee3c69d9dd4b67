"""Templates on a Debian base: debootstrap in its own sandbox, then the usual build on top, and
the result booted by every tier in place of the host's system dirs.

The archive is local: the bookworm minbase packages fetched once by `scripts/debian-mirror`
(which `scripts/test` runs), served on 127.0.0.1 under a made-up name pinned with --resolve,
plus a hostile package of priority "required" (so debootstrap installs it) whose maintainer
script tries to plant a set-uid file and a device, and to reach a host outside the policy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RUN_ROOT
from support.builds import kill_build_owner
from test_templates import DEB_HOST, OTHER_HOST, PackageServer, make_deb, sh

from sealbox._sys import netns
from sealbox._sys.cgroups import Cgroup
from sealbox.egress.gateway import ResolvePin
from sealbox.engine.config import EngineConfig
from sealbox.engine.engine import Engine
from sealbox.engine.spec import SandboxSpec
from sealbox.engine.templates import TemplateSpec
from sealbox.errors import CommandError
from sealbox.runtimes import bootstrap, registry
from sealbox.runtimes.build import make_skeleton, within

pytestmark = pytest.mark.timeout(900)

MIRROR = Path(os.environ.get("SEALBOX_DEBIAN_MIRROR", "/var/cache/sealbox/debian-mirror"))
DEBIAN_HOST = "debian.sealbox.test"
SUITE = "bookworm"
SUITES = (SUITE, "trixie")
ESCAPE = "/run/sealbox-probe-escape"

PROBE_POSTINST = f"""#!/bin/sh
# Runs as root inside debootstrap's chroot: what can it do?
out=/etc/sealbox-probe
install -m 4755 /bin/true /usr/bin/sealbox-suid && echo suid-planted >> $out
mknod /dev/sealbox-mem c 1 1 2>/dev/null && echo device-made >> $out || echo no-device >> $out
perl -MIO::Socket::INET -e '
  my $s = IO::Socket::INET->new(PeerAddr => "{OTHER_HOST}", PeerPort => 80, Timeout => 5);
  if ($s) {{ print $s "GET /from-bootstrap HTTP/1.0\\r\\nHost: {OTHER_HOST}\\r\\n\\r\\n";
            my $l = <$s>; print(($l // "") =~ m{{^HTTP/\\S+ 200}} ? "net-open\\n" : "net-denied\\n") }}
  else {{ print "net-blocked\\n" }}' >> $out
cat /proc/self/uid_map >> $out
# Traps for the host: a symlink where sealbox marks a whole-system layer, and a top-level
# link out of the tree (a tier that recreates it on the host would follow it).
ln -s {ESCAPE} /.sealbox-rootfs
ln -s /etc /sealbox-out
exit 0
"""


def make_probe_deb(root: Path) -> Path:
    pkg = root / "probe"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: sealbox-probe\nVersion: 1.0\nArchitecture: all\nPriority: required\n"
        "Maintainer: sealbox tests <t@sealbox.test>\nDescription: hostile test package\n")
    postinst = pkg / "DEBIAN" / "postinst"
    postinst.write_text(PROBE_POSTINST)
    postinst.chmod(0o755)
    deb = root / "sealbox-probe_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)],
                   check=True, capture_output=True)
    return deb


def make_archive(root: Path) -> None:
    """/debian of the package server: the cached packages of each suite, unsigned, and the
    probe among bookworm's."""
    archive = root / "repo" / "debian"
    (archive / "pool" / "probe").mkdir(parents=True)
    shutil.move(str(make_probe_deb(root)), archive / "pool" / "probe")
    for suite in SUITES:
        (archive / "pool" / suite).symlink_to(MIRROR / "pool" / suite)
        packages = (MIRROR / "dists" / suite / "main" / "binary-amd64" / "Packages").read_bytes()
        if suite == SUITE:
            packages += subprocess.run(["apt-ftparchive", "packages", "pool/probe"],
                                       cwd=archive, check=True, capture_output=True).stdout
        dists = archive / "dists" / suite
        (dists / "main" / "binary-amd64").mkdir(parents=True)
        (dists / "main" / "binary-amd64" / "Packages").write_bytes(packages)
        release = subprocess.run(
            ["apt-ftparchive", "-o", f"APT::FTPArchive::Release::Suite={suite}",
             "-o", f"APT::FTPArchive::Release::Codename={suite}",
             "-o", "APT::FTPArchive::Release::Components=main",
             "-o", "APT::FTPArchive::Release::Architectures=amd64", "release",
             f"dists/{suite}"], cwd=archive, check=True, capture_output=True).stdout
        (dists / "Release").write_bytes(release)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PackageServer]:
    if not all((MIRROR / "dists" / suite / "Release").is_file() for suite in SUITES):
        pytest.skip(f"no local Debian archive at {MIRROR}: scripts/debian-mirror makes it "
                    "(scripts/test runs it first)")
    root = tmp_path_factory.mktemp("debian-archive")
    make_deb(root)  # the flat repository of sealbox-hello, at /repo
    make_archive(root)
    server = PackageServer(root)
    yield server
    server.close()


@pytest.fixture
async def dengine(data_dir: Path, archive: PackageServer) -> AsyncIterator[Engine]:
    pins = [ResolvePin.parse(f"{h}:80:127.0.0.1:{archive.port}")
            for h in (DEB_HOST, DEBIAN_HOST, OTHER_HOST)]
    eng = Engine(EngineConfig(data_dir=data_dir, resolve=pins))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


def debian_spec(name: str, **extra: Any) -> TemplateSpec:
    return TemplateSpec(
        name=name, base="debian", suite=SUITE, mirror=f"http://{DEBIAN_HOST}/debian",
        mirror_trusted=True, apt=["sealbox-hello"],
        apt_sources=[f"deb [trusted=yes] http://{DEB_HOST}/ ./"],
        run=["echo built > /opt/built"], env={"FROM": "debian"}, **extra)


async def test_debian_base_build_and_boot_on_every_tier(dengine: Engine,
                                                        archive: PackageServer) -> None:
    events: list[dict[str, Any]] = []
    info = await dengine.build_template(debian_spec("deb-base"), progress=events.append)
    steps = [e["title"] for e in events if e["type"] == "step"]
    assert steps[0] == f"debootstrap {SUITE} from http://{DEBIAN_HOST}/debian", steps
    assert steps[1:3] == ["apt-get update", "apt install sealbox-hello"]
    assert any(r.startswith(f"{DEBIAN_HOST}/debian/pool/") for r in archive.requests)

    layer = dengine.templates.dir(info.hash) / "layer"
    mark = layer / ".sealbox-rootfs"
    assert mark.is_file() and not mark.is_symlink()
    assert not Path(ESCAPE).exists(), "the host wrote through the tree's symlink"
    assert not os.path.lexists(layer / "sealbox-out")
    assert os.readlink(layer / "bin") == "usr/bin"
    # The hostile maintainer script ran as root of the bootstrap's own user namespace: its
    # set-uid file lost its bit, it made no device, and it reached no host outside the policy.
    probe = (layer / "etc" / "sealbox-probe").read_text().split("\n")
    assert probe[:2] == ["suid-planted", "no-device"], probe
    assert probe[2] in ("net-blocked", "net-denied"), probe
    inside, outside, count = probe[3].split()
    assert inside == "0" and int(outside) >= bootstrap.ID_BASE and count == "65536"
    assert not any(OTHER_HOST in r for r in archive.requests)
    for p in layer.rglob("*"):
        st = p.lstat()
        assert not st.st_mode & 0o6000, p
        assert st.st_uid < 65536 and st.st_gid < 65536, p
    shadow = (layer / "etc" / "shadow").lstat()
    assert (shadow.st_uid, shadow.st_gid) == (0, 42)  # root:shadow, shifted back

    host_packages = len(subprocess.run(["dpkg-query", "-W"], capture_output=True,
                                       text=True).stdout.splitlines())
    tiers = ["namespace"] + [t for t in ("gvisor", "microvm") if registry.get(t).probe().ok]
    for tier in tiers:
        await check_debian_sandbox(dengine, tier, host_packages)

    # The same spec again: a cache hit, no debootstrap.
    before = len(archive.requests)
    events.clear()
    again = await dengine.build_template(debian_spec("deb-again"), progress=events.append)
    assert again.hash == info.hash and [e["type"] for e in events] == ["cached"]
    assert len(archive.requests) == before

    # A snapshot keeps the base: a sandbox made from it is still on Debian's tree.
    sb = await dengine.create(SandboxSpec(runtime="namespace", template="deb-base"))
    try:
        await sh(dengine, sb.id, "echo kept > /workspace/k")
        await dengine.snapshot(sb.id, "deb-snap")
    finally:
        await dengine.kill(sb.id)
    child = await dengine.create(SandboxSpec(runtime="namespace", template="deb-snap"))
    try:
        code, out = await sh(dengine, child.id, "cat /workspace/k; sealbox-hello; "
                                                "test -e /usr/bin/bwrap || echo no-bwrap")
        assert (code, out.split()) == (0, ["kept", "hello", "from", "a", "deb", "no-bwrap"])
    finally:
        await dengine.kill(child.id)


async def check_debian_sandbox(engine: Engine, tier: str, host_packages: int) -> None:
    sb = await engine.create(SandboxSpec(runtime=tier, template="deb-base"))
    try:
        code, out = await sh(engine, sb.id, "sealbox-hello; cat /opt/built; echo $FROM; id -un")
        assert (code, out.split()) == (0, ["hello", "from", "a", "deb", "built", "debian",
                                           "user"]), (tier, out)
        # Debian's tree, not the host's: the host's own programs are not there, and dpkg
        # knows only the base's packages.
        for prog in ("/usr/bin/bwrap", "/usr/bin/runsc", "/usr/bin/qemu-system-x86_64"):
            assert Path(prog).exists()
            code, _ = await sh(engine, sb.id, f"test -e {prog}")
            assert code != 0, (tier, prog)
        code, out = await sh(engine, sb.id, "dpkg-query -W | wc -l")
        assert code == 0 and 50 < int(out) < host_packages, (tier, out)
        # Read-only, no set-id programs, and the base's shadow file is not the user's to read.
        code, _ = await sh(engine, sb.id, "echo x > /usr/bin/sealbox-hello")
        assert code != 0, tier
        code, out = await sh(engine, sb.id, "find /usr -xdev -perm /6000 -type f | head -3")
        assert (code, out.strip()) == (0, ""), (tier, out)
        code, out = await sh(engine, sb.id, "cat /etc/shadow")
        assert "root:" not in out, (tier, out)
    finally:
        await engine.kill(sb.id)


async def test_debian_base_bad_archive_fails_clearly(dengine: Engine) -> None:
    spec = TemplateSpec(name="deb-bad", base="debian", suite=SUITE,
                        mirror=f"http://{DEBIAN_HOST}/nothing-here", mirror_trusted=True)
    with pytest.raises(CommandError, match="debootstrap bookworm") as err:
        await dengine.build_template(spec)
    assert "Release" in str(err.value)  # the log tail says what debootstrap could not get
    assert not dengine.templates.list(None)
    # The signature is checked unless the spec says otherwise: this archive is unsigned.
    signed = TemplateSpec(name="deb-unsigned", base="debian", suite=SUITE,
                          mirror=f"http://{DEBIAN_HOST}/debian")
    with pytest.raises(CommandError, match="debootstrap"):
        await dengine.build_template(signed)


@pytest.mark.parametrize(("body", "match"), [
    ({"suite": "bookworm"}, "for base 'debian'"),
    ({"base": "debian", "suite": "Book Worm"}, "not a Debian suite"),
    ({"base": "debian", "mirror": "ftp://deb.debian.org/debian"}, "http"),
    ({"base": "ubuntu"}, "'host' or 'debian'"),
])
def test_bad_debian_specs(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TemplateSpec.model_validate({"name": "x", **body})


async def test_bootstrap_sandbox_is_root_of_nothing(tmp_path: Path) -> None:
    """What debootstrap's sandbox allows: root of its own ids only, no mount, device or new
    namespace, the host read-only; and nothing of it left afterwards."""
    ns = "sealbox-bstest"
    run_dir = RUN_ROOT / "sbbstest"
    await asyncio.to_thread(netns.create, ns)
    output = bytearray()
    try:
        run_dir.mkdir(mode=0o711)
        spec = bootstrap.Bootstrap(sandbox_id="sbbstest", netns=ns, target=tmp_path / "t",
                                   run_dir=run_dir, suite=SUITE,
                                   mirror="http://unused.sealbox.test/debian")
        script = ("id -u; cat /proc/self/uid_map; touch /target/f && chown 42:42 /target/f; "
                  "mknod /target/n c 1 3 || echo no-mknod; mount -t tmpfs x /tmp || "
                  "echo no-mount; unshare -U true || echo no-userns; "
                  "echo x > /usr/sealbox-x || echo no-host-write; "
                  "cat /etc/shadow | grep -c root || echo no-shadow; "
                  "grep CapEff /proc/self/status; cat /proc/sys/user/max_user_namespaces")
        code = await bootstrap.run(spec, output.extend, ["/bin/sh", "-c", script])
    finally:
        await asyncio.to_thread(netns.delete, ns)
    left = list(run_dir.glob("*"))
    shutil.rmtree(run_dir, ignore_errors=True)
    text = output.decode(errors="replace")
    assert code == 0, text
    lines = text.split("\n")
    assert lines[0] == "0"
    first = bootstrap.id_base_for("sbbstest")
    assert lines[1].split() == ["0", str(first), "65536"]
    for word in ("no-mknod", "no-mount", "no-userns", "no-host-write", "no-shadow"):
        assert word in lines, (word, text)
    assert lines[-2] == "0"
    # Root of its own ids, but without the capabilities that open namespaces, mounts or
    # netfilter: CAP_SYS_ADMIN (21) and CAP_NET_ADMIN (12) are not among them.
    caps = int(lines[-3].split()[1], 16)
    assert caps & (1 << 0) and caps & (1 << 18)  # CAP_CHOWN, CAP_SYS_CHROOT
    assert not caps & (1 << 21) and not caps & (1 << 12), hex(caps)
    f = (tmp_path / "t" / "f").lstat()
    assert (f.st_uid, f.st_gid) == (first + 42, first + 42)
    assert not (tmp_path / "t" / "n").exists()
    assert not Cgroup("sbbstest").exists()
    assert not left, "the target's bind mount is left"
    assert not Path("/usr/sealbox-x").exists()


def test_cli_builds_and_runs_on_a_debian_base(tmp_path: Path, archive: PackageServer) -> None:
    import sys

    env = {**os.environ, "SEALBOX_DATA_DIR": str(tmp_path / "data")}
    env.pop("SEALBOX_URL", None)
    cli = [sys.executable, "-c", "from sealbox.cli.main import main; main()"]
    pin = f"{DEBIAN_HOST}:80:127.0.0.1:{archive.port}"
    out = subprocess.run([*cli, "template", "build", "deb-cli", "--base", "debian", "--suite",
                          SUITE, "--mirror", f"http://{DEBIAN_HOST}/debian", "--mirror-trusted",
                          "--resolve", pin], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "template deb-cli" in out.stdout
    out = subprocess.run([*cli, "run", "--runtime", "namespace", "--template", "deb-cli", "--",
                          "sh", "-c", "test -e /usr/bin/bwrap || cat /etc/debian_version"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("12."), (out.stdout, out.stderr)
    out = subprocess.run([*cli, "template", "logs", "deb-cli"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert "Base system installed successfully" in out.stdout
    # A user mistake is one clear line, no traceback.
    out = subprocess.run([*cli, "template", "build", "x", "--mirror", "http://m/debian"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "for base 'debian'" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_tree_with_symlinks_out_never_leads_the_host_to_its_own_files(tmp_path: Path) -> None:
    """A Debian tree is written by maintainer scripts: where it holds symlinks to absolute
    paths, the host-side build steps must not follow them to the host's own dirs."""
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "var").symlink_to("/var")  # so var/lib/dpkg is the host's package database
    (root / "etc").symlink_to("/etc")
    (root / "usr" / "share").mkdir(parents=True)
    assert within(root, "var/lib/dpkg") is None and within(root, "etc") is None
    assert within(root, "usr/share") == root / "usr" / "share"
    upper = tmp_path / "upper"
    make_skeleton(upper, os.getuid(), root)
    assert not (upper / "var" / "lib" / "dpkg").exists()
    assert not (upper / "etc").exists()
    assert (upper / "usr" / "share").is_dir()


async def test_another_debian_release(dengine: Engine) -> None:
    """A base need not be the host's release: trixie (Debian 13, Python 3.13) on this bookworm
    host, its own python running every tier's guest agent."""
    await dengine.build_template(TemplateSpec(
        name="trixie", base="debian", suite="trixie", mirror=f"http://{DEBIAN_HOST}/debian",
        mirror_trusted=True))
    tiers = ["namespace"] + [t for t in ("gvisor", "microvm") if registry.get(t).probe().ok]
    for tier in tiers:
        sb = await dengine.create(SandboxSpec(runtime=tier, template="trixie"))
        try:
            code, out = await sh(dengine, sb.id, "cut -d. -f1 /etc/debian_version; python3 -c "
                                 "'import sys; print(sys.version_info[:2])'; id -un")
            assert (code, out.split("\n")[:3]) == (0, ["13", "(3, 13)", "user"]), (tier, out)
        finally:
            await dengine.kill(sb.id)


def _mounts_naming(word: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if word in line]


def test_build_owner_killed_during_debootstrap_leaves_nothing(tmp_path: Path,
                                                             archive: PackageServer) -> None:
    """SIGKILL the process whose build is in debootstrap; the next engine's reconcile removes
    the sandbox, its bind mount, scratch disk, netns, cgroup and build dir."""

    def in_debootstrap(sid: str) -> None:
        assert _mounts_naming(f"{sid}/bootstrap-target"), "not in debootstrap"
        assert Cgroup(sid).pids()

    sid = kill_build_owner(
        tmp_path / "data", TemplateSpec(name="deb", base="debian",
                                        mirror=f"http://{DEBIAN_HOST}/debian",
                                        mirror_trusted=True),
        "I: Unpacking", in_debootstrap, pins=[f"{DEBIAN_HOST}:80:127.0.0.1:{archive.port}"])
    assert not _mounts_naming(sid)
    assert not Cgroup(sid).exists()
    assert not (RUN_ROOT / sid).exists()
    assert not Path(f"/run/netns/sealbox-{sid}").exists()
