"""Commit waiters: futures resolved from the writer thread, one loop wake-up per burst."""

from __future__ import annotations

import asyncio
import threading

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
