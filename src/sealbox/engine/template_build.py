"""Building a template: a sandboxed build whose writes to the system dirs become its layer.

The build runs in a namespace sandbox (runtimes/build.py) attached to the egress gateway with
the spec's build policy (the hosts its apt/pip/npm sources need plus ``allow_net``) and the
installation's ``--resolve`` pins. Steps: apt, pip, npm, files, run commands; then /workspace
is saved as the template's starting workspace. Nothing is registered unless every step passed.

On a Debian base, a first step makes the root filesystem with debootstrap (in a sandbox of its
own on the same netns, runtimes/bootstrap.py); the steps then run over it instead of the
host's dirs, and the template's layer is the whole merged system, marked as such.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sealbox._sys import netns, overlay
from sealbox._sys import volumes as volumes_sys
from sealbox.engine import workspace_tar
from sealbox.engine.spec import SandboxInfo, SandboxState
from sealbox.engine.store import now
from sealbox.engine.templates import TemplateInfo, TemplateSpec, content_hash, dir_size, new_info
from sealbox.errors import CommandError, ConfigError, SandboxError
from sealbox.guest.client import GuestClient, Output
from sealbox.runtimes import bootstrap
from sealbox.runtimes.base import LaunchSpec, Limits
from sealbox.runtimes.build import finalize, start_build
from sealbox.runtimes.layers import ROOTFS_MARK

if TYPE_CHECKING:
    from sealbox.engine.engine import Engine

Progress = Callable[[dict[str, Any]], None]
STEP_TIMEOUT = 3600.0
MAX_WORKSPACE = 4 * 1024**3
ROOTFS = "rootfs"
_APT = ["apt-get", "-y", "-q", "-o", "APT::Sandbox::User=root", "-o", "Dpkg::Use-Pty=0",
        "-o", "Acquire::Retries=0"]


def _steps(spec: TemplateSpec) -> list[tuple[str, list[str] | int]]:
    """(title, argv) per command; (title, index into files) for a file to put."""
    steps: list[tuple[str, list[str] | int]] = []
    if spec.apt:
        steps.append(("apt-get update", [*_APT, "update"]))
        steps.append((f"apt install {' '.join(spec.apt)}",
                      [*_APT, "install", "--no-install-recommends", "--", *spec.apt]))
    if spec.pip:
        pip = ["python3", "-m", "pip", "install", "--no-cache-dir", "--break-system-packages",
               "--root-user-action=ignore", "--disable-pip-version-check"]
        if spec.pip_index_url:
            pip += ["--index-url", spec.pip_index_url]
            if spec.pip_index_url.startswith("http://"):
                # The operator named a plain-HTTP index (a local mirror): trust it by name.
                pip += ["--trusted-host", urlsplit(spec.pip_index_url).hostname or ""]
        steps.append((f"pip install {' '.join(spec.pip)}", [*pip, "--", *spec.pip]))
    if spec.npm:
        npm = ["npm", "install", "-g", "--no-audit", "--no-fund", "--no-update-notifier"]
        if spec.npm_registry:
            npm += ["--registry", spec.npm_registry]
        steps.append((f"npm install {' '.join(spec.npm)}", [*npm, "--", *spec.npm]))
    for i, f in enumerate(spec.files):
        steps.append((f"file {f.dest}", i))
    for cmd in spec.run:
        steps.append((f"run {cmd}", ["/bin/sh", "-c", cmd]))
    return steps


def _step_count(spec: TemplateSpec, steps: list[tuple[str, list[str] | int]]) -> int:
    """Steps as the progress bar counts them: debootstrap, the spec's, saving /workspace."""
    return (spec.base == "debian") + len(steps) + 1


class _Log:
    def __init__(self, path: Path, progress: Progress) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "wb")
        self._progress = progress
        self._tail = bytearray()

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._f.flush()
        self._tail = (self._tail + data)[-4000:]
        self._progress({"type": "log", "text": data.decode(errors="replace")})

    def tail(self) -> str:
        return self._tail.decode(errors="replace").strip()

    def close(self) -> None:
        self._f.close()


