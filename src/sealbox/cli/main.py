"""Entry point: `sealbox COMMAND`."""

from __future__ import annotations

import typer

from sealbox.cli.doctor import doctor
from sealbox.cli.exec import exec_, shell
from sealbox.cli.pause import pause, resume
from sealbox.cli.files import cp
from sealbox.cli.policy import policy_app
from sealbox.cli.pools import pool_app
from sealbox.cli.reach import code, expose, ssh_key_app
from sealbox.cli.run import run
from sealbox.cli.sandboxes import create, egress, kill, logs, ls
from sealbox.cli.server import server
from sealbox.cli.templates import fork, snapshot, template_app
from sealbox.cli.volumes import volume_app

app = typer.Typer(
    name="sealbox", no_args_is_help=True, add_completion=False,
    help="Sandboxes for agent code where real credentials never enter the sandbox.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(context_settings={"allow_interspersed_args": False})(run)
app.command()(doctor)
app.command()(server)
app.command()(create)
app.command()(ls)
app.command("exec", context_settings={"allow_interspersed_args": False})(exec_)
app.command()(kill)
app.command()(pause)
app.command()(resume)
app.command()(cp)
app.command()(shell)
app.command()(logs)
app.command()(egress)
app.command()(expose)
app.command()(code)
app.add_typer(ssh_key_app, name="ssh-key")
app.add_typer(policy_app, name="policy")
app.add_typer(pool_app, name="pool")
app.add_typer(volume_app, name="volume")
app.add_typer(template_app, name="template")
app.command()(snapshot)
app.command()(fork)


def main() -> None:
    app()
