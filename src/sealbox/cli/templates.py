"""`sealbox template build|ls|rm|logs`, `sealbox snapshot ID NAME`, `sealbox fork ID`.

Template commands use the server when SEALBOX_URL is set, else the embedded engine (the
operator's templates, shared with every tenant of a server on the same data dir).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from sealbox.cli.common import (
    ResolveOpt,
    UpstreamCaOpt,
    parse_cas,
    parse_env,
    parse_pins,
    run_async,
    server_url,
)
from sealbox.engine.config import EngineConfig
from sealbox.engine.snapshots import FORK_KIND
from sealbox.engine.templates import TemplateFile, TemplateSpec
from sealbox.errors import ConfigError
from sealbox.sdk.async_sandbox import AsyncSandbox, AsyncTemplate, validation_message
from sealbox.sdk.embedded import close_shared_engine, shared_engine

console = Console(highlight=False)
template_app = typer.Typer(no_args_is_help=True, help="Build and manage templates.")


def _where() -> dict[str, str | None]:
    import os

    url = os.environ.get("SEALBOX_URL")
    return {"url": url, "api_key": os.environ.get("SEALBOX_API_KEY")} if url else {}


def load_spec(path: Path, overrides: dict[str, Any]) -> TemplateSpec:
    """A spec file (YAML or JSON) with command-line fields on top."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"-f {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"-f {path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"-f {path}: the spec must be a mapping")
    # Relative file sources are relative to the spec file.
    for f in data.get("files") or []:
        if isinstance(f, dict) and isinstance(f.get("src"), str):
            f["src"] = str((path.parent / f["src"]).resolve())
    data.update({k: v for k, v in overrides.items() if v})
    return make_template_spec(data)


def make_template_spec(data: dict[str, Any]) -> TemplateSpec:
    try:
        return TemplateSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid template spec: {validation_message(exc)}") from None


def parse_file(text: str) -> TemplateFile:
    src, sep, dest = text.rpartition(":")
    if not sep or not src or not dest:
        raise ConfigError(f"--file {text!r}: use SRC:DEST (DEST absolute)")
    try:
        return TemplateFile(src=str(Path(src).resolve()), dest=dest)
    except ValidationError as exc:
        raise ConfigError(f"--file {text!r}: {validation_message(exc)}") from None


Multi = Annotated[list[str] | None, typer.Option()]


@template_app.command("build")
def build(
    name: Annotated[str | None, typer.Argument(help="template name (or `name:` in -f)")] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file-spec",
                                              help="spec file (.yaml/.yml/.json)")] = None,
    base: Annotated[str | None, typer.Option(
        help="host (the host's system dirs, default) or debian (made by debootstrap)")] = None,
    suite: Annotated[str | None, typer.Option(help="--base debian: suite (bookworm)")] = None,
    mirror: Annotated[str | None, typer.Option(
        help="--base debian: archive URL (http://deb.debian.org/debian)")] = None,
    mirror_trusted: Annotated[bool, typer.Option(
        "--mirror-trusted", help="--base debian: skip the archive's signature check")] = False,
    apt: Annotated[list[str] | None, typer.Option("--apt", help="apt package")] = None,
    pip: Annotated[list[str] | None, typer.Option("--pip", help="pip requirement")] = None,
    npm: Annotated[list[str] | None, typer.Option("--npm", help="npm package")] = None,
    files: Annotated[list[str] | None, typer.Option("--file", help="SRC:DEST")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="shell command (as root)")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="K=V default env")] = None,
    workdir: Annotated[str | None, typer.Option(help="default working directory")] = None,
    start: Annotated[str | None, typer.Option(help="command started at create")] = None,
    allow_net: Annotated[list[str] | None, typer.Option(
        "--allow-net", help="extra host the build may reach")] = None,
    apt_source: Annotated[list[str] | None, typer.Option(
        "--apt-source", help="sources.list line replacing the host's")] = None,
    pip_index_url: Annotated[str | None, typer.Option(help="pip index URL")] = None,
    npm_registry: Annotated[str | None, typer.Option(help="npm registry URL")] = None,
    disk: Annotated[str | None, typer.Option(help="the build's disk limit (default 8GiB)")] = None,
    memory: Annotated[str | None, typer.Option(help="the build's memory (default 4GiB)")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="print build output")] = False,
    resolve: ResolveOpt = None, upstream_ca: UpstreamCaOpt = None,
) -> None:
    """Build a template (a cache hit when the same inputs were built before)."""

    async def main() -> None:
        fields: dict[str, Any] = {
            "name": name, "base": base, "suite": suite, "mirror": mirror,
            "mirror_trusted": mirror_trusted, "apt": apt, "pip": pip, "npm": npm, "run": run,
            "env": parse_env(env or []) if env else None, "workdir": workdir, "start": start,
            "allow_net": allow_net, "apt_sources": apt_source, "pip_index_url": pip_index_url,
            "npm_registry": npm_registry, "disk": disk, "memory": memory,
            "files": [parse_file(f).model_dump(exclude_none=True) for f in files or []] or None,
        }
        if not _where():
            # Embedded: the build's engine gets the operator's pins and CAs.
            await shared_engine(EngineConfig(resolve=parse_pins(resolve or []),
                                             upstream_ca=parse_cas(upstream_ca or [])))
        if file is not None:
            spec = load_spec(file, fields)
        else:
            if not name:
                raise ConfigError("give a template NAME (or -f SPEC)")
            spec = make_template_spec({k: v for k, v in fields.items() if v})
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), console=console, transient=not verbose) as bar:
            task = bar.add_task(f"building {spec.name}", total=None)

            def on_event(event: dict[str, Any]) -> None:
                kind = event.get("type")
                if kind == "start":
                    bar.update(task, total=event["total"], completed=0)
                elif kind == "step":
                    bar.update(task, completed=event["index"] - 1,
                               description=str(event["title"])[:60])
                elif kind == "log" and verbose:
                    bar.console.print(event["text"], end="", markup=False)

            try:
                info = await AsyncTemplate.build(spec, progress=on_event, **_where())
            finally:
                await close_shared_engine()
            bar.update(task, completed=bar.tasks[0].total or 1)
        console.print(f"template {info.name} {info.hash[:12]} ({info.size / 1e6:.1f} MB)")

    run_async(main)


