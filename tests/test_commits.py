"""Commit waiters: futures resolved from the writer thread, one loop wake-up per burst."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from spendtap.store import commits
from spendtap.store.commits import CommitWaiters, hold_cap, release_delays


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


def test_release_delays_keep_the_spacing_the_waiters_began_with():
    """Each waiter is held back by its distance from the batch's first, at most its cap."""
    assert release_delays([], []) == []
    assert release_delays([5.0], [0.002]) == [0.0]
    caps = [0.002] * 3
    assert release_delays([5.0, 5.0004, 5.0011], caps) == pytest.approx([0, 0.0004, 0.0011])
    # Responses that ended further apart than the cap: the later ones wait the cap, no more.
    assert release_delays([5.0, 5.001, 5.009], caps) == pytest.approx([0, 0.001, 0.002])
    # Each waiter has its own cap (a short response is barely held).
    assert release_delays([5.0, 5.001, 5.0015], [0.002, 0.0003, 0.002]) == pytest.approx(
        [0, 0.0003, 0.0015]
    )
    # A clock that stepped back (or a waiter out of order) is never held a negative time.
    assert release_delays([5.0, 4.999], caps[:2]) == [0.0, 0.0]


def test_a_response_is_held_at_most_a_hundredth_of_its_time_and_2_ms():
    """A paced stream (~0.8 s) may be held the whole 2 ms; a 30 ms JSON answer 0.3 ms."""
    assert hold_cap(0.82, 2.0) == commits.SPACING_CAP_S == 0.002
    assert hold_cap(0.03, 2.0) == pytest.approx(0.0003)
    assert hold_cap(0.0, 2.0) == 0.0
    assert hold_cap(-1.0, 2.0) == 0.0  # a clock step: never a negative hold


def test_a_short_commit_wait_bounds_the_hold():
    """With ``spendtap_commit_wait_ms=5`` a hold takes at most 0.5 ms of it: spacing must
    not make a commit that came in time miss the wait."""
    assert hold_cap(0.82, 0.005) == pytest.approx(0.0005)
    assert hold_cap(0.82, 0.0) == 0.0


def test_a_batch_ends_with_the_spacing_its_responses_ended_with(monkeypatch):
    """One commit of three rows whose waits began 20 ms apart releases them 20 ms apart,
    never before the commit: the group commit does not bring their clients together."""
    monkeypatch.setattr(commits, "SPACING_CAP_S", 3600.0)  # never cut short, however slow

    async def main():
        loop = asyncio.get_running_loop()
        waiters = CommitWaiters(loop)
        pairs = []
        for _ in range(3):
            pairs.append(waiters.new(3600.0))
            await asyncio.sleep(0.02)
        released: list[float] = []
        for future, _ in pairs:
            future.add_done_callback(lambda _f: released.append(loop.time()))
        committed = loop.time()
        for _, on_commit in pairs:  # one batch: committed before the loop runs again
            on_commit()
        await asyncio.wait_for(asyncio.gather(*(f for f, _ in pairs)), 5)
        return committed, released

    committed, released = asyncio.run(main())
    assert committed <= released[0]
    gaps = [b - a for a, b in itertools.pairwise(released)]
    assert all(gap >= 0.02 for gap in gaps), gaps
    assert all(gap < 0.5 for gap in gaps), gaps  # held by its distance, not much more


def test_the_hold_is_capped(monkeypatch):
    """Waits that began far apart: the later one is released the cap after the commit."""
    monkeypatch.setattr(commits, "SPACING_CAP_S", 0.01)

    async def main():
        loop = asyncio.get_running_loop()
        waiters = CommitWaiters(loop)
        first = waiters.new(3600.0)  # the module's cap bounds a waiter's own
        await asyncio.sleep(0.3)
        second = waiters.new(3600.0)
        committed = loop.time()
        first[1]()
        second[1]()
        await asyncio.wait_for(asyncio.gather(first[0], second[0]), 5)
        return committed, loop.time()

    committed, released = asyncio.run(main())
    assert 0.01 <= released - committed < 0.25
