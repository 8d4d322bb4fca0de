"""The SQLite ledger: one row per proxied request, its schema, migrations and queries.

``Ledger(path)`` opens the file the proxy writes, creating and migrating it;
``Ledger.open_existing(path)`` opens it for reading and never creates a file.
``Ledger(db)`` also takes an open ``sqlite_utils.Database`` (an in-memory one in
tests) and migrates it on construction.

Migrations are an append-only list of functions (``m001_requests``, ...),
each applied once and recorded by name in ``_spendtap_migrations``. A shipped
migration is never edited: a change is a new function at the end of the list.
Other modules that keep tables in the same file can run their own list through
``run_migrations`` (with their own prefix, such as ``budget_m001_...``).

Exceptions (defined in ``spendtap.store.errors``, re-exported here)::

    LedgerError                  any ledger problem the caller should report
     +-- LedgerNotFound          a read-only open of a path that does not exist
     +-- NotALedger              the file is not SQLite, or is SQLite without
     |                           spendtap's migrations table (someone else's database)
     +-- StorageError            SQLite failed: LedgerBusy, LedgerUnwritable,
                                 LedgerCorrupt, RowRefused (never a bare sqlite3 error)

A corrupt or foreign file is an error, never silently replaced.

Usage semantics (see docs/usage-semantics.md): a token figure the server did not report is
NULL, never 0. In ``report()`` each token sum is NULL when no row of the group
reported that figure, and the sum of the reported figures otherwise (SQL ``SUM``
ignores NULL). ``total_tokens`` is prompt + completion over the rows that
reported either, NULL when none did.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import sqlite_utils

from spendtap.store import queries
from spendtap.store.errors import (
    LedgerBusy,
    LedgerCorrupt,
    LedgerError,
    LedgerNotFound,
    LedgerUnwritable,
    NotALedger,
    RowRefused,
    StorageError,
    boundary_class,
    mapped_errors,
    storage_boundary,
)
from spendtap.store.rows import (
    CLIENT_DISCONNECTED as CLIENT_DISCONNECTED,
)
from spendtap.store.rows import (
    COLUMNS as COLUMNS,
)
from spendtap.store.rows import (  # the row's vocabulary, re-exported
    COMPLETED as COMPLETED,
)
from spendtap.store.rows import (
    MAX_ERROR_LEN as MAX_ERROR_LEN,
)
from spendtap.store.rows import (
    MAX_TEXT_LEN as MAX_TEXT_LEN,
)
from spendtap.store.rows import (
    NANO as NANO,
)
from spendtap.store.rows import (
    OUTCOMES as OUTCOMES,
)
from spendtap.store.rows import (
    REAL_COLUMNS as REAL_COLUMNS,
)
from spendtap.store.rows import (
    REJECTED as REJECTED,
)
from spendtap.store.rows import (
    REPORT_BY as REPORT_BY,
)
from spendtap.store.rows import (
    REPORT_SORT as REPORT_SORT,
)
from spendtap.store.rows import (
    ROW_FIELDS as ROW_FIELDS,
)
from spendtap.store.rows import (
    SERVER_TIMING_COLUMNS as SERVER_TIMING_COLUMNS,
)
from spendtap.store.rows import (
    TEXT_COLUMNS as TEXT_COLUMNS,
)
from spendtap.store.rows import (
    TOKEN_COLUMNS as TOKEN_COLUMNS,
)
from spendtap.store.rows import (
    UPSTREAM_ERROR as UPSTREAM_ERROR,
)
from spendtap.store.rows import (
    USAGE_SOURCES as USAGE_SOURCES,
)
from spendtap.store.rows import (
    _row_out as _row_out,
)
from spendtap.store.rows import (
    normalize_row as normalize_row,
)
from spendtap.store.rows import (
    usd as usd,
)

__all__ = [
    "COLUMNS",
    "MIGRATIONS",
    "OUTCOMES",
    "REPORT_BY",
    "USAGE_SOURCES",
    "Ledger",
    "LedgerBusy",
    "LedgerCorrupt",
    "LedgerError",
    "LedgerNotFound",
    "LedgerProbe",
    "LedgerUnwritable",
    "NotALedger",
    "RowRefused",
    "StorageError",
    "normalize_row",
    "run_migrations",
]

MIGRATIONS_TABLE = "_spendtap_migrations"

# -- migrations (append-only: never edit a shipped one) -------------------------


def m001_requests(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            ts TEXT NOT NULL,
            account TEXT,
            key TEXT,
            model TEXT,
            node TEXT,
            api TEXT,
            method TEXT,
            path TEXT,
            streamed INTEGER,
            status INTEGER,
            outcome TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            cached_tokens INTEGER,
            cache_creation_tokens INTEGER,
            reasoning_tokens INTEGER,
            usage_source TEXT,
            ttft_s REAL,
            duration_s REAL,
            tokens_per_s REAL,
            error TEXT,
            response_bytes INTEGER
        )
        """
    )
    db.execute("CREATE INDEX idx_requests_ts ON requests (ts)")
    db.execute("CREATE INDEX idx_requests_account_ts ON requests (account, ts)")
    db.execute("CREATE INDEX idx_requests_key_ts ON requests (key, ts)")
    db.execute("CREATE INDEX idx_requests_model_ts ON requests (model, ts)")


