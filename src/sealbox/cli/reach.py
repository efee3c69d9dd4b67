"""`sealbox expose|ssh-key|code`: reach into a sandbox on a server (SEALBOX_URL, SEALBOX_API_KEY)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from rich.console import Console
from rich.table import Table

from sealbox.cli.common import fail, run_async, server_url
from sealbox.errors import AuthError, ConfigError, ServerError, from_code

console = Console(highlight=False)
SandboxArg = Annotated[str, typer.Argument(metavar="ID", help="sandbox id")]
_ID = re.compile(r"^[a-z0-9]{1,64}$")


async def _call(method: str, path: str, **kw: Any) -> Any:
    url, key = server_url()
    if not key:
        raise AuthError("no API key: set SEALBOX_API_KEY")
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=60, trust_env=False,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        try:
            resp = await http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ServerError(f"cannot reach sealbox server at {url}: {exc}") from None
    if not resp.is_success:
        try:
            err = resp.json()["error"]
            raise from_code(err["code"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"server answered {resp.status_code}: {resp.text[:200]}") from None
    return resp.json() if resp.content else None


# ----- expose ---------------------------------------------------------------------------------

def expose(
    sandbox_id: SandboxArg,
    port: Annotated[int, typer.Argument(help="TCP port inside the sandbox")],
    public: Annotated[bool, typer.Option(
        "--public", help="anyone with the URL may use it (default: token or API key)")] = False,
) -> None:
    """Give a port inside the sandbox a preview URL; prints the token, then the URL (last line)."""

    async def main() -> None:
        body = await _call("POST", f"/v1/sandboxes/{sandbox_id}/ports/{port}/expose",
                           json={"public": public})
        if public:
            console.print("public: anyone with the URL can use it")
        else:
            console.print(f"token: {body['token']}  (send as ?sealbox_token= or "
                          "X-Sealbox-Token, or your API key as Authorization: Bearer)")
        print(body["url"], flush=True)

    run_async(main)


# ----- ssh-key --------------------------------------------------------------------------------

ssh_key_app = typer.Typer(help="SSH public keys that open your sandboxes through the gateway.",
                          no_args_is_help=True)


@ssh_key_app.command("add")
def ssh_key_add(file: Annotated[Path, typer.Argument(help="public key file (e.g. ~/.ssh/id_ed25519.pub)")]
                ) -> None:
    """Register a public key."""
    if file.suffix != ".pub" and file.with_suffix(file.suffix + ".pub").is_file():
        fail(f"error: {file} looks like a private key; pass {file}.pub", 2)
    try:
        text = file.read_text()
    except OSError as exc:
        fail(f"error: cannot read {file}: {exc.strerror}", 2)
    if "PRIVATE KEY" in text:
        fail(f"error: {file} is a private key; pass the .pub file", 2)

    async def main() -> None:
        key = await _call("POST", "/v1/ssh-keys", json={"public_key": text.strip()})
        console.print(f"added {key['fingerprint']} {key['comment']}".rstrip())

    run_async(main)


@ssh_key_app.command("ls")
def ssh_key_ls() -> None:
    """List your registered keys."""

    async def main() -> None:
        keys = await _call("GET", "/v1/ssh-keys")
        table = Table("FINGERPRINT", "TYPE", "COMMENT", box=None)
        for key in keys:
            table.add_row(key["fingerprint"], key["algorithm"], key["comment"])
        console.print(table)

    run_async(main)


@ssh_key_app.command("rm")
def ssh_key_rm(fingerprint: Annotated[str, typer.Argument(help="SHA256:... as `ls` shows it")]
               ) -> None:
    """Remove a key."""

    async def main() -> None:
        await _call("DELETE", f"/v1/ssh-keys/{fingerprint}")
        console.print(f"removed {fingerprint}")

    run_async(main)


# ----- code -----------------------------------------------------------------------------------

def _markers(sandbox_id: str) -> tuple[str, str]:
    return (f"# >>> sealbox {sandbox_id} (written by `sealbox code`; edits here are replaced) >>>",
            f"# <<< sealbox {sandbox_id} <<<")


def ssh_config_block(sandbox_id: str, host: str, port: int, known_hosts: Path | None,
                     identity: Path | None) -> str:
    begin, end = _markers(sandbox_id)
    lines = [begin, f"Host sealbox-{sandbox_id}", f"    HostName {host}", f"    Port {port}",
             f"    User {sandbox_id}"]
    if identity is not None:
        lines += [f"    IdentityFile {identity}", "    IdentitiesOnly yes"]
    if known_hosts is not None:
        lines += [f"    UserKnownHostsFile {known_hosts}", "    StrictHostKeyChecking yes"]
    return "\n".join([*lines, end]) + "\n"


def upsert_block(text: str, sandbox_id: str, block: str) -> str:
    """TEXT with this sandbox's block replaced (or appended): running twice changes nothing."""
    begin, end = _markers(sandbox_id)
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        stop = len(text) if stop < 0 else stop + len(end)
        if text[stop:stop + 1] == "\n":
            stop += 1
        return text[:start] + block + text[stop:]
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text else "") + block


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".sealbox-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def code(
    sandbox_id: SandboxArg,
    ssh_config: Annotated[Path, typer.Option(
        help="the OpenSSH config file to update")] = Path("~/.ssh/config"),
    identity: Annotated[Path | None, typer.Option(help="private key to use for this host")] = None,
) -> None:
    """Set up `ssh sealbox-ID` (and VS Code Remote-SSH) for a sandbox; prints the command to open it."""
    if not _ID.fullmatch(sandbox_id):
        fail(f"error: {sandbox_id!r} is not a sandbox id", 2)

    async def main() -> None:
        await _call("GET", f"/v1/sandboxes/{sandbox_id}")  # exists and is yours
        info = await _call("GET", "/v1/ssh")
        if not info["enabled"]:
            raise ConfigError("the server runs no SSH gateway: start it with `sealbox server "
                              "--ssh-port PORT`")
        host = urlsplit(server_url()[0]).hostname or "127.0.0.1"
        port = int(info["port"])
        config = ssh_config.expanduser()
        known: Path | None = None
        if info.get("host_key"):
            known = config.parent / "sealbox_known_hosts"
            entry = f"[{host}]:{port} {info['host_key']}"
            lines = known.read_text().splitlines() if known.is_file() else []
            lines = [ln for ln in lines if not ln.startswith(f"[{host}]:{port} ")] + [entry]
            _write_private(known, "\n".join(lines) + "\n")
        block = ssh_config_block(sandbox_id, host, port, known,
                                 identity.expanduser().resolve() if identity else None)
        current = config.read_text() if config.is_file() else ""
        updated = upsert_block(current, sandbox_id, block)
        if updated != current:
            _write_private(config, updated)
        console.print(f"{config}: Host sealbox-{sandbox_id} -> {host}:{port} "
                      "(register your key with `sealbox ssh-key add`)")
        print(f"code --remote ssh-remote+sealbox-{sandbox_id} /workspace", flush=True)

    run_async(main)
