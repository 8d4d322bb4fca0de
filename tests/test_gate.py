"""Gate.admit in process: unbudgeted traffic costs no body walk; a budgeted request
reserves from the event loop without ever blocking it (a locked ledger is tried again
after short sleeps), and a large body is estimated on the worker thread."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time

import pytest

from spendtap.metering.request import parse_request
from spendtap.proxy import gate as gate_module
from spendtap.proxy.gate import Gate
from spendtap.store.budgets import Budgets


def _admit(g: Gate, body: bytes, account: str, key: str):
    info = parse_request("/v1/chat/completions", {}, body)
    return asyncio.run(g.admit("flow-" + account, body, info, account, key))


@pytest.fixture
def gate(tmp_path):
    path = str(tmp_path / "ledger.db")
    g = Gate(path)
    with Budgets(path) as budgets:
        budgets.set("key", "capped", 100, None)
    yield g
    g.close()


def _walks(monkeypatch) -> list[str]:
    """The threads the reservation estimate runs on, in order."""
    walked: list[str] = []
    real = gate_module.reservation_split

    def counting(*args, **kwargs):
        walked.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(gate_module, "reservation_split", counting)
    return walked


def test_unbudgeted_requests_never_walk_the_body(gate, monkeypatch):
    walked = _walks(monkeypatch)
    message = {"role": "user", "content": "x" * 100_000}
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [message]}).encode()
    admission = _admit(gate, body, "acme", "free-key")
    assert admission.refusal is None and admission.reservation_id is None
    assert walked == []
    # A budgeted key: the walk happens, on the budgets worker thread, and is refused.
    admission = _admit(gate, body, "acme", "capped")
    assert admission.refusal is not None and admission.reason == "balance"
    assert walked and all(name.startswith("spendtap-budgets") for name in walked)
    small = json.dumps({"model": "m", "max_tokens": 5,
                        "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
    admission = _admit(gate, small, "acme", "capped")
    assert admission.refusal is None and admission.reservation_id == "flow-acme"


SMALL = json.dumps(
    {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
).encode()


def test_a_small_budgeted_request_reserves_on_the_event_loop(gate, monkeypatch):
    """With the ledger free, the reservation is made where the hook runs: no thread hop."""
    walked = _walks(monkeypatch)
    admission = _admit(gate, SMALL, "acme", "capped")
    assert admission.refusal is None and admission.reservation_id == "flow-acme"
    assert walked == [threading.current_thread().name]
    with Budgets(gate._budgets.path) as budgets:
        assert [r["id"] for r in budgets.reservations()] == ["flow-acme"]


def test_a_locked_ledger_is_waited_out_without_blocking_the_loop(gate, monkeypatch):
    """Another writer holds the ledger's lock for 0.4 s: the reservation waits it out,
    tried again after short sleeps, and the loop keeps running meanwhile."""
    walked = _walks(monkeypatch)
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock():
        conn = sqlite3.connect(gate._budgets.path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        time.sleep(0.4)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert locked.wait(10)

    async def scenario():
        gaps: list[float] = []
        done = False

        async def ticker():
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await gate._budgeted_principals()  # the budgets list, read before the lock matters
        release.set()
        started = time.monotonic()
        info = parse_request("/v1/chat/completions", {}, SMALL)
        admission = await gate.admit("flow-locked", SMALL, info, "acme", "capped")
        waited = time.monotonic() - started
        done = True
        await tick
        return admission, waited, max(gaps)

    admission, waited, worst_gap = asyncio.run(scenario())
    holder.join()
    assert admission.refusal is None and admission.reservation_id == "flow-locked"
    assert waited >= 0.3  # it did wait for the lock
    assert worst_gap < 0.1  # while the loop went on
    assert walked == [threading.current_thread().name]  # estimated once, on the loop
    with Budgets(gate._budgets.path) as budgets:
        assert [r["id"] for r in budgets.reservations()] == ["flow-locked"]


def test_a_large_budgeted_body_is_estimated_on_the_worker(gate, monkeypatch):
    """A body over ``LOOP_RESERVE_MAX_BODY`` is never parsed on the event loop."""
    walked = _walks(monkeypatch)
    text = "x" * (gate_module.LOOP_RESERVE_MAX_BODY + 1)
    body = json.dumps(
        {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}
    )
    with Budgets(gate._budgets.path) as budgets:
        budgets.set("key", "roomy", 10**9, None)
    admission = _admit(gate, body.encode(), "acme", "roomy")
    assert admission.refusal is None and admission.reservation_id == "flow-acme"
    assert len(walked) == 1 and walked[0].startswith("spendtap-budgets")


def test_a_ledger_locked_past_the_busy_timeout_is_unavailable(tmp_path):
    """Locked for longer than the busy timeout: 503 (fail closed), the loop never blocked,
    and nothing reserved."""
    path = str(tmp_path / "ledger.db")
    g = Gate(path)
    try:
        with Budgets(path) as budgets:
            budgets.set("key", "capped", 100, None)
        g._budgets.busy_timeout_s = 0.3
        conn = sqlite3.connect(path, isolation_level=None)
        asyncio.run(g._budgeted_principals())
        conn.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        admission = _admit(g, SMALL, "acme", "capped")
        waited = time.monotonic() - started
        conn.execute("ROLLBACK")
        conn.close()
        assert admission.refusal is not None and admission.reason == "unavailable"
        assert admission.refusal[0] == 503
        assert 0.2 <= waited < 2.0
        with Budgets(path) as budgets:
            assert budgets.reservations() == []
    finally:
        g.close()


def _listings(g: Gate, monkeypatch) -> list[str]:
    """The threads the list of budgeted principals is read on, in order."""
    threads: list[str] = []
    for store in (g._budgets, g._loop_budgets):
        real = store.principals

        def recording(real=real):
            threads.append(threading.current_thread().name)
            return real()

        monkeypatch.setattr(store, "principals", recording)
    return threads


def _list_again(g: Gate) -> frozenset:
    g._budgeted_until = 0.0  # as if its second had passed
    return asyncio.run(g._budgeted_principals())


def test_a_short_list_of_budgets_is_read_again_on_the_event_loop(gate, monkeypatch):
    """The first read is the worker's (the list could be long); while it stays short,
    each later read is the loop's own: no thread hop a second."""
    threads = _listings(gate, monkeypatch)
    with Budgets(gate._budgets.path) as budgets:
        budgets.set("account", "acme", 10, None, unit="usd")
    assert _list_again(gate) == {("key", "capped"), ("account", "acme")}
    assert gate._money == {("account", "acme")}
    with Budgets(gate._budgets.path) as budgets:
        budgets.set("key", "later", 10, None)
    assert ("key", "later") in _list_again(gate)  # a new budget is seen
    here = threading.current_thread().name
    assert threads[0].startswith("spendtap-budgets") and threads[1:] == [here]


def test_a_long_list_of_budgets_stays_on_the_worker(gate, monkeypatch):
    monkeypatch.setattr(gate_module, "LOOP_LIST_MAX_BUDGETS", 2)
    with Budgets(gate._budgets.path) as budgets:
        for n in range(3):
            budgets.set("key", f"k{n}", 10, None)
    threads = _listings(gate, monkeypatch)
    for _ in range(3):
        assert len(_list_again(gate)) == 4
    assert len(threads) == 3 and all(t.startswith("spendtap-budgets") for t in threads)


def test_a_list_the_loop_cannot_read_is_read_by_the_worker(gate, monkeypatch):
    from spendtap.store.errors import LedgerBusy

    _list_again(gate)  # short: the next read is the loop's

    def locked():
        raise LedgerBusy("database is locked")

    monkeypatch.setattr(gate._loop_budgets, "principals", locked)
    assert _list_again(gate) == {("key", "capped")}