def m002_budgets(db: sqlite_utils.Database) -> None:
    """Budgets, open reservations, and what keeps reserving cheap.

    ``budgets.spent_since`` is a running total of the tokens of the principal's
    rows with ``ts >= since``, kept by triggers on ``requests`` in the very
    transaction that inserts (or deletes) a row, so it equals the sum over the
    rows at every commit. A balance reads it instead of summing the principal's
    whole history inside the reserve transaction (which holds the write lock).

    The covering ``(principal, ts, prompt_tokens, completion_tokens)`` indexes
    let a rolling window sum its spend by an index-only range scan; they make
    the ``(account, ts)`` and ``(key, ts)`` indexes of m001 redundant (they are
    prefixes), so those are dropped.
    """
    db.execute(
        """
        CREATE TABLE budgets (
            scope TEXT NOT NULL CHECK (scope IN ('key', 'account')),
            principal TEXT NOT NULL,
            cap_tokens INTEGER NOT NULL CHECK (cap_tokens >= 0),
            window_s INTEGER CHECK (window_s IS NULL OR window_s > 0),
            since TEXT NOT NULL,
            spent_since INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (scope, principal)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE reservations (
            id TEXT PRIMARY KEY,
            account TEXT,
            key TEXT,
            tokens INTEGER NOT NULL CHECK (tokens >= 0),
            created_at TEXT NOT NULL,
            owner TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX idx_reservations_account ON reservations (account)")
    db.execute("CREATE INDEX idx_reservations_key ON reservations (key)")
    db.execute("DROP INDEX IF EXISTS idx_requests_account_ts")
    db.execute("DROP INDEX IF EXISTS idx_requests_key_ts")
    db.execute(
        "CREATE INDEX idx_requests_account_ts_spend "
        "ON requests (account, ts, prompt_tokens, completion_tokens)"
    )
    db.execute(
        "CREATE INDEX idx_requests_key_ts_spend "
        "ON requests (key, ts, prompt_tokens, completion_tokens)"
    )
    tokens = "(coalesce({r}.prompt_tokens, 0) + coalesce({r}.completion_tokens, 0))"
    matches = (
        "((scope = 'key' AND principal = {r}.key) "
        "OR (scope = 'account' AND principal = {r}.account)) AND {r}.ts >= since"
    )
    for name, event, sign, ref in (
        ("insert", "INSERT", "+", "NEW"),
        ("delete", "DELETE", "-", "OLD"),
    ):
        db.execute(
            f"""
            CREATE TRIGGER requests_budget_spend_{name} AFTER {event} ON requests
            WHEN {tokens.format(r=ref)} != 0
            BEGIN
                UPDATE budgets SET spent_since = spent_since {sign} {tokens.format(r=ref)}
                WHERE {matches.format(r=ref)};
            END
            """
        )
    db.execute(
        f"""
        CREATE TRIGGER requests_budget_spend_update
        AFTER UPDATE OF ts, account, key, prompt_tokens, completion_tokens ON requests
        BEGIN
            UPDATE budgets SET spent_since = spent_since - {tokens.format(r="OLD")}
            WHERE {matches.format(r="OLD")};
            UPDATE budgets SET spent_since = spent_since + {tokens.format(r="NEW")}
            WHERE {matches.format(r="NEW")};
        END
        """
    )


def m003_api_keys(db: sqlite_utils.Database) -> None:
    """Bearer keys: only a SHA-256 fingerprint and a short non-secret prefix are kept."""
    db.execute(
        """
        CREATE TABLE api_keys (
            fingerprint TEXT PRIMARY KEY,
            prefix TEXT NOT NULL,
            account TEXT NOT NULL,
            key_id TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        )
        """
    )
    db.execute("CREATE INDEX idx_api_keys_key_id ON api_keys (key_id)")


def m004_costs(db: sqlite_utils.Database) -> None:
    """What each request cost: whole nano-dollars (exact sums) and where the price came
    from (``file:<path>``, ``catalogue:<version>`` or ``none``). Old rows stay NULL until
    ``spendtap reprice``."""
    db.execute("ALTER TABLE requests ADD COLUMN cost_nusd INTEGER")
    db.execute("ALTER TABLE requests ADD COLUMN price_source TEXT")


def m005_money_budgets(db: sqlite_utils.Database) -> None:
    """Budgets in dollars beside the token budgets: the same shape, in whole nano-dollars.

    ``money_budgets.spent_since`` is kept by triggers on ``requests.cost_nusd`` exactly
    as ``budgets.spent_since`` is on tokens (insert, delete, and an update such as
    ``spendtap reprice``). A reservation holds its dollars in ``reservations.nusd``
    beside its tokens; a principal may have a token cap and a money cap, and both hold.
    """
    db.execute(
        """
        CREATE TABLE money_budgets (
            scope TEXT NOT NULL CHECK (scope IN ('key', 'account')),
            principal TEXT NOT NULL,
            cap_nusd INTEGER NOT NULL CHECK (cap_nusd >= 0),
            window_s INTEGER CHECK (window_s IS NULL OR window_s > 0),
            since TEXT NOT NULL,
            spent_since INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (scope, principal)
        )
        """
    )
    db.execute(
        "ALTER TABLE reservations ADD COLUMN nusd INTEGER NOT NULL DEFAULT 0 CHECK (nusd >= 0)"
    )
    db.execute("CREATE INDEX idx_requests_account_ts_cost ON requests (account, ts, cost_nusd)")
    db.execute("CREATE INDEX idx_requests_key_ts_cost ON requests (key, ts, cost_nusd)")
    cost = "coalesce({r}.cost_nusd, 0)"
    matches = (
        "((scope = 'key' AND principal = {r}.key) "
        "OR (scope = 'account' AND principal = {r}.account)) AND {r}.ts >= since"
    )
    for name, event, sign, ref in (
        ("insert", "INSERT", "+", "NEW"),
        ("delete", "DELETE", "-", "OLD"),
    ):
        db.execute(
            f"""
            CREATE TRIGGER requests_money_spend_{name} AFTER {event} ON requests
            WHEN {cost.format(r=ref)} != 0
            BEGIN
                UPDATE money_budgets SET spent_since = spent_since {sign} {cost.format(r=ref)}
                WHERE {matches.format(r=ref)};
            END
            """
        )
    db.execute(
        f"""
        CREATE TRIGGER requests_money_spend_update
        AFTER UPDATE OF ts, account, key, cost_nusd ON requests
        BEGIN
            UPDATE money_budgets SET spent_since = spent_since - {cost.format(r="OLD")}
            WHERE {matches.format(r="OLD")};
            UPDATE money_budgets SET spent_since = spent_since + {cost.format(r="NEW")}
            WHERE {matches.format(r="NEW")};
        END
        """
    )


def m006_server_timing(db: sqlite_utils.Database) -> None:
    """The server's own prompt-evaluation and decode durations (seconds), when it reports
    them (Ollama, llama.cpp); NULL otherwise and on older rows."""
    db.execute("ALTER TABLE requests ADD COLUMN server_prompt_s REAL")
    db.execute("ALTER TABLE requests ADD COLUMN server_decode_s REAL")


def m007_settle_trigger(db: sqlite_utils.Database) -> None:
    """Settle by trigger: the row that lands deletes its own reservation.

    Before, ``insert_rows`` ran a ``DELETE FROM reservations`` beside each INSERT,
    inside ``BEGIN IMMEDIATE`` ... ``COMMIT``: four statements per batch. The ledger
    writer's thread gives up the GIL around every SQLite step and must win it back
    from the busy event loop each time, which cost the proxy more CPU than the
    writes themselves (issue 12); with the trigger a batch is one INSERT, its own
    transaction, and the reservation still goes in the same commit as the row.
    """
    db.execute(
        """
        CREATE TRIGGER requests_settle_reservation AFTER INSERT ON requests
        BEGIN
            DELETE FROM reservations WHERE id = NEW.id;
        END
        """
    )


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    m001_requests,
    m002_budgets,
    m003_api_keys,
    m004_costs,
    m005_money_budgets,
    m006_server_timing,
    m007_settle_trigger,
]


def _user_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return [r[0] for r in rows]


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back
    when it raises (the write lock is taken at the start, so reads inside see what the
    writes will change)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def run_migrations(
    db: sqlite_utils.Database,
    migrations: Sequence[Callable[[sqlite_utils.Database], None]],
    *,
    adopt_foreign: bool = False,
) -> list[str]:
    """Apply the migrations not yet recorded, in order, in one transaction.

    Returns the names applied. Concurrent processes are safe: the transaction is
    ``BEGIN IMMEDIATE`` and the record is re-read inside it. A database that has
    tables but no ``_spendtap_migrations`` table raises ``NotALedger`` (it is
    someone else's), unless ``adopt_foreign``.
    """
    conn = db.conn
    if conn.in_transaction:
        raise LedgerError("cannot migrate inside an open transaction")
    with transaction(conn):
        tables = _user_tables(conn)
        if MIGRATIONS_TABLE not in tables:
            if tables and not adopt_foreign:
                raise NotALedger(
                    "an SQLite database without spendtap's migrations table "
                    f"(it has tables: {', '.join(sorted(tables)[:5])})"
                )
            conn.execute(
                f"CREATE TABLE {MIGRATIONS_TABLE} (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
        done = {r[0] for r in conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")}
        applied = []
        for migration in migrations:
            name = migration.__name__
            if name in done:
                continue
            migration(db)
            conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) "
                "VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                (name,),
            )
            applied.append(name)
    return applied


# -- rows -----------------------------------------------------------------------


_ROW_VALUES = "(" + ", ".join("?" * len(COLUMNS)) + ")"
_MAX_ROWS_PER_STATEMENT = 128


@functools.lru_cache(maxsize=_MAX_ROWS_PER_STATEMENT)
def _insert_sql(n: int) -> str:
    """INSERT OR IGNORE of ``n`` rows (positional values, ``COLUMNS`` order)."""
    return f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)}) VALUES " + ", ".join(
        [_ROW_VALUES] * n
    )


def _rows_per_statement(conn: sqlite3.Connection) -> int:
    """Rows per multi-row statement, within this SQLite's limit on bound values."""
    try:
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    except (AttributeError, sqlite3.Error):
        limit = 999  # the oldest SQLite default
    return max(1, min(_MAX_ROWS_PER_STATEMENT, limit // len(COLUMNS)))


# -- the ledger -------------------------------------------------------------------


def _connect(path: Path, *, create: bool, busy_timeout_s: float) -> sqlite3.Connection:
    if path.is_dir():
        raise NotALedger(f"{path} is a directory, not a spendtap ledger")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        create_private(path)
        return sqlite3.connect(path, timeout=busy_timeout_s)
    # mode=rw opens an existing file (read-only if the OS says so) and never creates one.
    uri = "file:" + _uri_path(path) + "?mode=rw"
    try:
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout_s)
    except sqlite3.OperationalError:
        if not path.exists():
            raise LedgerNotFound(f"ledger not found: {path}") from None
        raise


def readonly_reason(path: str | os.PathLike[str]) -> str | None:
    """Why the ledger at ``path`` cannot be written from here, or None when it can.

    Checks the file system (a read-only mount) and this user's permission on the
    file; for a ledger that does not exist yet, on the nearest existing directory.
    """
    p = Path(path).absolute()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        return None
    if existing == p and not os.access(p, os.W_OK):
        return "the file is not writable by this user"
    if existing != p and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


@storage_boundary
def connect_readonly(
    path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0, check_same_thread: bool = True
) -> tuple[sqlite3.Connection, str | None]:
    """A read-only connection to an existing ledger file; never creates or changes a file.

    ``mode=ro`` reads the ledger with its WAL (its recent rows) where SQLite can
    keep the ``-shm`` index beside it. Where the directory cannot hold a ``-shm``
    (a read-only mount, a backup copy in a directory this user cannot write),
    the file is read as an immutable snapshot instead; rows still in a ``-wal``
    file there are then not seen. Returns the connection and, for a snapshot
    that misses rows of a WAL, a one-line note saying so (else None).
    """
    p = Path(path)
    if not p.exists():
        raise LedgerNotFound(f"ledger not found: {p}")
    if p.is_dir():
        raise NotALedger(f"{p} is a directory, not a spendtap ledger")
    base = "file:" + _uri_path(p) + "?mode=ro"
    con = sqlite3.connect(
        base, uri=True, timeout=busy_timeout_s, check_same_thread=check_same_thread
    )
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return con, None
    except sqlite3.OperationalError as e:
        con.close()
        shm = p.with_name(p.name + "-shm")
        if shm.exists() or readonly_reason(p.parent) is None:
            raise LedgerError(f"cannot open the ledger {p}: {e}") from None
    except sqlite3.DatabaseError as e:
        con.close()
        raise NotALedger(f"{p} is not a spendtap ledger: {e}") from None
    note = None
    wal = p.with_name(p.name + "-wal")
    with contextlib.suppress(OSError):
        if wal.stat().st_size > 0:
            note = (
                f"{p} is read as a snapshot (its directory cannot hold SQLite's -shm file): "
                f"the rows still in {wal.name} are not included"
            )
    con = sqlite3.connect(
        base + "&immutable=1", uri=True, timeout=busy_timeout_s, check_same_thread=check_same_thread
    )
    return con, note


class Closing:
    """A store used as ``with Store(...) as store:``, closed when the block ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@boundary_class
class LedgerProbe(Closing):
    """What ``spendtap doctor`` reads of a ledger file, read-only (``connect_readonly``).

    Each read is its own method so a caller can tell which step failed: a file that is
    not SQLite fails at ``tables`` with ``LedgerCorrupt``. ``note`` is the snapshot note
    of ``connect_readonly``.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0):
        self._con, self.note = connect_readonly(path, busy_timeout_s=busy_timeout_s)

    def close(self) -> None:
        self._con.close()

    def tables(self) -> set[str]:
        """Every table's name (reading the schema is what detects a file that is not SQLite)."""
        return {
            r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }

    def applied_migrations(self) -> set[str]:
        return {r[0] for r in self._con.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")}

    def last_row(self) -> tuple[str | None, int]:
        """The ``ts`` of the newest row (None when there is none) and the number of rows."""
        return self._con.execute("SELECT max(ts), count(*) FROM requests").fetchone()

    def open_reservations(self) -> tuple[int, str | None]:
        """How many reservations are open, and when the oldest was made."""
        return self._con.execute("SELECT count(*), min(created_at) FROM reservations").fetchone()


PRIVATE_FILE_MODE = 0o600


def create_private(path: str | os.PathLike[str]) -> None:
    """Create ``path`` readable by its owner only, whatever the umask; leave an existing
    file as it is.

    Ledgers and access logs hold who spent what. SQLite gives a database's ``-wal``
    and ``-shm`` files the database file's own mode, so creating the file private
    keeps all three private.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # the umask cannot widen what open() narrowed
    finally:
        os.close(fd)


def _uri_path(path: Path) -> str:
    from urllib.parse import quote

    return quote(str(path.absolute()), safe="/")


def store_connection(
    path: Path, *, busy_timeout_s: float, create: bool, readonly: bool
) -> sqlite3.Connection:
    """The connection of a store that keeps its tables in the ledger (budgets, keys).

    The ledger is opened first, which creates and migrates it (``create``), or checks
    that it exists and is a ledger; the store then keeps a plain autocommit connection
    of its own, so every transaction it makes is explicit (``transaction``) and it may
    be shared between threads behind the store's lock. ``readonly`` opens a read-only
    one that works on a read-only mount or a backup copy.
    """
    if readonly:
        Ledger.open_existing(path, busy_timeout_s=busy_timeout_s, readonly=True).close()
        conn, _note = connect_readonly(path, busy_timeout_s=busy_timeout_s, check_same_thread=False)
        conn.isolation_level = None
        return conn
    opener = Ledger if create else Ledger.open_existing
    opener(path, busy_timeout_s=busy_timeout_s).close()
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class LedgerTables(Closing):
    """A store that keeps its tables in the ledger file (``Budgets``, ``Keys``): one
    connection of its own (``store_connection``) behind a lock, so threads may share it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 5.0,
        create: bool = True,
        readonly: bool = False,
    ):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn = store_connection(
            self.path, busy_timeout_s=busy_timeout_s, create=create, readonly=readonly
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction under the lock (``transaction``)."""
        with self._lock, transaction(self._conn) as conn:
            yield conn


@boundary_class
class Ledger(queries.LedgerReads, Closing):
    """The request ledger in one SQLite database (a file or an open ``Database``).

    ``Ledger(path)`` creates the file if needed (and its directory), sets WAL
    journaling, ``synchronous=NORMAL`` and a busy timeout, and applies pending
    migrations. A connection belongs to the thread that opened it.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | sqlite_utils.Database,
        *,
        busy_timeout_s: float = 5.0,
        _create: bool = True,
        _readonly: bool = False,
    ):
        self.busy_timeout_s = busy_timeout_s
        self.readonly = _readonly
        # For a read-only snapshot that cannot see the rows of a WAL: what to tell the user.
        self.note: str | None = None
        if isinstance(db, sqlite_utils.Database):
            self.path: Path | None = None
            self.db = db
        else:
            self.path = Path(db)
            if _readonly:
                conn, self.note = connect_readonly(self.path, busy_timeout_s=busy_timeout_s)
            else:
                conn = _connect(self.path, create=_create, busy_timeout_s=busy_timeout_s)
            try:
                self.db = sqlite_utils.Database(conn, execute_plugins=False)
            except BaseException:
                conn.close()
                raise
        try:
            self._setup(create=_create)
        except BaseException:
            if self.path is not None:
                self.db.close()
            raise

    @classmethod
    def open_existing(
        cls, path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0, readonly: bool = False
    ) -> Ledger:
        """Open an existing ledger file; never creates a file.

        ``readonly`` opens it read-only (``connect_readonly``): it works on a
        read-only mount or a backup copy, and never migrates. Raises
        ``LedgerNotFound`` if there is no such file and ``NotALedger`` if it is
        not a spendtap ledger.
        """
        p = Path(path)
        if not p.exists() and not p.is_symlink():
            raise LedgerNotFound(f"ledger not found: {p}")
        return cls(p, busy_timeout_s=busy_timeout_s, _create=False, _readonly=readonly)

    def _setup(self, *, create: bool) -> None:
        conn = self.db.conn
        where = str(self.path) if self.path is not None else "the database"
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            # Reading the schema is what detects a file that is not SQLite at all.
            tables = _user_tables(conn)
            if MIGRATIONS_TABLE not in tables and (tables or not create):
                # Someone else's database (or, for a reader, an empty one): never adopt it.
                what = (
                    "an SQLite database without spendtap's migrations table"
                    if tables
                    else "an empty database"
                )
                raise NotALedger(f"{where} is not a spendtap ledger ({what})")
            if create and not self.db.memory and self.db.journal_mode != "wal":
                self.db.enable_wal()
            if self.readonly:
                return  # never migrates; a query on a missing table says so
            conn.execute("PRAGMA synchronous = NORMAL")
            if create or self._pending_migrations():
                run_migrations(self.db, MIGRATIONS)
        except NotALedger as e:
            if str(e).startswith(where):
                raise
            raise NotALedger(f"{where} is not a spendtap ledger: {e}") from None
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError):
                # Worded here, whatever it was (locked, read-only, I/O): callers show it
                # as it is, where a bare StorageError is the driver's words alone.
                raise LedgerError(f"cannot open the ledger {where}: {e}") from e
            raise NotALedger(f"{where} is not a spendtap ledger: {e}") from e

    def _pending_migrations(self) -> bool:
        done = {r[0] for r in self.db.conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")}
        return any(m.__name__ not in done for m in MIGRATIONS)

    def close(self) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"<Ledger {self.path or 'in-memory'}>"

    # -- writing ------------------------------------------------------------------

    def insert_rows(self, rows: Sequence[Mapping[str, Any]], *, normalized: bool = False) -> int:
        """Insert rows in one transaction; a row whose id is already stored is ignored.

        ``normalized=True`` says the rows already went through ``normalize_row``
        (the writer checks each row when it is submitted), so it is not done twice.

        The same transaction settles each row's budget reservation (the
        reservation whose id is the row's id is deleted, and the triggers of
        ``m002_budgets`` add the row's tokens to its principals' budgets).

        Every row is validated first (``normalize_row``), so a bad row raises
        ``ValueError``/``TypeError`` before anything is written. Returns the number
        of rows actually inserted. ``LedgerBusy``/``LedgerUnwritable`` (locked,
        read-only, disk full) and ``RowRefused`` propagate with nothing written.
        """
        prepared = list(rows) if normalized else [normalize_row(r) for r in rows]
        if not prepared:
            return 0
        # Many rows per statement: sqlite3 releases the GIL around every step it takes
        # (each row of an executemany), and the writer thread must win the GIL back after
        # each one from a busy event loop (up to the 5 ms switch interval each time). One
        # multi-row INSERT per group of rows (the trigger of m007 settles) takes one GIL
        # hand-off per group instead of two per row.
        conn = self.db.conn
        per = _rows_per_statement(conn)
        if len(prepared) <= per and conn.isolation_level is None:
            # One statement is its own transaction (the writer's connection is in
            # autocommit mode): one SQLite step, one GIL hand-off, for the batch.
            return self._insert_group(conn, prepared)
        inserted = 0
        with transaction(conn):
            for i in range(0, len(prepared), per):
                inserted += self._insert_group(conn, prepared[i : i + per])
        return inserted

    @staticmethod
    def _insert_group(conn: sqlite3.Connection, group: Sequence[Mapping[str, Any]]) -> int:
        values = [r[c] for r in group for c in COLUMNS]
        # rowcount counts the rows inserted, not the triggers' budget updates. The
        # settle trigger (m007) deletes each row's reservation in the same statement.
        return conn.execute(_insert_sql(len(group)), values).rowcount

    # -- reading (``queries.LedgerReads``: the same methods as the central store's) --

    dialect = queries.SQLITE

    def _rows(self, sql: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor = self.db.conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return (dict(zip(names, r, strict=True)) for r in cursor)

    def set_costs(self, updates: Sequence[tuple[str, int | None, str | None]]) -> int:
        """Store ``(id, cost_nusd, price_source)`` for existing rows, in one transaction;
        returns how many rows changed (a row already holding those values is untouched)."""
        if not updates:
            return 0
        with transaction(self.db.conn) as conn:
            return conn.executemany(
                "UPDATE requests SET cost_nusd = ?, price_source = ? WHERE id = ? "
                "AND (cost_nusd IS NOT ? OR price_source IS NOT ?)",
                [(c, src, rid, c, src) for rid, c, src in updates],
            ).rowcount

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside the block see one state of the ledger (a read transaction)."""
        conn = self.db.conn
        with mapped_errors():  # a context manager: the class decorator cannot reach it
            conn.execute("BEGIN")
        try:
            yield
        finally:
            with mapped_errors():
                conn.execute("COMMIT")

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to this ledger
        (``PRAGMA data_version``: read from the WAL index, no table is touched)."""
        return self.db.conn.execute("PRAGMA data_version").fetchone()[0]

    def last_rowid(self) -> int:
        """The rowid of the last row inserted (0 for an empty ledger): where ``tail`` starts."""
        return self.db.conn.execute("SELECT coalesce(max(rowid), 0) FROM requests").fetchone()[0]
