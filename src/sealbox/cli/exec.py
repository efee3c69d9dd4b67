"""`sealbox exec ID -- CMD` and `sealbox shell ID`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import termios
import tty
from typing import Annotated

import typer

from sealbox.cli.common import fail, run_async, write_out
from sealbox.cli.sandboxes import _connect
from sealbox.engine.spec import ExecResult
from sealbox.errors import SandboxGone
from sealbox.guest.client import Output


def exec_(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    cmd: Annotated[list[str], typer.Argument(help="command and arguments (after --)")],
) -> None:
    """Run CMD in a sandbox, streaming its output; exits with its exit code."""

    # Options stop at ID, so a "--" separator arrives as part of CMD.
    argv = cmd[1:] if cmd[:1] == ["--"] else cmd
    if not argv:
        fail("error: give a command after the sandbox id: sealbox exec ID -- CMD", 2)

    async def main() -> int:
        sb = await _connect(sandbox_id)
        result: ExecResult | None = None
        async for item in sb.exec_stream(argv):
            if isinstance(item, Output):
                write_out(item.stream, item.data)
            else:
                result = item
        if result is None:
            raise SandboxGone(f"sandbox {sandbox_id} ended before the command finished")
        if result.limit:
            write_out("stderr", f"sealbox: killed: {result.limit}\n".encode())
        return result.exit_code or 0  # never None: not a background command

    raise typer.Exit(run_async(main))


def shell(sandbox_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """An interactive shell in the sandbox (a real PTY; resizes follow your terminal)."""

    async def main() -> int:
        sb = await _connect(sandbox_id)
        cols, rows = shutil.get_terminal_size()
        session = await sb.pty(rows=rows, cols=cols)
        loop = asyncio.get_running_loop()
        stdin_fd = sys.stdin.fileno()
        interactive = os.isatty(stdin_fd)
        saved = termios.tcgetattr(stdin_fd) if interactive else None

        def on_input() -> None:
            data = os.read(stdin_fd, 65536)
            if data:
                asyncio.ensure_future(session.write(data))
            else:
                loop.remove_reader(stdin_fd)

        def on_resize() -> None:
            c, r = shutil.get_terminal_size()
            asyncio.ensure_future(session.resize(r, c))

        try:
            if saved is not None:
                tty.setraw(stdin_fd)
                loop.add_signal_handler(signal.SIGWINCH, on_resize)
            loop.add_reader(stdin_fd, on_input)
            async for chunk in session:
                write_out("stdout", chunk)
            return await session.wait()
        finally:
            loop.remove_reader(stdin_fd)
            if saved is not None:
                loop.remove_signal_handler(signal.SIGWINCH)
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)

    raise typer.Exit(run_async(main))
