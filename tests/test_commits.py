"""Commit waiters: futures resolved from the writer thread, one loop wake-up per burst."""

from __future__ import annotations

import asyncio
import itertools
import threading

from spendtap.store import commits
from spendtap.store.commits import CommitWaiters


def test_commits_from_another_thread_resolve_every_future():
    """Callbacks fired from another thread resolve all their futures on the loop."""

    async def main():
        waiters = CommitWaiters(asyncio.get_running_loop())
        pairs = [waiters.new() for _ in range(500)]
        drains = []
        original = waiters._drain
        waiters._drain = lambda: (drains.append(1), original())
        thread = threading.Thread(target=lambda: [cb() for _, cb in pairs])
        thread.start()
        await asyncio.wait_for(asyncio.gather(*(f for f, _ in pairs)), 5)
        thread.join()
        return len(drains)

    drains = asyncio.run(main())
    assert 1 <= drains <= 500


def test_a_callback_after_the_wait_gave_up_is_harmless():
    """A commit that lands after its waiter timed out (future cancelled) raises nothing."""

    async def main():
        waiters = CommitWaiters(asyncio.get_running_loop())
        future, on_commit = waiters.new()
        future.cancel()
        on_commit()
        await asyncio.sleep(0.01)
        return future.cancelled()

    assert asyncio.run(main())


def _release_log(n: int) -> list[str]:
    """Commit ``n`` rows in one batch; log their releases among one-per-iteration ticks."""

    async def main():
        loop = asyncio.get_running_loop()
        waiters = CommitWaiters(loop)
        pairs = [waiters.new() for _ in range(n)]
        log: list[str] = []
        for i, (future, _) in enumerate(pairs):
            future.add_done_callback(lambda _f, i=i: log.append(f"release {i}"))
        # One batch: every row committed before the loop runs again.
        thread = threading.Thread(target=lambda: [cb() for _, cb in pairs])
        thread.start()
        thread.join()

        def tick(left: int) -> None:  # other work, one step per loop iteration
            log.append("tick")
            if left:
                loop.call_soon(tick, left - 1)

        tick(n * 4)
        await asyncio.wait_for(asyncio.gather(*(f for f, _ in pairs)), 5)
        return log

    return asyncio.run(main())


def test_a_batch_is_released_in_commit_order_one_waiter_per_loop_iteration(monkeypatch):
    """The loop runs other work between two releases of one batch (no lockstep release)."""
    monkeypatch.setattr(commits, "SPREAD_S", 3600.0)  # never cut short, however slow the host
    log = _release_log(4)
    releases = [entry for entry in log if entry != "tick"]
    assert releases == [f"release {i}" for i in range(4)]
    at = [log.index(entry) for entry in releases]
    assert all("tick" in log[a + 1 : b] for a, b in itertools.pairwise(at))


def test_the_rest_of_a_batch_goes_at_once_when_the_spreading_took_too_long(monkeypatch):
    """Under load an iteration is long: the spreading stops adding iterations to the ends."""
    monkeypatch.setattr(commits, "SPREAD_S", 0.0)
    log = _release_log(4)
    first = log.index("release 0")
    assert log[first : first + 4] == [f"release {i}" for i in range(4)]
