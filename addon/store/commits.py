"""Waiting on the event loop for rows the ledger writer commits."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

# How long one batch's releases may be spread over (loop time, seconds).
SPREAD_S = 0.001


class CommitWaiters:
    """Futures the writer resolves, with one event-loop wake-up per batch.

    ``call_soon_threadsafe`` per row would wake the loop (a syscall) once per
    row; a commit of many rows schedules one drain instead.

    The drain releases the committed waiters one per loop iteration, in commit
    order, rather than the whole batch at once: resolving every future together
    resumed all of a batch's ``response`` hooks in one iteration, so their clients
    got their ends together and, in a closed loop, sent their next requests in one
    burst that then queued behind itself (bench/README.md, "The paced c=16 TTFC
    excess"). One per iteration lets the loop poll its sockets between releases.
    Under load an iteration is long, so once the spreading has taken ``SPREAD_S``
    the rest of the batch goes at once: staggering must not add a whole batch of
    busy iterations to a response's end. No future is resolved before its row
    committed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._done: deque[asyncio.Future] = deque()
        self._scheduled = False
        self._started = 0.0

    def new(self) -> tuple[asyncio.Future, Callable[[], None]]:
        future = self._loop.create_future()

        # On the writer thread, or on the loop itself (the writer process's
        # acknowledgements are read there): no self-pipe write to wake ourselves.
        def on_commit() -> None:
            with self._lock:
                self._done.append(future)
                if self._scheduled:
                    return
                self._scheduled = True
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._drain)
            else:
                self._loop.call_soon_threadsafe(self._drain)

        return future, on_commit

    def _drain(self) -> None:
        """The writer's wake-up: start releasing the committed waiters."""
        self._started = self._loop.time()
        self._release_next()

    def _release_next(self) -> None:
        spread_over = self._loop.time() - self._started >= SPREAD_S
        with self._lock:
            if spread_over:
                release, self._done = list(self._done), deque()
            elif self._done:
                release = [self._done.popleft()]
            else:
                release = []
            more = bool(self._done)
            if not more:
                # The writer schedules the next wake-up itself from here on.
                self._scheduled = False
        for future in release:
            if not future.done():
                future.set_result(None)
        if more:
            # Still scheduled: the writer only appends, this chain keeps draining.
            self._loop.call_soon(self._release_next)
