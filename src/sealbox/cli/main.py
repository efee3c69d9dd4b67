"""Entry point: `sealbox COMMAND`."""

from __future__ import annotations

import typer

from sealbox.cli.doctor import doctor
from sealbox.cli.run import run

app = typer.Typer(
    name="sealbox", no_args_is_help=True, add_completion=False,
    help="Sandboxes for agent code where real credentials never enter the sandbox.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(context_settings={"allow_interspersed_args": False})(run)
app.command()(doctor)


def main() -> None:
    app()