@template_app.command("ls")
def ls() -> None:
    """List templates."""

    async def main() -> None:
        try:
            infos = await AsyncTemplate.list(**_where())
        finally:
            await close_shared_engine()
        table = Table("NAME", "HASH", "KIND", "PARENT", "SIZE", "CREATED", box=None)
        for i in infos:
            # A microvm snapshot that also keeps the running VM says so.
            kind = f"{i.kind}+memory" if i.memory else i.kind
            table.add_row(i.name, i.hash[:12], kind, i.parent or "-", f"{i.size / 1e6:.1f}MB",
                          i.created_at.strftime("%Y-%m-%d %H:%M"))
        console.print(table)

    run_async(main)


@template_app.command("rm")
def rm(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Remove a template (its files go once no other name uses them)."""

    async def main() -> None:
        try:
            await AsyncTemplate.delete(name, **_where())
        finally:
            await close_shared_engine()
        console.print(f"removed template {name}")

    run_async(main)


@template_app.command("logs")
def logs(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Print the last build's log (failed builds too)."""

    async def main() -> None:
        try:
            text = await AsyncTemplate.logs(name, **_where())
        finally:
            await close_shared_engine()
        print(text, end="")

    run_async(main)


def snapshot(sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
             name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Save a sandbox's /workspace as template NAME (filesystem only)."""

    async def main() -> None:
        url, key = server_url()
        sb = await AsyncSandbox.connect(sandbox_id, url=url, api_key=key)
        try:
            info = await sb.snapshot(name)
        finally:
            await sb.disconnect()
        console.print(f"template {info.name} {info.hash[:12]} from {sandbox_id}")

    run_async(main)


def fork(sandbox_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """A new sandbox cloned from ID: on microvm the running VM (processes and memory,
    copy-on-write), elsewhere a copy of its /workspace. Prints the child's id on its own line."""

    async def main() -> None:
        url, key = server_url()
        sb = await AsyncSandbox.connect(sandbox_id, url=url, api_key=key)
        try:
            child = await sb.fork()
        finally:
            await sb.disconnect()
        carried = ("the running VM: processes, memory (copy-on-write) and files"
                   if child.info.metadata.get(FORK_KIND) == "vm" else
                   "a copy of /workspace; this tier cannot carry processes")
        console.print(f"forked {sandbox_id} ({carried})")
        console.print(child.id)

    run_async(main)
