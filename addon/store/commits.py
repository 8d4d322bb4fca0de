"""Waiting on the event loop for rows the ledger writer thread commits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class CommitWaiters:
    """Futures the writer thread resolves, with one event-loop wake-up per batch.

    ``call_soon_threadsafe`` per row would wake the loop (a syscall) once per
    row; a commit of many rows schedules one drain instead.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._done: list[asyncio.Future] = []
        self._scheduled = False

    def new(self) -> tuple[asyncio.Future, Callable[[], None]]:
        future = self._loop.create_future()

        def on_commit() -> None:  # runs on the writer thread
            with self._lock:
                self._done.append(future)
                if self._scheduled:
                    return
                self._scheduled = True
            self._loop.call_soon_threadsafe(self._drain)

        return future, on_commit

    def _drain(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._scheduled = False
        for future in done:
            if not future.done():
                future.set_result(None)
