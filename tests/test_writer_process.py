"""The ledger writer process: rows down a pipe, committed by a child, acknowledged back;
the child killed, stopped, signalled, or left alone by a parent killed with -9."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from spendtap.store.ledger import Ledger
from spendtap.store.writer_process import ProcessLedgerWriter, WriterProcessError
from tests.helpers import ledger_row, voluntary_switches, wait_for

PRICES = """
[models."m1"]
input = 1
output = 2
"""


def stored(path) -> dict[str, tuple]:
    conn = sqlite3.connect(path)
    try:
        return {
            r[0]: r[1:] for r in conn.execute("SELECT id, cost_nusd, price_source FROM requests")
        }
    finally:
        conn.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def logger():
    return logging.getLogger(f"test.writer_process.{uuid.uuid4().hex}")


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    return path


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def submit_and_wait(writer, rows) -> None:
    loop = asyncio.get_running_loop()
    futures = []
    for row in rows:
        fut = loop.create_future()
        writer.submit(row, lambda fut=fut: fut.set_result(None))
        futures.append(fut)
    await asyncio.wait_for(asyncio.gather(*futures), 30)


def test_rows_are_committed_by_the_child_priced_and_acknowledged(db, tmp_path, logger):
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    observed: list[dict] = []

    async def main():
        writer = ProcessLedgerWriter(
            db, prices=str(prices), logger=logger, after_commit=observed.extend
        )
        writer.start(asyncio.get_running_loop())
        child = writer._proc.pid
        assert child != os.getpid() and alive(child)
        await submit_and_wait(writer, [ledger_row(f"r{i}") for i in range(200)])
        # Acknowledged means on disk: read by another connection before close.
        assert len(stored(db)) == 200
        assert writer.rows_written == 200 and writer.queue_depth == 0
        assert not writer.failing and writer.dropped_rows == 0
        assert writer.close(timeout=10)
        assert not alive(child)

    asyncio.run(main())
    rows = stored(db)
    # 10 prompt and 5 completion tokens at $1 and $2 a million: 20 micro-dollars.
    assert rows["r7"] == (20_000, f"file:{prices}")
    # The cost metrics get the child's price on the parent's rows.
    assert len(observed) == 200
    assert {(r["cost_nusd"], r["price_source"]) for r in observed} == {(20_000, f"file:{prices}")}


def test_a_killed_child_is_started_again_and_nothing_is_lost(db, logger, caplog):
    caplog.set_level(logging.WARNING, logger=logger.name)

    async def main():
        writer = ProcessLedgerWriter(db, logger=logger)
        writer.start(asyncio.get_running_loop())
        first = writer._proc.pid
        await submit_and_wait(writer, [ledger_row(f"a{i}") for i in range(50)])
        os.kill(first, signal.SIGKILL)
        # Rows submitted while the child is dead or starting again wait in the parent.
        await submit_and_wait(writer, [ledger_row(f"b{i}") for i in range(50)])
        assert writer._proc.pid != first
        assert writer.close(timeout=10)

    asyncio.run(main())
    assert set(stored(db)) == {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(50)}
    assert messages(caplog, "the writer process exited")
    assert messages(caplog, "the writer process is back")


def test_the_child_outlives_a_parent_killed_with_9_and_commits_what_it_was_sent(db, tmp_path):
    """kill -9 of the proxy: rows already in the pipe are committed, then the child exits."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, os, signal, sys
            sys.path.insert(0, {str(os.getcwd())!r})
            from spendtap.store.writer_process import ProcessLedgerWriter
            from tests.helpers import ledger_row

            async def main():
                writer = ProcessLedgerWriter({str(db)!r})
                writer.start(asyncio.get_running_loop())
                print(writer._proc.pid, flush=True)
                for i in range(100):  # one frame the pipe takes whole (~40 KiB)
                    writer.submit(ledger_row(f"k{{i}}"))
                await asyncio.sleep(0)  # the next iteration writes them to the pipe
                assert not writer._out and writer.rows_written == 0
                os.kill(os.getpid(), signal.SIGKILL)

            asyncio.run(main())
            """
        )
    )
    parent = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.split()[0])
    assert wait_for(lambda: not alive(child), timeout=30)
    assert len(stored(db)) == 100


def test_the_child_ignores_the_signals_of_a_shutdown(db, logger):
    """Ctrl-C or a service manager's SIGTERM reach the whole process group: the child
    goes on until the parent closes its input."""

    async def main():
        writer = ProcessLedgerWriter(db, logger=logger)
        writer.start(asyncio.get_running_loop())
        child = writer._proc.pid
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(child, sig)
        await asyncio.sleep(0.2)
        assert alive(child)
        await submit_and_wait(writer, [ledger_row(f"s{i}") for i in range(20)])
        assert writer.close(timeout=10)
        assert not alive(child)

    asyncio.run(main())
    assert len(stored(db)) == 20


def test_a_stalled_child_never_blocks_the_event_loop(db, logger):
    """A child that reads nothing (stopped here) fills the pipe; the loop keeps running and
    holds the rest until the child reads again."""

    async def main():
        cap = 256 << 10
        writer = ProcessLedgerWriter(db, logger=logger, max_buffered_bytes=cap)
        loop = asyncio.get_running_loop()
        writer.start(loop)
        child = writer._proc.pid
        os.kill(child, signal.SIGSTOP)
        try:
            rows = [ledger_row(f"p{i}", error="x" * 900) for i in range(3000)]  # > 2 MiB
            longest = 0.0
            futures = []
            for chunk in range(0, len(rows), 100):
                for row in rows[chunk : chunk + 100]:
                    fut = loop.create_future()
                    writer.submit(row, lambda fut=fut: fut.set_result(None))
                    futures.append(fut)
                started = time.monotonic()
                await asyncio.sleep(0)
                longest = max(longest, time.monotonic() - started)
            assert writer._out, "the pipe took everything: the test did not fill it"
            # Bytes held for the pipe stay bounded (one 100-row frame past the cap at
            # most); the other rows wait in the queue, bounded by max_pending.
            assert len(writer._out) < cap + 100 * 1100
            assert writer.queue_depth == 3000
            assert longest < 0.5
            assert not any(f.done() for f in futures)
        finally:
            os.kill(child, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*futures), 60)
        assert writer.close(timeout=10)

    asyncio.run(main())
    assert len(stored(db)) == 3000


def test_a_child_that_cannot_start_is_an_error(db, tmp_path, logger):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(WriterProcessError, match="cannot start"):
            ProcessLedgerWriter(db, logger=logger, python=str(tmp_path / "no-python")).start(loop)
        with pytest.raises(WriterProcessError, match="cannot open"):
            ProcessLedgerWriter(tmp_path, logger=logger).start(loop)  # a directory

    asyncio.run(main())


def test_close_counts_what_the_child_could_not_write(tmp_path, logger, caplog):
    """A ledger that refuses writes: rows stay with the child, which reports failing, and
    close gives them up after its deadline, counted and logged."""
    caplog.set_level(logging.WARNING, logger=logger.name)
    db = tmp_path / "ledger.db"
    Ledger(db).close()
    holder = sqlite3.connect(db)

    async def main():
        writer = ProcessLedgerWriter(db, logger=logger)
        writer.start(asyncio.get_running_loop())
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held from now on
        for i in range(10):
            writer.submit(ledger_row(f"l{i}"))
        deadline = time.monotonic() + 30
        while not writer.failing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert writer.failing and writer.queue_depth == 10
        assert not writer.close(timeout=1)
        assert writer.dropped_rows == 10

    try:
        asyncio.run(main())
    finally:
        holder.rollback()
        holder.close()
    assert messages(caplog, "cannot write to")
    assert messages(caplog, "closing with 10 rows not written")


@pytest.mark.parametrize("restart", ["starting", "not yet"])
def test_close_while_the_child_is_being_replaced_still_writes_every_row(db, logger, restart):
    """Shutdown right after the child died: rows no child has acknowledged go to a fresh
    one, whether its replacement is still starting or not started yet (a backoff)."""

    async def main():
        writer = ProcessLedgerWriter(db, logger=logger)
        writer.start(asyncio.get_running_loop())
        first = writer._proc.pid
        await submit_and_wait(writer, [ledger_row(f"a{i}") for i in range(20)])
        if restart == "not yet":
            writer._restart_after = time.monotonic() + 3600  # the next start waits
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (writer._proc is None or writer._proc.pid == first) and not (
            restart == "not yet" and writer._proc is None
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert not writer._ready or writer._proc is None
        for i in range(30):
            writer.submit(ledger_row(f"b{i}"))
        await asyncio.sleep(0)  # the batch joins the rows waiting for a child
        assert writer.close(timeout=30)
        assert writer.dropped_rows == 0

    asyncio.run(main())
    assert set(stored(db)) == {f"a{i}" for i in range(20)} | {f"b{i}" for i in range(30)}


def test_an_idle_child_sleeps_until_rows_come(db, logger):
    """Nothing to write, nothing to report: the child waits on its pipe without waking
    (it used to wake twice a second to report unchanged figures), and still takes the
    rows that come after the wait."""

    async def main():
        writer = ProcessLedgerWriter(db, logger=logger)
        writer.start(asyncio.get_running_loop())
        child = writer._proc.pid
        await submit_and_wait(writer, [ledger_row("before")])
        await asyncio.sleep(0.3)  # the acknowledgement's wake-ups settle
        before = voluntary_switches(child)
        await asyncio.sleep(1.5)
        assert voluntary_switches(child) == before
        await submit_and_wait(writer, [ledger_row("after")])
        assert writer.close(timeout=10)

    asyncio.run(main())
    assert set(stored(db)) == {"before", "after"}
