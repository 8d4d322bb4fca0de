"""Driver errors in the store's words: each kind of SQLite failure, mapped once at the
boundary, with the driver's message unchanged and its exception as the cause."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from spendtap.store.budgets import Budgets
from spendtap.store.central import (
    CentralBusy,
    CentralCorrupt,
    CentralError,
    CentralStore,
    CentralUnwritable,
)
from spendtap.store.errors import (
    LedgerBusy,
    LedgerCorrupt,
    LedgerError,
    LedgerUnwritable,
    RowRefused,
    StorageError,
    storage_error,
)
from spendtap.store.keys import Keys
from spendtap.store.ledger import Ledger, LedgerProbe


def test_every_kind_is_a_storage_error_and_a_ledger_error():
    """Callers that caught LedgerError keep catching everything the store raises."""
    for kind in (LedgerBusy, LedgerUnwritable, LedgerCorrupt, RowRefused):
        assert issubclass(kind, StorageError)
    assert issubclass(StorageError, LedgerError)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (sqlite3.IntegrityError("UNIQUE constraint failed"), RowRefused),
        (sqlite3.DataError("string or blob too big"), RowRefused),
        (sqlite3.DatabaseError("file is not a database"), LedgerCorrupt),
        (sqlite3.OperationalError("no such table: requests"), StorageError),
        (sqlite3.ProgrammingError("Cannot operate on a closed database."), StorageError),
    ],
)
def test_sqlite_classes_map_to_kinds(error, kind):
    mapped = storage_error(error)
    assert type(mapped) is kind
    assert str(mapped) == str(error)
    assert mapped.__cause__ is error


@pytest.mark.parametrize(
    ("error", "kind", "central"),
    [
        (psycopg.errors.UniqueViolation("duplicate key"), RowRefused, CentralError),
        (psycopg.errors.LockNotAvailable("lock not available"), LedgerBusy, CentralBusy),
        (psycopg.errors.SerializationFailure("could not serialize"), LedgerBusy, CentralBusy),
        (psycopg.errors.DiskFull("no space left"), LedgerUnwritable, CentralUnwritable),
        (psycopg.errors.ReadOnlySqlTransaction("read-only"), LedgerUnwritable, CentralUnwritable),
        (psycopg.errors.DataCorrupted("invalid page"), LedgerCorrupt, CentralCorrupt),
        (psycopg.OperationalError("connection refused"), StorageError, CentralError),
    ],
)
def test_postgresql_sqlstates_map_to_kinds(error, kind, central):
    """PostgreSQL's errors by SQLSTATE; the central store names them as its own kind too."""
    mapped = storage_error(error)
    assert type(mapped) is kind and str(mapped) == str(error)
    store = CentralStore.__new__(CentralStore)  # _error needs only where the store is
    store.where = "postgresql://spendtap@db/spendtap"
    worded = store._error(error)
    assert type(worded) is central
    # A busy, unwritable or corrupt central store is that kind of ledger failure too.
    assert isinstance(worded, kind) or central is CentralError
    assert str(worded) == f"central store postgresql://spendtap@db/spendtap: {error}"


def test_not_a_driver_error_is_left_alone():
    assert storage_error(ValueError("x")) is None
    assert storage_error(OSError("x")) is None


def test_a_locked_ledger_is_busy(tmp_path):
    path = tmp_path / "ledger.db"
    with Budgets(path, busy_timeout_s=0.05) as budgets:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(LedgerBusy, match="locked") as raised:
                budgets.set("account", "acme", 100, None)
            assert raised.value.__cause__.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


def test_a_read_only_ledger_is_unwritable(tmp_path):
    """A read-only open refuses writes with SQLITE_READONLY: LedgerUnwritable, same words."""
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    with Keys(path, readonly=True) as keys, pytest.raises(LedgerUnwritable, match="readonly"):
        keys.add("acme", "k1", "sk-test-0123456789abcdef")


def test_a_file_overwritten_under_a_reader_is_corrupt(tmp_path):
    """A ledger replaced by junk after it was opened: the next read says corrupt."""
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    probe = LedgerProbe(path)
    try:
        path.write_bytes(b"this is not an SQLite database, only text" * 100)
        with pytest.raises(LedgerCorrupt, match=r"malformed|not a database"):
            probe.tables()
    finally:
        probe.close()


def test_rows_read_lazily_are_mapped_too(tmp_path):
    """``requests`` fetches rows as they are read: a failure then is the store's as well."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    ledger.insert_rows([{"id": f"r{i}", "ts": "2025-01-31T12:00:00Z"} for i in range(3)])
    rows = ledger.requests()
    ledger.db.conn.close()  # the connection goes while the rows are still unread
    with pytest.raises(StorageError, match="closed database"):
        list(rows)
