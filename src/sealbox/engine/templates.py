"""Templates: a declarative spec, the content-addressed store of built images, and resolution.

A built template lives in ``DATA/templates/<hash>/``:

    layer/           read-only tree overlaid on the sandbox's system dirs (usr, etc, opt, var)
    workspace.tar    what /workspace starts with (extracted inside the sandbox, by the sandbox)
    build.log        the build's output
    template.json    the `TemplateInfo`

Names map to hashes in the ``templates`` table of the state database, per owner. A snapshot is
a template whose layer is its parent's (by hash) and whose workspace.tar is the sandbox's.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sealbox._sys import overlay
from sealbox.engine.store import now
from sealbox.engine.units import checked, parse_size
from sealbox.errors import ConfigError, NotFoundError

BUILDER_VERSION = "1"
"""Part of every hash: a change to how layers are made invalidates the cache."""
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_NAME = re.compile(NAME_PATTERN)
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
_SUITE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
_APT_PKG = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?(=[A-Za-z0-9.+~:-]+)?$")
_PIP_REQ = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-\[\],<>=!~ ]*$")
_NPM_PKG = re.compile(r"^(@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*(@[A-Za-z0-9.^~<>=*|+ -]+)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PYPI_HOSTS = ["pypi.org", "files.pythonhosted.org"]
NPM_HOSTS = ["registry.npmjs.org"]
# Where a file may be put: the captured system dirs, or the workspace.
FILE_ROOTS = ("/usr/", "/etc/", "/opt/", "/workspace/")
MAX_FILE = 64 * 1024**2
GC_AGE = 600.0


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"template name {name!r} is invalid: use lowercase letters, digits, "
                          "'.', '_' and '-' (at most 63, starting with a letter or digit)")
    return name


class TemplateFile(BaseModel):
    """A file put into the template: from a local path (``src``, read by whoever builds) or
    inline (``content_b64``, what the SDK sends to a server)."""

    model_config = ConfigDict(extra="forbid")

    dest: str = Field(description="absolute path under /usr, /etc, /opt or /workspace")
    src: str | None = Field(default=None, description="local file (embedded builds only)")
    content_b64: str | None = None
    mode: int = Field(default=0o644, ge=0, le=0o777)

    @field_validator("dest")
    @classmethod
    def _dest(cls, v: str) -> str:
        parts = v.split("/")
        if not v.startswith(FILE_ROOTS) or ".." in parts or "" in parts[1:] or "\0" in v:
            raise ValueError(f"{v!r}: dest must be a normalised absolute path under "
                             + ", ".join(r.rstrip("/") for r in FILE_ROOTS))
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TemplateFile:
        if (self.src is None) == (self.content_b64 is None):
            raise ValueError(f"{self.dest}: give exactly one of src or content_b64")
        return self

    def content(self) -> bytes:
        """The bytes; ConfigError for a missing or unreadable source."""
        if self.content_b64 is not None:
            try:
                return base64.b64decode(self.content_b64, validate=True)
            except ValueError:
                raise ConfigError(f"file {self.dest}: content_b64 is not base64") from None
        path = Path(self.src or "")
        if not path.is_file():
            raise ConfigError(f"file {self.src!r} (for {self.dest}) does not exist or is not "
                              "a regular file")
        if path.stat().st_size > MAX_FILE:
            raise ConfigError(f"file {self.src!r} is larger than {MAX_FILE >> 20} MiB")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"file {self.src!r} cannot be read: {exc.strerror}") from None

    def inline(self) -> TemplateFile:
        return TemplateFile(dest=self.dest, mode=self.mode,
                            content_b64=base64.b64encode(self.content()).decode())


class TemplateSpec(BaseModel):
    """What a template contains. Everything but ``name`` goes into its content hash."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"template name ({NAME_PATTERN})")
    base: Literal["host", "debian"] = Field(
        default="host", description="host = the host's system dirs; debian = a root "
        "filesystem made by debootstrap (minbase, plus python3 and ca-certificates)")
    suite: str | None = Field(default=None, description=f"base debian: the suite (default "
                              f"{DEFAULT_SUITE})")
    mirror: str | None = Field(default=None, description=f"base debian: the archive (default "
                               f"{DEFAULT_MIRROR})")
    mirror_trusted: bool = Field(
        default=False, description="base debian: do not check the archive's signature (a "
        "local mirror you run); checked against Debian's archive keyring otherwise")
    apt: list[str] = Field(default_factory=list)
    pip: list[str] = Field(default_factory=list)
    npm: list[str] = Field(default_factory=list)
    files: list[TemplateFile] = Field(default_factory=list)
    run: list[str] = Field(default_factory=list, description="shell commands, run as root")
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = Field(default=None, description="default cwd of commands")
    start: str | None = Field(default=None, description="started in the background at create")
    allow_net: list[str] = Field(
        default_factory=list,
        description="hosts the build may reach beyond those derived from apt/pip/npm")
    apt_sources: list[str] = Field(default_factory=list,
                                   description="sources.list lines replacing the host's")
    pip_index_url: str | None = None
    npm_registry: str | None = None
    disk: int = Field(default=8 * 1024**3, description="bytes the build may write (its layer, "
                      "/tmp, /workspace each); not part of the content hash")
    memory: int = Field(default=4 * 1024**3, description="the build's memory limit; not hashed")

    @field_validator("disk", "memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        size = checked(parse_size, v)
        if size < 64 * 1024**2:
            raise ValueError("must be at least 64MiB")
        return size

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return checked(check_name, v)

    @field_validator("apt")
    @classmethod
    def _apt(cls, v: list[str]) -> list[str]:
        return _each(v, _APT_PKG, "apt package")

    @field_validator("pip")
    @classmethod
    def _pip(cls, v: list[str]) -> list[str]:
        return _each(v, _PIP_REQ, "pip requirement")

    @field_validator("npm")
    @classmethod
    def _npm(cls, v: list[str]) -> list[str]:
        return _each(v, _NPM_PKG, "npm package")

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or "\0" in v):
            raise ValueError("workdir must be an absolute path")
        return v

    @field_validator("apt_sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        for line in v:
            if "\n" in line or not re.match(r"^deb(-src)?\s", line):
                raise ValueError(f"{line!r} is not a one-line 'deb URI SUITE [COMPONENT...]'")
            _source_host(line)
        return v

    @field_validator("suite")
    @classmethod
    def _suite(cls, v: str | None) -> str | None:
        if v is not None and not _SUITE.match(v):
            raise ValueError(f"{v!r} is not a Debian suite name (bookworm, trixie, stable, …)")
        return v

    @model_validator(mode="after")
    def _debian_only(self) -> TemplateSpec:
        if self.base != "debian" and (self.suite or self.mirror or self.mirror_trusted):
            raise ValueError("suite, mirror and mirror_trusted are for base 'debian'")
        return self

    @field_validator("pip_index_url", "npm_registry", "mirror")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{v!r} is not an http(s) URL")
        return v

    def build_hosts(self) -> builtins.list[str]:
        """The build's allowlist: what the packages it asks for need, plus ``allow_net``."""
        hosts: builtins.list[str] = []
        if self.base == "debian":
            hosts.append(_url_host(self.debian_mirror()))
        if self.apt:
            if self.apt_sources:
                hosts += [_source_host(s) for s in self.apt_sources]
            elif self.base == "host":
                hosts += host_apt_hosts()
        if self.pip:
            hosts += [_url_host(self.pip_index_url)] if self.pip_index_url else PYPI_HOSTS
        if self.npm:
            hosts += [_url_host(self.npm_registry)] if self.npm_registry else NPM_HOSTS
        hosts += self.allow_net
        return list(dict.fromkeys(hosts))

    def debian_suite(self) -> str:
        return self.suite or DEFAULT_SUITE

    def debian_mirror(self) -> str:
        return self.mirror or DEFAULT_MIRROR


def _each(values: list[str], pattern: re.Pattern[str], what: str) -> list[str]:
    for value in values:
        # A leading '-' would be an option to apt/pip/npm, not a package.
        if not pattern.match(value):
            raise ValueError(f"{value!r} is not a valid {what}")
    return values


def _url_host(url: str | None) -> str:
    parts = urlsplit(url or "")
    host = parts.hostname or ""
    default = 443 if parts.scheme == "https" else 80
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


def _source_host(line: str) -> str:
    for word in line.split()[1:]:
        if word.startswith("["):
            continue
        if word.startswith(("http://", "https://")):
            return _url_host(word)
        break
    raise ValueError(f"{line!r}: the URI must be http:// or https://")


def host_apt_hosts() -> list[str]:
    """Hosts of the host's own apt sources (what `apt-get install` would reach)."""
    hosts = []
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if path.suffix not in ("", ".list", ".sources") or not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            for word in words:
                if word.startswith(("http://", "https://")):
                    hosts.append(_url_host(word))
    return list(dict.fromkeys(hosts))


def host_base_identity() -> str:
    """Changes whenever the host's installed packages do (the base every layer sits on)."""
    h = hashlib.sha256()
    for path in (Path("/etc/os-release"), Path("/var/lib/dpkg/status")):
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"-")
    return h.hexdigest()


