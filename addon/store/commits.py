"""Waiting on the event loop for rows the ledger writer commits."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence

# The longest a committed row's waiter is held back to keep its distance from the first
# waiter of its batch (seconds): the spacing of responses that ended further apart than
# this is not kept, so no end waits more than this on top of its commit.
SPACING_CAP_S = 0.002
# ...and never more than this share of the response's own time: a short response (a
# JSON answer, an unpaced stream) is barely held, so a closed loop of short requests
# loses at most this share of its rate, and requests that arrive together (a fleet's
# reservations share one round trip) mostly stay together.
SPACING_SHARE = 0.01
# ...and never more than this share of the bound on the whole wait
# (``spendtap_commit_wait_ms``): a hold must not turn a commit in time into a late one.
SPACING_WAIT_SHARE = 0.1


def hold_cap(response_s: float, wait_s: float) -> float:
    """The most a response that took ``response_s`` so far may be held for spacing, when
    its end may wait ``wait_s`` in all."""
    return max(0.0, min(SPACING_CAP_S, response_s * SPACING_SHARE, wait_s * SPACING_WAIT_SHARE))


def release_delays(started: Sequence[float], caps: Sequence[float]) -> list[float]:
    """How long after a batch's commit each of its waiters is released.

    ``started``: when each waiter began waiting, in commit order; ``caps``: the most
    each may be held. Each is held back by how long after the batch's first waiter it
    began (at most its cap), so every response of the batch ends about as long after it
    began waiting as the first one did: the batch keeps the spacing its responses ended
    with.
    """
    if not started:
        return []
    first = started[0]
    return [min(max(0.0, t - first), cap) for t, cap in zip(started, caps, strict=True)]


class CommitWaiters:
    """Futures the writer resolves, released with the spacing their responses ended with.

    One event-loop wake-up per committed batch: ``call_soon_threadsafe`` per row would
    wake the loop (a syscall) once per row.

    A group commit resolves all the rows of a batch at once, and the rows of a batch
    belong to responses that ended up to a commit's length apart. Released together,
    those responses end for their clients together; in a closed loop each client then
    sends its next request at the same moment, the requests queue behind each other in
    the proxy, and the commit brings them together again at their next end
    (bench/README.md, "The paced c=16 TTFC excess" and "Keeping the responses'
    spacing"). So each waiter is released as long after the commit as it began waiting
    after the batch's first (``release_delays``; at most ``SPACING_CAP_S``, and at most
    ``SPACING_SHARE`` of the response's time and ``SPACING_WAIT_SHARE`` of the wait's
    bound, ``hold_cap``): each response's end is held
    back by about the same time, as by a proxy with a constant latency, and the spacing
    the upstream gave the responses survives the commit. No future is resolved before
    its row committed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        # (future, when it began waiting on the loop's clock, its hold cap), commit order
        self._done: deque[tuple[asyncio.Future, float, float]] = deque()
        self._scheduled = False

    def new(self, max_hold_s: float = SPACING_CAP_S) -> tuple[asyncio.Future, Callable[[], None]]:
        """A future for one row, and the callback that says the row committed;
        ``max_hold_s``: the most the release may be held for spacing (``hold_cap``)."""
        future = self._loop.create_future()
        entry = (future, self._loop.time(), min(max_hold_s, SPACING_CAP_S))

        # On the writer thread, or on the loop itself (the writer process's
        # acknowledgements are read there): no self-pipe write to wake ourselves.
        def on_commit() -> None:
            with self._lock:
                self._done.append(entry)
                if self._scheduled:
                    return
                self._scheduled = True
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._drain)
            else:
                self._loop.call_soon_threadsafe(self._drain)

        return future, on_commit

    def _drain(self) -> None:
        """The writer's wake-up: release the batch committed since the last one."""
        with self._lock:
            batch, self._done = self._done, deque()
            # The writer schedules the next wake-up itself from here on.
            self._scheduled = False
        now = self._loop.time()
        delays = release_delays([e[1] for e in batch], [e[2] for e in batch])
        for (future, _, _), delay in zip(batch, delays, strict=True):
            if delay > 0:
                self._loop.call_at(now + delay, _release, future)
            else:
                _release(future)


def _release(future: asyncio.Future) -> None:
    if not future.done():  # a waiter that gave up (timed out) is cancelled
        future.set_result(None)
