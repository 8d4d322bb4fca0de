"""The batcher that gathers the fleet's reservations: real event loop, real worker threads."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from spendtap.proxy.batching import Batcher


class Recorder:
    """A batch function that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.release = threading.Event()
        self.release.set()
        self.threads: set[str] = set()

    def __call__(self, items: list) -> list:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        self.release.wait(10)
        return [item * 10 if item >= 0 else ValueError(f"bad {item}") for item in items]


def run(coro):
    return asyncio.run(coro)


def test_requests_of_one_turn_go_together_and_each_gets_its_answer():
    rec = Recorder()

    async def go():
        with ThreadPoolExecutor(2, thread_name_prefix="worker") as pool:
            b = Batcher(rec, pool)
            return await asyncio.gather(*(b.submit(i) for i in range(5)))

    assert run(go()) == [0, 10, 20, 30, 40]
    assert rec.batches == [[0, 1, 2, 3, 4]]
    assert all(name.startswith("worker") for name in rec.threads)  # never on the loop


def test_while_batches_are_out_new_items_wait_and_go_together():
    rec = Recorder()

    async def go():
        with ThreadPoolExecutor(4) as pool:
            b = Batcher(rec, pool, max_in_flight=1)
            rec.release.clear()
            first = asyncio.ensure_future(b.submit(1))
            await asyncio.sleep(0.05)  # the first batch is out, held
            later = [asyncio.ensure_future(b.submit(i)) for i in (2, 3, 4)]
            await asyncio.sleep(0.05)
            assert rec.batches == [[1]]  # nothing else went while it was out
            rec.release.set()
            return await first, await asyncio.gather(*later), (b.batches, b.items)

    first, later, counts = run(go())
    assert (first, later) == (10, [20, 30, 40])
    assert rec.batches == [[1], [2, 3, 4]]
    assert counts == (2, 4)


def test_a_second_batch_goes_while_the_first_is_held_up_to_the_limit():
    rec = Recorder()

    async def go():
        with ThreadPoolExecutor(4) as pool:
            b = Batcher(rec, pool, max_in_flight=2, overlap_after_s=0.01)
            rec.release.clear()
            a = asyncio.ensure_future(b.submit(1))
            await asyncio.sleep(0.05)
            c = asyncio.ensure_future(b.submit(2))
            await asyncio.sleep(0.05)
            d = [asyncio.ensure_future(b.submit(i)) for i in (3, 4)]
            await asyncio.sleep(0.05)
            out_while_held = [list(x) for x in rec.batches]
            rec.release.set()
            return out_while_held, await asyncio.gather(a, c, *d)

    held, answers = run(go())
    assert held == [[1], [2]]
    assert answers == [10, 20, 30, 40]
    assert rec.batches[2:] == [[3, 4]]


def test_another_batch_goes_beside_only_once_the_one_out_took_too_long():
    rec = Recorder()

    async def go():
        with ThreadPoolExecutor(4) as pool:
            b = Batcher(rec, pool, max_in_flight=4, overlap_after_s=0.6)
            rec.release.clear()
            first = asyncio.ensure_future(b.submit(1))
            await asyncio.sleep(0.05)
            later = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
            await asyncio.sleep(0.1)
            before = [list(x) for x in rec.batches]  # 0.15 s: the first is not late yet
            await asyncio.sleep(0.9)
            after = [list(x) for x in rec.batches]  # 1.05 s: it is; the others went
            rec.release.set()
            return before, after, await first, await asyncio.gather(*later)

    before, after, first, later = run(go())
    assert before == [[1]]
    assert after == [[1], [2, 3]]
    assert (first, later) == (10, [20, 30])


def test_an_items_exception_is_its_own_and_a_failed_call_is_everyones():
    async def go():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(Recorder(), pool)
            ok, bad = await asyncio.gather(b.submit(2), b.submit(-1), return_exceptions=True)
            assert ok == 20 and isinstance(bad, ValueError)

            def broken(items):
                raise ConnectionError("database away")

            b2 = Batcher(broken, pool)
            out = await asyncio.gather(b2.submit(1), b2.submit(2), return_exceptions=True)
            assert all(isinstance(e, ConnectionError) for e in out)

            b3 = Batcher(lambda items: [1], pool)  # a wrong count is an error, not a guess
            out = await asyncio.gather(b3.submit(1), b3.submit(2), return_exceptions=True)
            assert all(isinstance(e, RuntimeError) for e in out)

    run(go())


def test_batches_hold_at_most_max_items_and_cancelled_requests_are_not_sent():
    rec = Recorder()

    async def go():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(rec, pool, max_in_flight=1, max_items=3)
            rec.release.clear()
            first = asyncio.ensure_future(b.submit(0))
            await asyncio.sleep(0.05)
            waiting = [asyncio.ensure_future(b.submit(i)) for i in range(1, 8)]
            await asyncio.sleep(0.01)
            waiting[0].cancel()  # its client left while it waited
            await asyncio.sleep(0.01)
            rec.release.set()
            await first
            return await asyncio.gather(*waiting[1:])

    assert run(go()) == [20, 30, 40, 50, 60, 70]
    assert rec.batches == [[0], [2, 3], [4, 5, 6], [7]]


def test_a_shut_down_executor_fails_the_requests_instead_of_leaving_them_waiting():
    """The gate closes its worker pool when a run-time change rebuilds it: requests that
    reach the old gate's batcher then get an error (a 503 or fail-open), never a hang."""

    async def go():
        pool = ThreadPoolExecutor(1)
        b = Batcher(Recorder(), pool)
        assert await b.submit(1) == 10
        pool.shutdown()
        return await asyncio.wait_for(
            asyncio.gather(b.submit(2), b.submit(3), return_exceptions=True), 5
        )

    assert all(isinstance(e, RuntimeError) for e in run(go()))


def test_limits_must_be_positive():
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError):
            Batcher(Recorder(), pool, max_in_flight=0)
        with pytest.raises(ValueError):
            Batcher(Recorder(), pool, max_items=0)
        with pytest.raises(ValueError):
            Batcher(Recorder(), pool, overlap_after_s=-1)
