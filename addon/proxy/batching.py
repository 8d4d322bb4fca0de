"""Calls gathered while others are out: one call for many requests, off the event loop.

``await Batcher(fn, executor).submit(item)`` answers with ``fn``'s answer for that item.
``fn`` takes a list of items and returns one answer per item, in order (an exception
instance for an item that failed); it runs on ``executor``, never on the event loop.

Items submitted in the same turn of the event loop go together. While a batch is out,
new items wait and go together in the next one, when it is back; only when the batches
out have all taken longer than ``overlap_after_s`` (a lock wait, a slow server) does
another go beside them, up to ``max_in_flight``, so one slow answer does not hold up every
request. At low load an item goes at once, alone; under load a request waits for at most
the batch before it, and the worker thread and the database see one call for many
requests (the fleet's reservations: one PostgreSQL round trip and transaction).

This module imports neither mitmproxy nor click.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any


class Batcher:
    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        *,
        max_in_flight: int = 4,
        overlap_after_s: float = 0.005,
        max_items: int = 64,
    ):
        if max_in_flight < 1 or max_items < 1 or overlap_after_s < 0:
            raise ValueError(
                "a batcher needs max_in_flight >= 1, max_items >= 1 and overlap_after_s >= 0"
            )
        self._fn = fn
        self._executor = executor
        self.max_in_flight = max_in_flight
        self.overlap_after_s = overlap_after_s
        self.max_items = max_items
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._sent_at: list[float] = []  # when each batch out was sent, oldest first
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0  # sent so far, and the items in them (read by the tests)
        self.items = 0

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._waiting.append((item, answer))
        if not self._scheduled:
            # At the end of this turn: the other requests that arrived with this one join.
            self._scheduled = True
            loop.call_soon(self._send, loop)
        return await answer

    def _may_send(self, loop: asyncio.AbstractEventLoop) -> bool:
        out = len(self._sent_at)
        if out == 0:
            return True
        if out >= self.max_in_flight:
            return False
        # Beside the batches out only once the newest of them has been out too long.
        due = self._sent_at[-1] + self.overlap_after_s
        if loop.time() >= due:
            return True
        if self._timer is None:
            self._timer = loop.call_at(due, self._on_timer, loop)
        return False

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._send(loop)

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        while self._waiting and self._may_send(loop):
            batch = self._waiting[: self.max_items]
            del self._waiting[: self.max_items]
            live = [(item, answer) for item, answer in batch if not answer.done()]
            if not live:
                continue  # every one of them was cancelled (their clients left)
            try:
                done = loop.run_in_executor(self._executor, self._fn, [item for item, _ in live])
            except Exception as e:  # the executor is shut down (its owner was rebuilt)
                _answer_all(live, e)
                continue
            sent_at = loop.time()
            self._sent_at.append(sent_at)
            self.batches += 1
            self.items += len(live)
            done.add_done_callback(
                lambda d, live=live, sent_at=sent_at: self._answered(loop, live, sent_at, d)
            )

    def _answered(self, loop, batch: list[tuple[Any, asyncio.Future]], sent_at, done) -> None:
        self._sent_at.remove(sent_at)
        try:
            answers = list(done.result())
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers for a batch of {len(batch)}")
        except BaseException as e:  # the whole call failed: every item's answer
            answers = [e] * len(batch)
        for (_, answer), result in zip(batch, answers, strict=True):
            if answer.done():
                continue
            if isinstance(result, BaseException):
                answer.set_exception(result)
            else:
                answer.set_result(result)
        if self._waiting and not self._scheduled:
            self._send(loop)


def _answer_all(batch: list[tuple[Any, asyncio.Future]], error: BaseException) -> None:
    for _, answer in batch:
        if not answer.done():
            answer.set_exception(error)