async def _run_step(guest: GuestClient, argv: list[str], cwd: str, log: _Log) -> int:
    handle = await guest.exec(argv, cwd=cwd, timeout=STEP_TIMEOUT)
    async for item in handle:
        if isinstance(item, Output):
            log.write(item.data)
        else:
            return item.exit_code
    return -1


def check(engine: Engine, spec: TemplateSpec) -> None:
    """What can be refused before a build starts (ConfigError)."""
    if spec.base == "debian" and shutil.which("debootstrap") is None:
        raise ConfigError("base 'debian' needs debootstrap on the server's host: "
                          "apt-get install debootstrap")
    if not engine.config.allow_host_workspace and any(f.src for f in spec.files):
        raise ConfigError("this server does not read its own files: send file contents inline "
                          "(content_b64), as the SDK and CLI do")
    for f in spec.files:
        if f.content_b64 is not None:
            f.content()  # valid base64


async def build(engine: Engine, spec: TemplateSpec, owner: str | None,
                progress: Progress | None = None) -> TemplateInfo:
    """Build SPEC (or find it in the cache) and register it under its name for OWNER."""
    report: Progress = progress or (lambda _event: None)
    check(engine, spec)
    await engine.start()
    contents = await asyncio.to_thread(lambda: [f.content() for f in spec.files])
    digest = content_hash(spec, contents)
    store = engine.templates
    cached = store.cached(digest)
    if cached is not None:
        info = cached.model_copy(update={"name": spec.name, "owner": owner,
                                         "created_at": now(), "spec": _public(spec)})
        store.put(info)
        report({"type": "cached", "hash": digest})
        return info
    steps = _steps(spec)
    report({"type": "start", "hash": digest,
            "total": _step_count(spec, steps)})
    from sealbox.engine.engine import new_id

    sandbox_id = new_id()
    # Named after the build's sandbox: reconcile removes it if this process dies mid-build.
    build_dir = store.root / f".build-{sandbox_id}"
    log = _Log(store.log_path(spec.name, owner), report)
    try:
        tar = build_dir / "workspace.tar"
        await _sandboxed(engine, sandbox_id, spec, owner, steps, contents, build_dir, tar, log,
                         report)
        out = build_dir / "out"
        out.mkdir()
        scratch = build_dir / "scratch"
        if spec.base == "debian":
            await asyncio.to_thread(_merge_rootfs, scratch, build_dir / "merged", out / "layer")
            has_layer = True
        else:
            await asyncio.to_thread(finalize, scratch / "upper")
            has_layer = await asyncio.to_thread(_changed, scratch / "upper")
            if has_layer:
                await asyncio.to_thread(_copy_tree, scratch / "upper", out / "layer")
        await asyncio.to_thread(volumes_sys.umount, scratch)
        if tar.is_file():
            tar.rename(out / "workspace.tar")
        log.close()
        shutil.copyfile(store.log_path(spec.name, owner), out / "build.log")
        info = new_info(name=spec.name, hash=digest, layer=digest if has_layer else None,
                        env=dict(spec.env),
                        workdir=spec.workdir, start=spec.start, owner=owner,
                        size=await asyncio.to_thread(dir_size, out), spec=_public(spec))
        (out / "template.json").write_text(info.model_dump_json(indent=2))
        target = store.dir(digest)
        try:
            out.rename(target)
        except OSError:
            if store.cached(digest) is None:  # not a concurrent identical build: a real error
                raise
        store.put(info)
        report({"type": "built", "hash": digest})
        return info
    finally:
        log.close()
        await asyncio.to_thread(_remove_build_dir, build_dir)


