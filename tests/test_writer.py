"""The ledger writer thread: batching, commit callbacks, draining, and surviving failures."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid

import pytest

from spendtap.store.ledger import Ledger, NotALedger
from spendtap.store.writer import LedgerWriter
from tests.helpers import ledger_row, wait_for


def stored_ids(path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY rowid")]
    finally:
        conn.close()


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def logger():
    return logging.getLogger(f"test.writer.{uuid.uuid4().hex}")


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def make_writer(db_path, logger):
    writers: list[LedgerWriter] = []

    def make(**kwargs) -> LedgerWriter:
        kwargs.setdefault("logger", logger)
        w = LedgerWriter(kwargs.pop("path", db_path), **kwargs)
        writers.append(w)
        w.start()
        return w

    yield make
    for w in writers:
        w.close(timeout=5)


def remove_ledger_files(path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = f"{path}{suffix}"
        if os.path.exists(p):
            os.remove(p)


def test_many_threads_all_rows_written_exactly_once(make_writer, db_path):
    """Rows from many threads are all committed, each once, in batches of more than one row."""
    writer = make_writer()
    threads_n, per_thread = 8, 1000

    def produce(t: int) -> None:
        for i in range(per_thread):
            writer.submit(ledger_row(f"t{t}-{i}"))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writer.flush(timeout=30)
    ids = stored_ids(db_path)
    assert len(ids) == threads_n * per_thread
    assert set(ids) == {f"t{t}-{i}" for t in range(threads_n) for i in range(per_thread)}
    assert writer.rows_written == threads_n * per_thread
    assert writer.batches_written < writer.rows_written  # batched, not one commit per row
    assert writer.queue_depth == 0
    assert writer.write_errors == 0
    assert writer.dropped_rows == 0
    assert writer.last_commit_at is not None


def test_resubmitted_id_is_stored_once(make_writer, db_path):
    """Submitting the same flow id twice stores one row."""
    writer = make_writer()
    writer.submit(ledger_row("same", prompt_tokens=1))
    writer.submit(ledger_row("same", prompt_tokens=2))
    assert writer.flush(timeout=10)
    assert stored_ids(db_path) == ["same"]


def test_on_commit_runs_after_commit(make_writer, db_path):
    """Each on_commit runs once its row is visible from another connection."""
    writer = make_writer()
    seen: dict[str, bool] = {}
    lock = threading.Lock()

    def callback(rid: str):
        def on_commit() -> None:
            conn = sqlite3.connect(db_path)
            try:
                visible = conn.execute("SELECT count(*) FROM requests WHERE id = ?", (rid,))
                with lock:
                    seen[rid] = visible.fetchone()[0] == 1
            finally:
                conn.close()

        return on_commit

    for i in range(200):
        writer.submit(ledger_row(f"r{i}"), callback(f"r{i}"))
    assert writer.flush(timeout=10)
    assert len(seen) == 200
    assert all(seen.values())


def test_callback_errors_are_logged_not_fatal(make_writer, db_path, caplog):
    """An on_commit that raises is logged and counted; the writer carries on."""
    writer = make_writer()

    def bad() -> None:
        raise RuntimeError("callback bug")

    writer.submit(ledger_row("a"), bad)
    assert writer.flush(timeout=10)
    writer.submit(ledger_row("b"))
    assert writer.flush(timeout=10)
    assert stored_ids(db_path) == ["a", "b"]
    assert writer.callback_errors == 1
    assert len(messages(caplog, "on_commit callback failed")) == 1


def test_close_drains(make_writer, db_path):
    """close() commits everything accepted before it, then stops the thread."""
    writer = make_writer(max_delay_s=0.05)
    for i in range(5000):
        writer.submit(ledger_row(f"r{i}"))
    assert writer.close(timeout=30) is True
    assert len(stored_ids(db_path)) == 5000
    assert writer.queue_depth == 0
    assert not writer._thread.is_alive()


def test_submit_after_close_is_counted(make_writer, db_path, caplog):
    """A row submitted after close is dropped, counted and logged once, never raised."""
    writer = make_writer()
    writer.close(timeout=5)
    writer.submit(ledger_row("late1"))
    writer.submit(ledger_row("late2"))
    assert writer.dropped_rows == 2
    assert len(messages(caplog, "after the writer closed")) == 1
    assert stored_ids(db_path) == []


def test_invalid_row_is_refused_at_submit(make_writer, db_path, caplog):
    """A row that is not a valid ledger row is dropped at submit and cannot wedge the queue."""
    writer = make_writer()
    writer.submit({"id": "bad", "ts": "2025-01-31", "body": "never stored"})
    writer.submit("not even a dict")  # type: ignore[arg-type]
    writer.submit(ledger_row("good"))
    assert writer.flush(timeout=10)
    assert stored_ids(db_path) == ["good"]
    assert writer.dropped_rows == 2
    assert len(messages(caplog, "dropped an invalid row")) == 2


def test_start_fails_on_a_file_that_is_not_a_ledger(tmp_path, logger):
    """start() raises NotALedger for a corrupt file and leaves the file alone."""
    path = tmp_path / "ledger.db"
    path.write_bytes(b"garbage " * 100)
    writer = LedgerWriter(path, logger=logger)
    with pytest.raises(NotALedger):
        writer.start()
    assert path.read_bytes() == b"garbage " * 100


def test_locked_database_delays_but_loses_nothing(make_writer, db_path):
    """Another connection holding BEGIN EXCLUSIVE for a second only delays the rows."""
    writer = make_writer()
    writer.submit(ledger_row("before"))
    assert writer.flush(timeout=10)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(100):
            writer.submit(ledger_row(f"r{i}"))
        assert writer.flush(timeout=0.5) is False
    finally:
        time.sleep(0.5)
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer.flush(timeout=10)
    assert len(stored_ids(db_path)) == 101
    assert writer.dropped_rows == 0


def test_lock_beyond_busy_timeout_is_one_failure_episode(make_writer, db_path, caplog):
    """A lock outlasting the busy timeout logs one warning, retries, and logs the recovery."""
    writer = make_writer(busy_timeout_s=0.05)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(50):
            writer.submit(ledger_row(f"r{i}"))
        assert wait_for(lambda: writer.write_errors >= 3)
        assert writer.failing
        assert writer.queue_depth == 50
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer.flush(timeout=10)
    assert not writer.failing
    assert len(stored_ids(db_path)) == 50
    assert len(messages(caplog, "cannot write to")) == 1
    assert "database is locked" in messages(caplog, "cannot write to")[0]
    assert len(messages(caplog, "recovered after")) == 1


def test_unusable_path_keeps_rows_until_recovery(make_writer, db_path, caplog):
    """With the ledger deleted and a directory in its place, rows wait in memory, then land.

    Running as root defeats chmod-based read-only tests, so this uses a failure no
    permission bypasses: the path stops being a file SQLite can open at all.
    """
    writer = make_writer()
    writer.submit(ledger_row("before"))
    assert writer.flush(timeout=10)
    remove_ledger_files(db_path)
    os.mkdir(db_path)
    try:
        for i in range(100):
            writer.submit(ledger_row(f"r{i}"))
        assert wait_for(lambda: writer.write_errors >= 3)
        assert writer.failing
        assert writer.queue_depth == 100
        assert writer.flush(timeout=0.2) is False
    finally:
        shutil.rmtree(db_path)
    assert writer.flush(timeout=10)
    # A fresh ledger was created; the rows accepted while it was missing are all there.
    assert stored_ids(db_path) == [f"r{i}" for i in range(100)]
    assert writer.dropped_rows == 0
    assert len(messages(caplog, "cannot write to")) == 1
    assert len(messages(caplog, "recovered after")) == 1


def test_deleted_file_is_recreated_not_written_to_a_dead_inode(make_writer, db_path):
    """Rows written after the ledger file is deleted land in a new file, not the unlinked one."""
    writer = make_writer()
    writer.submit(ledger_row("before"))
    assert writer.flush(timeout=10)
    remove_ledger_files(db_path)
    for i in range(10):
        writer.submit(ledger_row(f"r{i}"))
    assert writer.flush(timeout=10)
    assert stored_ids(db_path) == [f"r{i}" for i in range(10)]
    with Ledger.open_existing(db_path) as ledger:
        assert ledger.count() == 10


def test_max_pending_drops_the_oldest(make_writer, db_path, caplog):
    """Past max_pending the oldest rows are dropped, counted and logged once; the rest land."""
    writer = make_writer(max_pending=10)
    writer.submit(ledger_row("before"))
    assert writer.flush(timeout=10)
    remove_ledger_files(db_path)
    os.mkdir(db_path)
    try:
        writer.submit(ledger_row("r0"))
        assert wait_for(lambda: writer.write_errors >= 1)
        for i in range(1, 25):
            writer.submit(ledger_row(f"r{i}"))
        assert writer.queue_depth == 10
        assert writer.dropped_rows == 15
    finally:
        shutil.rmtree(db_path)
    assert writer.flush(timeout=10)
    assert stored_ids(db_path) == [f"r{i}" for i in range(15, 25)]
    assert len(messages(caplog, "dropping the oldest")) == 1


def test_stuck_when_rows_wait_too_long(make_writer, db_path):
    """stuck turns true when a row has waited past stuck_after_s, and false once written."""
    writer = make_writer(stuck_after_s=0.2)
    assert not writer.stuck
    remove_ledger_files(db_path)
    os.mkdir(db_path)
    try:
        writer.submit(ledger_row("r"))
        assert wait_for(lambda: writer.stuck, timeout=5)
    finally:
        shutil.rmtree(db_path)
    assert writer.flush(timeout=10)
    assert not writer.stuck


def test_close_gives_up_at_its_deadline(make_writer, db_path, caplog):
    """close() on a ledger that stays unwritable returns False after its timeout and says so."""
    writer = make_writer()
    remove_ledger_files(db_path)
    os.mkdir(db_path)
    try:
        for i in range(3):
            writer.submit(ledger_row(f"r{i}"))
        started = time.monotonic()
        assert writer.close(timeout=0.5) is False
        assert time.monotonic() - started < 5
        assert writer.dropped_rows == 3
        assert len(messages(caplog, "closing with 3 rows not written")) == 1
    finally:
        shutil.rmtree(db_path)


def test_a_row_the_database_refuses_is_dropped_and_the_rest_of_its_batch_lands(
    make_writer, db_path, caplog
):
    """SQLite refusing one row (RowRefused, a constraint) costs that row, not its batch,
    and never wedges the queue: retrying it would fail forever."""
    with Ledger(db_path) as ledger:
        ledger.db.execute(
            "CREATE TRIGGER refuse_bad BEFORE INSERT ON requests WHEN NEW.account = 'bad' "
            "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
        )
    writer = make_writer(max_delay_s=0.2, batch_size=10)
    for i in range(5):
        writer.submit(ledger_row(f"r{i}", account="bad" if i == 2 else "acme"))
    assert writer.flush(timeout=10)
    assert stored_ids(db_path) == ["r0", "r1", "r3", "r4"]
    assert writer.dropped_rows == 1
    assert writer.write_errors == 0
    assert "refused by a test trigger" in messages(caplog, "dropped row r2")[0]


def test_a_lock_keeps_the_connection_and_any_other_failure_reopens_it(make_writer, db_path):
    """Locked (LedgerBusy): the same connection retries; the file gone: it is reopened."""
    writer = make_writer(busy_timeout_s=0.05)
    opened = writer._ledger
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        writer.submit(ledger_row("locked"))
        assert wait_for(lambda: writer.write_errors >= 2)
        assert writer._ledger is opened
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer.flush(timeout=10)
    assert writer._ledger is opened
    remove_ledger_files(db_path)
    os.mkdir(db_path)
    try:
        writer.submit(ledger_row("gone"))
        assert wait_for(lambda: writer.write_errors >= 3)
        assert writer._ledger is not opened
    finally:
        shutil.rmtree(db_path)
    assert writer.flush(timeout=10)
    assert stored_ids(db_path) == ["gone"]
