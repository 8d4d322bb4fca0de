"""The store's exceptions, and the one place that turns a driver's errors into them.

Callers above the storage boundary (the CLI, the writer thread, the proxy) catch
these and never a database driver's own exceptions, so they import no driver and
a backend can change its driver without edits outside ``spendtap.store``::

    LedgerError                  any ledger problem the caller should report
     +-- LedgerNotFound          a read-only open of a path that does not exist
     +-- NotALedger              the file is not SQLite, or is SQLite without
     |                           spendtap's migrations table (someone else's database)
     +-- StorageError            the database itself failed (a driver error, mapped)
          +-- LedgerBusy         locked or busy past the busy timeout: try again later
          +-- LedgerUnwritable   full disk, read-only file or mount, I/O error, cannot open
          +-- LedgerCorrupt      not a database, or a malformed one
          +-- RowRefused         the database refused a row's values (a constraint, a
                                 value it cannot store): retrying the same row fails again

A mapped error's message is the driver's own (``str(e)`` is unchanged, so every
line a user sees stays the same) and its ``__cause__`` is the driver's exception.

This module imports sqlite3 (the standard library's) but not psycopg: a PostgreSQL
error is recognised by its module and SQLSTATE. It imports neither click nor mitmproxy.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "LedgerBusy",
    "LedgerCorrupt",
    "LedgerError",
    "LedgerNotFound",
    "LedgerUnwritable",
    "NotALedger",
    "RowRefused",
    "StorageError",
    "boundary_class",
    "mapped_errors",
    "storage_boundary",
    "storage_error",
]


class LedgerError(Exception):
    """A ledger problem the caller should report (the base of the store's errors)."""


class LedgerNotFound(LedgerError):
    """A ledger opened for reading does not exist (reading never creates one)."""


class NotALedger(LedgerError):
    """The file is not SQLite, or is SQLite without spendtap's migrations table."""


class StorageError(LedgerError):
    """The database failed; the message is the driver's, the cause its exception."""


class LedgerBusy(StorageError):
    """Locked or busy past the busy timeout: the same call may succeed later."""


class LedgerUnwritable(StorageError):
    """The disk is full, the file or mount read-only, the file cannot be opened or read."""


class LedgerCorrupt(StorageError):
    """Not a database, or a malformed one."""


class RowRefused(StorageError):
    """The database refused the values of a row: writing the same row again fails again."""


# SQLite's primary result codes (the part of an extended name such as
# ``SQLITE_IOERR_SHORT_READ`` before its second underscore).
_SQLITE_KINDS: dict[str, type[StorageError]] = {
    "SQLITE_BUSY": LedgerBusy,
    "SQLITE_LOCKED": LedgerBusy,
    "SQLITE_FULL": LedgerUnwritable,
    "SQLITE_READONLY": LedgerUnwritable,
    "SQLITE_IOERR": LedgerUnwritable,
    "SQLITE_CANTOPEN": LedgerUnwritable,
    "SQLITE_PERM": LedgerUnwritable,
    "SQLITE_CORRUPT": LedgerCorrupt,
    "SQLITE_NOTADB": LedgerCorrupt,
}


def _sqlite_kind(e: sqlite3.Error) -> type[StorageError]:
    # Refusals of a row's values come as these classes whatever the result code.
    if isinstance(e, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError):
        return RowRefused
    name = getattr(e, "sqlite_errorname", None) or ""
    kind = _SQLITE_KINDS.get("_".join(name.split("_")[:2]))
    if kind is not None:
        return kind
    # sqlite3 raises a bare DatabaseError for what it cannot read as a database; an
    # OperationalError without a known code (no such table, ...) is a plain failure.
    if type(e) is sqlite3.DatabaseError:
        return LedgerCorrupt
    return StorageError


def _driver_kind(e: BaseException) -> type[StorageError] | None:
    """The store's class for a driver's exception, None for anything else."""
    if isinstance(e, sqlite3.Error):
        return _sqlite_kind(e)
    module = type(e).__module__
    if module.startswith("psycopg"):
        # The central store names its own failures (``CentralError``); what reaches a
        # boundary unmapped is a refusal of values (IntegrityError) or a plain failure.
        sqlstate = getattr(e, "sqlstate", None) or ""
        if sqlstate.startswith("23"):  # integrity constraint violation
            return RowRefused
        if sqlstate in ("55P03", "40001", "40P01"):  # lock not available, serialization
            return LedgerBusy
        if sqlstate.startswith("53") or sqlstate == "25006":  # resources, read-only
            return LedgerUnwritable
        if sqlstate.startswith("XX"):  # internal error: data corrupted, index corrupted
            return LedgerCorrupt
        return StorageError
    return None


def storage_error(e: BaseException) -> StorageError | None:
    """The store's exception for a driver's ``e`` (same message), None if ``e`` is not one."""
    kind = _driver_kind(e)
    if kind is None:
        return None
    mapped = kind(str(e))
    mapped.__cause__ = e
    return mapped


@contextlib.contextmanager
def mapped_errors() -> Iterator[None]:
    """Raise a driver's exception from the block as the store's own (``storage_error``)."""
    try:
        yield
    except Exception as e:
        mapped = storage_error(e)
        if mapped is None:
            raise
        raise mapped from e


def storage_boundary[F: Callable[..., Any]](func: F) -> F:
    """Map driver errors raised by ``func``, or by the iterator it returns, at the boundary.

    A method that returns a lazy iterator (``Ledger.requests``) runs its query when
    called and fetches rows as they are read: both are wrapped.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with mapped_errors():
            result = func(*args, **kwargs)
        if inspect.isgenerator(result):
            return _mapped_iter(result)
        return result

    wrapper._storage_boundary = True  # type: ignore[attr-defined]  # never wrapped twice
    return wrapper  # type: ignore[return-value]


def _mapped_iter(rows: Iterator[Any]) -> Iterator[Any]:
    with mapped_errors():
        yield from rows


def boundary_class(cls: type) -> type:
    """``storage_boundary`` on the constructor and every public method of ``cls``, its
    inherited ones included (``LedgerReads``: the same methods on two stores)."""
    seen: set[str] = set()
    for klass in cls.__mro__[:-1]:  # not object's
        for name, value in vars(klass).items():
            if name in seen or (name.startswith("_") and name != "__init__"):
                continue
            seen.add(name)
            if isinstance(value, classmethod | staticmethod):
                func = value.__func__
                if not getattr(func, "_storage_boundary", False):
                    setattr(cls, name, type(value)(storage_boundary(func)))
            elif inspect.isfunction(value) and not getattr(value, "_storage_boundary", False):
                setattr(cls, name, storage_boundary(value))
    return cls
