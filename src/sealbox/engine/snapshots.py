"""Snapshots (a running sandbox's /workspace saved as a new template) and fork (a new sandbox
with a copy of it).

Snapshots keep the filesystem: /workspace is what a sandbox can write besides /tmp (which is
not kept). The snapshot's layer is its parent template's (shared by hash, never copied); its
workspace.tar is made by the sandbox's own tar, so hostile content never touches the host's
filesystem. On a tier that can checkpoint (microvm) a snapshot also saves the running sandbox:
sandboxes of that tier and VM size made from it start as copies of it (the engine's
`_start`, warm pools too), each a clone like a fork's child; others start from its files.

A fork on a tier that can checkpoint (microvm) is the whole running sandbox: the parent is
stopped for as long as saving its VM takes, then runs on, and the child is restored from that
copy (processes, memory, /workspace and /tmp) with its own id, name, network, secrets'
placeholders and fresh kernel randomness. The child maps the saved memory copy-on-write
(`runtimes/microvm_snapshot.py`): it starts without loading it and copies only the pages it
writes. Elsewhere a fork is a copy of /workspace streamed into a new sandbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets as pysecrets
from pathlib import Path
from typing import TYPE_CHECKING

from sealbox.engine import workspace_tar
from sealbox.engine.spec import SandboxInfo, SandboxState
from sealbox.engine.templates import (
    CHECKPOINT,
    TemplateInfo,
    check_name,
    dir_size,
    new_info,
)
from sealbox.errors import ConfigError, SandboxError
from sealbox.runtimes import registry

if TYPE_CHECKING:
    from sealbox.engine.engine import Engine

MAX_SNAPSHOT = 8 * 1024**3
FORK_KIND = "sealbox.fork"
"""Child metadata: ``vm`` (the running VM: processes, memory and files, memory mapped
copy-on-write) or ``workspace`` (a copy of /workspace; the tier cannot save processes)."""


def _cap(engine: Engine, disk: int | None) -> int:
    # A /workspace cannot hold more than its disk limit; a little slack for tar's headers.
    return int(disk * 1.1) + (1 << 20) if disk else MAX_SNAPSHOT


def _sha256(path: object) -> str:
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def snapshot(engine: Engine, sandbox_id: str, name: str, owner: str | None
                   ) -> TemplateInfo:
    check_name(name)
    live = engine._running(sandbox_id, owner)
    if live.spec is not None and live.spec.workspace is not None:
        raise ConfigError("this sandbox's /workspace is a host directory: copy that instead")
    store = engine.templates
    parent = (store.get(live.info.template, owner, shared=True) if live.info.template else None)
    tmp = store.root / f".snap-{sandbox_id}-{pysecrets.token_hex(6)}"
    tmp.mkdir(mode=0o700)
    try:
        tar = tmp / "workspace.tar"
        await workspace_tar.save(live.guest, tar, _cap(engine, live.info.disk))
        digest_src = await asyncio.to_thread(_sha256, tar)
        memory = None
        if live.runtime.can_checkpoint:
            # The running sandbox too: it pauses for the save, then runs on.
            async with live.lock:
                _check_running(live.info, live.ended.is_set())
                await live.runtime.checkpoint(tmp / CHECKPOINT, keep_running=True)
            memory = live.info.runtime
            digest_src += ":" + await asyncio.to_thread(_tree_sha256, tmp / CHECKPOINT)
        digest = hashlib.sha256(
            f"snapshot:{parent.layer if parent else ''}:{digest_src}".encode()).hexdigest()
        info = new_info(
            name=name, hash=digest, kind="snapshot", parent=parent.name if parent else None,
            layer=parent.layer if parent else None,
            env=dict(parent.env) if parent else {}, workdir=parent.workdir if parent else None,
            start=parent.start if parent else None, owner=owner,
            size=await asyncio.to_thread(dir_size, tmp), memory=memory,
        )
        (tmp / "template.json").write_text(info.model_dump_json(indent=2))
        if store.cached(digest) is None:
            try:
                tmp.rename(store.dir(digest))
            except OSError:
                if store.cached(digest) is None:
                    raise
        store.put(info)
        engine.events.write(sandbox_id, "snapshot", template=name)
        return info
    finally:
        if tmp.exists():
            await asyncio.to_thread(_rmtree, tmp)


def _check_running(info: SandboxInfo, ending: bool) -> None:
    if ending or info.state != SandboxState.running:
        raise SandboxError(f"sandbox {info.id} is {info.state.value}, not running")


def _tree_sha256(root: Path) -> str:
    return hashlib.sha256("".join(
        f"{p.relative_to(root)}:{_sha256(p)}\n" for p in sorted(root.rglob("*")) if p.is_file()
    ).encode()).hexdigest()


def _rmtree(path: object) -> None:
    import shutil

    shutil.rmtree(str(path), ignore_errors=True)


async def fork(engine: Engine, sandbox_id: str, owner: str | None) -> SandboxInfo:
    live = engine._running(sandbox_id, owner)
    spec = live.spec
    if spec is None:
        raise SandboxError(f"sandbox {sandbox_id} cannot be forked: its spec is not known")
    if spec.workspace is not None:
        raise ConfigError("this sandbox's /workspace is a host directory: a fork would share it")
    child_spec = spec.model_copy(deep=True)
    # What the child carries, for whoever reads it later (the CLI says it).
    child_spec.metadata = {**spec.metadata, "sealbox.forked_from": sandbox_id,
                           FORK_KIND: "vm" if live.runtime.can_checkpoint else "workspace"}
    if live.runtime.can_checkpoint:
        # Checked first: a fork that cannot take the volumes must not stop the parent.
        await asyncio.to_thread(engine.volumes.check, child_spec.volumes, live.info.owner,
                                disks=registry.get(live.info.runtime).volume_disks)
        saved = engine.templates.root / f".fork-{sandbox_id}-{pysecrets.token_hex(6)}"
        try:
            async with live.lock:  # not while a pause saves or resumes it
                _check_running(live.info, live.ended.is_set())
                await live.runtime.checkpoint(saved, keep_running=True)
            info = await engine._create(child_spec, live.info.owner, restore=saved)
        finally:
            await asyncio.to_thread(_rmtree, saved)
        engine.events.write(sandbox_id, "forked", child=info.id, processes=True)
        return info
    tmp = engine.templates.root / f".fork-{sandbox_id}-{pysecrets.token_hex(6)}.tar"
    try:
        await workspace_tar.save(live.guest, tmp, _cap(engine, live.info.disk))
        info = await engine.create(child_spec, owner=live.info.owner)
        try:
            await workspace_tar.restore(engine.guest(info.id), tmp, clear=True)
        except BaseException:
            await engine.kill(info.id, reason="fork failed")
            raise
        engine.events.write(sandbox_id, "forked", child=info.id)
        return info
    finally:
        tmp.unlink(missing_ok=True)