def _merge_rootfs(scratch: Path, merged: Path, layer: Path) -> None:
    """The Debian base with the build's finalized upper dir on it, as one marked tree."""
    rootfs = scratch / ROOTFS
    finalize(scratch / "upper", rootfs)
    overlay.mount(merged, [scratch / "upper", rootfs])
    try:
        _copy_tree(merged, layer)
    finally:
        overlay.unmount_all(merged)
    # The tree was written by maintainer scripts: whatever it holds at the mark's name (a
    # symlink to a host file, say) is removed, never written through.
    mark = layer / ROOTFS_MARK
    if mark.is_dir() and not mark.is_symlink():
        shutil.rmtree(mark)
    elif os.path.lexists(mark):
        mark.unlink()
    fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("a whole system: its dirs replace the host's\n")


def _changed(upper: Path) -> bool:
    """Whether a finalized upper dir holds anything but the empty var/tmp every layer gets."""
    empty = {upper / "var", upper / "var" / "tmp"}
    return any(p not in empty for p in upper.rglob("*"))


def _copy_tree(src: Path, dest: Path) -> None:
    """SRC to DEST with ownership, modes, xattrs (overlay's opaque marks) and whiteouts."""
    r = subprocess.run(["cp", "-a", "--", str(src), str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SandboxError(f"copying the built layer failed: {r.stderr.strip()[-500:]}")


def _remove_build_dir(build_dir: Path) -> None:
    scratch = build_dir / "scratch"
    if volumes_sys.is_mounted(scratch):
        volumes_sys.umount(scratch)  # a plain unmount first: the loop device goes with it
    overlay.unmount_all(build_dir)
    shutil.rmtree(build_dir, ignore_errors=True)


def _public(spec: TemplateSpec) -> TemplateSpec:
    """The spec as stored and shown: file contents replaced by nothing (they are hashed)."""
    files = [f.model_copy(update={"content_b64": None, "src": f.src or "(inline)"})
             for f in spec.files]
    return spec.model_copy(update={"files": files})


async def _sandboxed(engine: Engine, sandbox_id: str, spec: TemplateSpec, owner: str | None,
                     steps: list[tuple[str, list[str] | int]], contents: list[bytes],
                     build_dir: Path, tar: Path, log: _Log, report: Progress) -> None:
    from sealbox.engine.engine import netns_name

    run_dir = engine.config.run_root / sandbox_id
    # Recorded like any sandbox, so a crashed owner's build is cleaned up by reconcile.
    info = SandboxInfo(id=sandbox_id, state=SandboxState.creating, runtime="namespace",
                       created_at=now(), allow_net=spec.build_hosts(), owner=owner,
                       metadata={"sealbox.template_build": spec.name})
    engine.store.put(info)
    ns = netns_name(sandbox_id)
    sandbox = None
    guest = None
    failed: str | None = "build did not finish"
    try:
        build_dir.mkdir(mode=0o700)  # after the record: reconcile never sweeps a live build's
        run_dir.mkdir(parents=True, mode=0o711)
        # The layer, /tmp and /workspace of a build are capped: a build that fills its disk
        # fails with ENOSPC instead of filling the host's.
        scratch = build_dir / "scratch"
        image = build_dir / volumes_sys.IMAGE_NAME
        await asyncio.to_thread(volumes_sys.make_image, image, spec.disk)
        await asyncio.to_thread(volumes_sys.mount, image, scratch)
        await asyncio.to_thread(netns.create, ns)
        attachment = await engine.gateway.attach(sandbox_id, ns, spec.build_hosts(), {},
                                                 run_dir)
        ro_files = dict(attachment.ro_files)
        if spec.apt_sources:
            apt = run_dir / "apt"
            (apt / "sources.list.d").mkdir(parents=True)
            (apt / "sources.list").write_text("\n".join(spec.apt_sources) + "\n")
            for p in (apt, apt / "sources.list.d", apt / "sources.list"):
                p.chmod(0o755 if p.is_dir() else 0o644)
            ro_files["/etc/apt/sources.list"] = apt / "sources.list"
            ro_files["/etc/apt/sources.list.d"] = apt / "sources.list.d"
        launch = LaunchSpec(
            sandbox_id=sandbox_id, netns=ns, run_dir=run_dir,
            limits=Limits(pids=4096, disk_bytes=spec.disk, memory_bytes=spec.memory),
            env={**attachment.env, **spec.env, "PIP_NO_INPUT": "1"},
            hostname="sealbox-build", ro_files=ro_files,
        )
        root = Path("/")
        total = _step_count(spec, steps)
        first = 2 if spec.base == "debian" else 1  # debootstrap is step 1
        if spec.base == "debian":
            root = await _bootstrap(spec, sandbox_id, ns, scratch, run_dir,
                                    attachment.ro_files, log, report, total)
        sandbox = await start_build(launch, scratch, root)
        guest = await sandbox.connect()
        info.state = SandboxState.running
        engine.store.put(info)
        for index, (title, action) in enumerate(steps, first):
            report({"type": "step", "index": index, "total": total, "title": title})
            log.write(f"==> {title}\n".encode())
            if isinstance(action, int):
                f = spec.files[action]
                await guest.write_file(f.dest, contents[action], mode=f.mode)
                continue
            code = await _run_step(guest, action, "/workspace", log)
            if code != 0:
                raise CommandError(
                    f"template build failed at step {title!r} (exit code {code}); "
                    f"log tail:\n{log.tail()}", step=title, exit_code=code)
        if spec.workdir and await _run_step(guest, ["test", "-d", spec.workdir], "/", log):
            # Every command of every sandbox from it would fail to start otherwise.
            raise ConfigError(f"workdir {spec.workdir} does not exist after the build: create "
                              "it in a run step or put a file under it")
        report({"type": "step", "index": total, "total": total, "title": "save workspace"})
        log.write(b"==> save workspace\n")
        if (await guest.list_dir("/workspace")):
            await workspace_tar.save(guest, tar, MAX_WORKSPACE)
        failed = None
    except BaseException as exc:
        failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise
    finally:
        if guest is not None:
            await guest.close()
        if sandbox is not None:
            await sandbox.kill()
        await engine.gateway.detach(sandbox_id)
        await asyncio.to_thread(engine._remove_leftovers, sandbox_id)
        info.state = SandboxState.failed if failed else SandboxState.stopped
        info.ended_at = now()
        info.end_reason = failed or "template build finished"
        engine.store.put(info)


async def _bootstrap(spec: TemplateSpec, sandbox_id: str, ns: str, scratch: Path,
                     run_dir: Path, ro_files: dict[str, Path], log: _Log, report: Progress,
                     total: int) -> Path:
    """Step 1 of a build on a Debian base: the root filesystem the other steps run over."""
    title = f"debootstrap {spec.debian_suite()} from {spec.debian_mirror()}"
    report({"type": "step", "index": 1, "total": total, "title": title})
    log.write(f"==> {title}\n".encode())
    target = scratch / ROOTFS
    run = bootstrap.Bootstrap(
        sandbox_id=sandbox_id, netns=ns, target=target, run_dir=run_dir,
        suite=spec.debian_suite(),
        mirror=spec.debian_mirror(), check_signature=not spec.mirror_trusted,
        ro_files=dict(ro_files),
        memory_bytes=spec.memory)
    code = await bootstrap.run(run, log.write)
    if code != 0:
        raise CommandError(f"template build failed at step {title!r} (exit code {code}); "
                           f"log tail:\n{log.tail()}", step=title, exit_code=code)
    await asyncio.to_thread(bootstrap.seal_rootfs, target, bootstrap.id_base_for(sandbox_id))
    return target


def describe(spec: TemplateSpec) -> str:
    """One line saying what a spec installs (for the CLI)."""
    parts = [f"{k} {' '.join(shlex.quote(p) for p in v)}"
             for k, v in (("apt", spec.apt), ("pip", spec.pip), ("npm", spec.npm)) if v]
    return "; ".join(parts) or "files and commands only"
