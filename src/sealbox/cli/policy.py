"""`sealbox policy suggest ID`: start strict, widen with evidence."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sealbox.cli.common import run_async
from sealbox.cli.sandboxes import _connect
from sealbox.egress.suggest import suggest as suggest_from

policy_app = typer.Typer(help="Egress policy helpers.", no_args_is_help=True)


@policy_app.command()
def suggest(sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
            as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
            ) -> None:
    """The smallest --allow-net list that lets ID's allowed traffic through, and what was
    blocked (from its egress audit log)."""

    async def main() -> None:
        sb = await _connect(sandbox_id)
        s = suggest_from(await sb.egress_log())
        await sb.disconnect()
        if as_json:
            print(json.dumps({"allow_net": s.allow_net, "blocked": s.blocked}))
            return
        print("# allowed traffic needs:")
        print(" ".join(f"--allow-net {e}" for e in s.allow_net) or "# (no egress was used)")
        if s.blocked:
            print("# blocked (add only what you trust):")
            for dest, count in s.blocked.items():
                print(f"#   {dest}  ({count}x)")

    run_async(main)
