"""Host changes made in worker threads (pyroute2 runs its own event loop, so netlink calls
stay off ours)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def run_to_completion(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """FN in a thread. Cancelling the caller does not return before the thread is done: a
    thread cannot be stopped, and cleanup that ran while it still worked would miss what it
    creates afterwards (a network namespace or veth made after its removal leaks)."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise
