"""`sealbox doctor`: which tiers work on this host, and for each that does not, why."""

from __future__ import annotations

import shutil

import typer
from rich.console import Console

from sealbox.engine import host_limits
from sealbox.runtimes import registry


def doctor() -> None:
    """Probe every isolation tier on this host."""
    console = Console(highlight=False)
    any_ok = False
    for name, probe in registry.probes().items():
        any_ok = any_ok or probe.ok
        state = "[green]ok[/green]  " if probe.ok else "[red]no[/red]  "
        detail = " ".join(probe.detail.split())
        console.print(f"{name:<10} {state} ({detail})", soft_wrap=True)
        if probe.ok and probe.auto_skip:
            console.print(f"{'':<10}      not chosen by --runtime auto: {probe.auto_skip}",
                          soft_wrap=True)
    # Not tiers: how many sandboxes the host's task limit leaves room for (gVisor's take ~100
    # threads each), and what templates with `base: debian` need.
    limit = host_limits.task_limit()
    state = "[green]ok[/green]  " if limit >= 100_000 else "[yellow]low[/yellow] "
    console.print(f"{'tasks':<10} {state} (the host holds {limit} processes and threads; a "
                  "gVisor sandbox takes ~100 or more, a namespace one ~8"
                  + ("" if limit >= 100_000 else "; sysctl -w kernel.pid_max=4194304") + ")",
                  soft_wrap=True)
    # Not a tier: what templates with `base: debian` need on the server's host.
    debootstrap = shutil.which("debootstrap")
    state = "[green]ok[/green]  " if debootstrap else "[yellow]no[/yellow]  "
    detail = (f"templates on a Debian base: {debootstrap}" if debootstrap else
              "templates on a Debian base need debootstrap: apt-get install debootstrap")
    console.print(f"{'debian':<10} {state} ({detail})", soft_wrap=True)
    if not any_ok:
        raise typer.Exit(1)
