"""`sealbox doctor`: which tiers work on this host, and for each that does not, why."""

from __future__ import annotations

import shutil

import typer
from rich.console import Console

from sealbox.engine import host_limits
from sealbox.runtimes import registry


def _row(console: Console, name: str, ok: bool, detail: str,
         bad: str = "[red]no[/red]  ") -> None:
    state = "[green]ok[/green]  " if ok else bad
    console.print(f"{name:<10} {state} ({' '.join(detail.split())})", soft_wrap=True)


def doctor() -> None:
    """Probe every isolation tier on this host."""
    console = Console(highlight=False)
    any_ok = False
    for name, probe in registry.probes().items():
        any_ok = any_ok or probe.ok
        _row(console, name, probe.ok, probe.detail)
        if probe.ok and probe.auto_skip:
            console.print(f"{'':<10}      not chosen by --runtime auto: {probe.auto_skip}",
                          soft_wrap=True)
    # Not tiers: how many sandboxes the host's task limit leaves room for (gVisor's take ~100
    # threads each), and what templates with `base: debian` need.
    limit = host_limits.task_limit()
    roomy = limit >= 100_000
    _row(console, "tasks", roomy, f"the host holds {limit} processes and threads; a gVisor "
         "sandbox takes ~100 or more, a namespace one ~8"
         + ("" if roomy else "; sysctl -w kernel.pid_max=4194304"), bad="[yellow]low[/yellow] ")
    debootstrap = shutil.which("debootstrap")
    _row(console, "debian", debootstrap is not None,
         f"templates on a Debian base: {debootstrap}" if debootstrap else
         "templates on a Debian base need debootstrap: apt-get install debootstrap",
         bad="[yellow]no[/yellow]  ")
    if not any_ok:
        raise typer.Exit(1)
