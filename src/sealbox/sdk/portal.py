"""One background event loop that the sync SDK runs the async core on."""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Portal:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        # The thread lives as long as the process: sandboxes started from it are tied to it
        # (bubblewrap's --die-with-parent follows the thread that forked).
        self._thread = threading.Thread(target=self._loop.run_forever, name="sealbox-portal",
                                        daemon=True)
        self._thread.start()

    def call(self, aw: Awaitable[T]) -> T:
        async def _run() -> T:
            return await aw

        return asyncio.run_coroutine_threadsafe(_run(), self._loop).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        while True:
            try:
                yield self.call(agen.__anext__())
            except StopAsyncIteration:
                return

    def shutdown(self) -> None:
        from sealbox.sdk.embedded import close_shared_engine

        if self._loop.is_running():
            try:
                self.call(close_shared_engine())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)


_portal: Portal | None = None
_lock = threading.Lock()


def portal() -> Portal:
    global _portal
    with _lock:
        if _portal is None:
            _portal = Portal()
            atexit.register(_portal.shutdown)
        return _portal