def content_hash(spec: TemplateSpec, files: list[bytes]) -> str:
    body = spec.model_dump(mode="json", exclude={"name", "disk", "memory"})
    body["files"] = [{"dest": f.dest, "mode": f.mode,
                      "sha256": hashlib.sha256(data).hexdigest()}
                     for f, data in zip(spec.files, files, strict=True)]
    # A Debian base is named by the spec's suite and mirror; a host base by what is installed.
    base = host_base_identity() if spec.base == "host" else "debian"
    doc = json.dumps({"v": BUILDER_VERSION, "base": base, "spec": body},
                     sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


class TemplateInfo(BaseModel):
    """A template as listed and returned by the API."""

    name: str
    hash: str
    kind: Literal["build", "snapshot"] = "build"
    parent: str | None = Field(default=None, description="the template a snapshot came from")
    layer: str | None = Field(default=None, description="hash of the directory with the layer")
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    start: str | None = None
    size: int = Field(default=0, description="bytes on disk (layer + workspace)")
    memory: str | None = Field(
        default=None, description="the tier whose running sandbox a snapshot also saved "
        "(microvm): sandboxes of that tier and size start as copies of it, processes and all")
    created_at: datetime
    owner: str | None = None
    spec: TemplateSpec | None = None


@dataclass(frozen=True)
class Resolved:
    """What creating a sandbox from a template needs (also the warm pools' key)."""

    name: str
    hash: str
    layer: Path | None
    workspace_tar: Path | None
    env: dict[str, str]
    workdir: str | None
    start: str | None
    memory: tuple[str, Path] | None = None
    """(tier, checkpoint): a running sandbox saved by a snapshot, to restore copies of."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS templates (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    info TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (owner, name)
);
"""


class TemplateStore:
    """Names → built template directories. Owner None (embedded use) is stored as ''."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "templates"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "logs").mkdir(exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(data_dir / "state.db", check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def sweep(self, live_ids: set[str]) -> None:
        """Remove what builds, snapshots and forks of sandboxes no longer alive left behind
        (their owner died midway): ``.build-ID``, ``.snap-ID-*``, ``.fork-ID-*``."""
        for path in self.root.glob(".*-*"):
            kind, _, rest = path.name[1:].partition("-")
            sandbox_id = rest.split("-")[0].removesuffix(".tar")
            if kind in ("build", "snap", "fork") and sandbox_id not in live_ids:
                if path.is_dir():
                    overlay.unmount_all(path)  # a dead build's scratch filesystem
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        self.collect()

    def dir(self, digest: str) -> Path:
        return self.root / digest

    def log_path(self, name: str, owner: str | None) -> Path:
        key = hashlib.sha256(f"{owner or ''}/{name}".encode()).hexdigest()[:24]
        return self.root / "logs" / f"{key}.log"

    def cached(self, digest: str) -> TemplateInfo | None:
        path = self.dir(digest) / "template.json"
        if not path.is_file():
            return None
        return TemplateInfo.model_validate_json(path.read_text())

    def put(self, info: TemplateInfo) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO templates(owner, name, hash, info, created_at) VALUES (?,?,?,?,?)"
                " ON CONFLICT(owner, name) DO UPDATE SET hash=excluded.hash, info=excluded.info,"
                " created_at=excluded.created_at",
                (info.owner or "", info.name, info.hash, info.model_dump_json(),
                 info.created_at.isoformat()))

    def get(self, name: str, owner: str | None = None, shared: bool = False) -> TemplateInfo:
        """NAME of OWNER; with SHARED, else the operator's (built without an owner)."""
        with self._lock:
            row = self._db.execute("SELECT info FROM templates WHERE owner=? AND name=?",
                                   (owner or "", name)).fetchone()
            if row is None and shared and owner:
                row = self._db.execute("SELECT info FROM templates WHERE owner='' AND name=?",
                                       (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no template {name!r}: see `sealbox template ls`")
        return TemplateInfo.model_validate_json(row[0])

    def exists(self, name: str, owner: str | None = None) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM templates WHERE owner=? AND name=?",
                                   (owner or "", name)).fetchone()
        return row is not None

    def list(self, owner: str | None = None) -> builtins.list[TemplateInfo]:
        """OWNER's templates and the shared ones it may use (its own win on a name clash)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT info FROM templates WHERE owner=? OR owner='' ORDER BY name, owner=''",
                (owner or "",)).fetchall()
        found: dict[str, TemplateInfo] = {}
        for (text,) in rows:
            info = TemplateInfo.model_validate_json(text)
            found.setdefault(info.name, info)
        return builtins.list(found.values())

    def remove(self, name: str, owner: str | None = None) -> TemplateInfo:
        """Forget NAME; delete its directory once no name (of any owner) and no running
        sandbox uses it (a layer in use is collected by a later `collect`)."""
        info = self.get(name, owner)
        with self._lock:
            self._db.execute("DELETE FROM templates WHERE owner=? AND name=?",
                             (owner or "", name))
        self.collect({d for d in (info.hash, info.layer) if d})
        return info

    def _referenced(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT info FROM templates").fetchall()
        used: set[str] = set()
        for (text,) in rows:
            other = TemplateInfo.model_validate_json(text)
            used.update(h for h in (other.hash, other.layer) if h)
        return used

    def collect(self, candidates: set[str] | None = None) -> None:
        """Delete template dirs no name refers to and no mounted overlay reads from. Without
        CANDIDATES, every such dir older than GC_AGE (a build renames its dir into place just
        before it registers the name)."""
        # A sandbox's lower dirs are <root>/<hash>/layer/<usr|etc|opt|var>.
        in_use = {Path(d).parents[1].name for d in overlay.lower_dirs_in_use()
                  if len(Path(d).parents) > 2 and Path(d).parents[2] == self.root}
        keep = self._referenced() | in_use
        if candidates is None:
            candidates = set()
            for path in self.root.iterdir():
                if path.name.startswith(".") or path.name == "logs" or not path.is_dir():
                    continue
                try:
                    if time.time() - path.stat().st_mtime > GC_AGE:
                        candidates.add(path.name)
                except OSError:
                    continue
        for digest in candidates - keep:
            shutil.rmtree(self.dir(digest), ignore_errors=True)

    def resolve(self, name: str, owner: str | None = None) -> Resolved:
        info = self.get(check_name(name), owner, shared=True)
        tar = self.dir(info.hash) / "workspace.tar"
        layer = self.dir(info.layer) / "layer" if info.layer else None
        if layer is not None and not layer.is_dir():
            raise NotFoundError(f"template {name!r} is damaged: its layer is missing; rebuild it")
        checkpoint = self.dir(info.hash) / CHECKPOINT
        return Resolved(name=info.name, hash=info.hash, layer=layer,
                        workspace_tar=tar if tar.is_file() else None, env=dict(info.env),
                        workdir=info.workdir, start=info.start,
                        memory=(info.memory, checkpoint) if info.memory and checkpoint.is_dir()
                        else None)


CHECKPOINT = "checkpoint"
"""In a memory snapshot's directory: the tier's saved sandbox (`RunningSandbox.checkpoint`)."""


def dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        total += st.st_size if not p.is_dir() else 0
    return total


def new_info(**fields: Any) -> TemplateInfo:
    return TemplateInfo(created_at=now(), **fields)
