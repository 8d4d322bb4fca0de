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

Exceptions::

    LedgerError                  any ledger problem the caller should report
     +-- LedgerNotFound          a read-only open of a path that does not exist
     +-- NotALedger              the file is not SQLite, or is SQLite without
                                 spendtap's migrations table (someone else's database)

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
import math
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import sqlite_utils

from spendtap.timeparse import normalize_ts

__all__ = [
    "COLUMNS",
    "MIGRATIONS",
    "OUTCOMES",
    "REPORT_BY",
    "USAGE_SOURCES",
    "Ledger",
    "LedgerError",
    "LedgerNotFound",
    "NotALedger",
    "normalize_row",
    "run_migrations",
]

MIGRATIONS_TABLE = "_spendtap_migrations"

COMPLETED = "completed"
CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_ERROR = "upstream_error"
REJECTED = "rejected"
OUTCOMES = (COMPLETED, CLIENT_DISCONNECTED, UPSTREAM_ERROR, REJECTED)
USAGE_SOURCES = ("reported", "estimated", "none")
REPORT_BY = (
    "account", "key", "model", "node", "api", "path", "outcome", "price_source", "day", "hour",
)  # fmt: skip
REPORT_SORT = ("tokens", "cost", "requests")

TEXT_COLUMNS = ("account", "key", "model", "node", "api", "method", "path")
TOKEN_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
)
REAL_COLUMNS = ("ttft_s", "duration_s", "tokens_per_s")
# The server's own timing of the request, when it reports one (Ollama's nanosecond
# durations, llama.cpp's ``timings``): prompt evaluation and decoding, in seconds.
SERVER_TIMING_COLUMNS = ("server_prompt_s", "server_decode_s")

# Every column of ``requests``, in table order: the keys of a row dict.
COLUMNS = (
    "id",
    "ts",
    *TEXT_COLUMNS,
    "streamed",
    "status",
    "outcome",
    *TOKEN_COLUMNS,
    "usage_source",
    *REAL_COLUMNS,
    "error",
    "response_bytes",
    "cost_nusd",
    "price_source",
    *SERVER_TIMING_COLUMNS,
)
# What readers see of a row: the cost in dollars (a Decimal, exact) instead of the
# stored integer nano-dollars.
ROW_FIELDS = tuple("cost_usd" if c == "cost_nusd" else c for c in COLUMNS)

MAX_ERROR_LEN = 200
MAX_TEXT_LEN = 512


class LedgerError(Exception):
    """A ledger problem the caller should report (the base of this module's errors)."""


class LedgerNotFound(LedgerError):
    """A ledger opened for reading does not exist (reading never creates one)."""


class NotALedger(LedgerError):
    """The file is not SQLite, or is SQLite without spendtap's migrations table."""


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


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    m001_requests,
    m002_budgets,
    m003_api_keys,
    m004_costs,
    m005_money_budgets,
    m006_server_timing,
]


def _user_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return [r[0] for r in rows]


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
    conn.execute("BEGIN IMMEDIATE")
    try:
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
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return applied


# -- rows -----------------------------------------------------------------------


def _text(name: str, value: Any, limit: int = MAX_TEXT_LEN) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be text or None, not {type(value).__name__}")
    return value[:limit]


def _int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer or None, not {type(value).__name__}")
    return value


def _real(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number or None, not {type(value).__name__}")
    value = float(value)
    return value if math.isfinite(value) else None


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one request row and return it with exactly ``COLUMNS`` as keys.

    Missing columns are NULL (``id`` and ``ts`` are required). ``ts`` may be
    ledger text, any ISO 8601 text, a ``datetime`` or a Unix time. ``error`` is
    cut to its first line and 200 characters. Raises ``ValueError`` or
    ``TypeError`` on an unknown column or a value of the wrong type.
    """
    unknown = set(row) - set(COLUMNS) - {"cost_usd"}  # cost_usd: derived, as read
    if unknown:
        raise ValueError(f"unknown ledger column(s): {', '.join(sorted(unknown))}")
    rid = row.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError("a ledger row needs a non-empty text id")
    if row.get("ts") is None:
        raise ValueError("a ledger row needs a ts")
    out: dict[str, Any] = {"id": rid[:MAX_TEXT_LEN], "ts": normalize_ts(row["ts"])}
    for name in TEXT_COLUMNS:
        out[name] = _text(name, row.get(name))
    streamed = row.get("streamed")
    if streamed is not None and not isinstance(streamed, bool | int):
        raise TypeError(f"streamed must be a bool or None, not {type(streamed).__name__}")
    out["streamed"] = None if streamed is None else int(bool(streamed))
    out["status"] = _int("status", row.get("status"))
    outcome = row.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    out["outcome"] = outcome
    for name in TOKEN_COLUMNS:
        out[name] = _int(name, row.get(name))
    source = row.get("usage_source")
    if source is not None and source not in USAGE_SOURCES:
        raise ValueError(f"usage_source must be one of {', '.join(USAGE_SOURCES)}, not {source!r}")
    out["usage_source"] = source
    for name in REAL_COLUMNS:
        out[name] = _real(name, row.get(name))
    error = _text("error", row.get("error"), limit=10 * MAX_ERROR_LEN)
    if error is not None:
        lines = error.strip().splitlines()
        error = lines[0][:MAX_ERROR_LEN] if lines else ""
    out["error"] = error
    out["response_bytes"] = _int("response_bytes", row.get("response_bytes"))
    cost = _int("cost_nusd", row.get("cost_nusd"))
    if cost is not None and cost < 0:
        raise ValueError(f"cost_nusd must be zero or more, not {cost}")
    out["cost_nusd"] = cost
    out["price_source"] = _text("price_source", row.get("price_source"))
    for name in SERVER_TIMING_COLUMNS:
        out[name] = _real(name, row.get(name))
    return out


_ROW_VALUES = "(" + ", ".join("?" * len(COLUMNS)) + ")"
_MAX_ROWS_PER_STATEMENT = 128


@functools.lru_cache(maxsize=_MAX_ROWS_PER_STATEMENT)
def _insert_sql(n: int) -> str:
    """INSERT OR IGNORE of ``n`` rows (positional values, ``COLUMNS`` order)."""
    return f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)}) VALUES " + ", ".join(
        [_ROW_VALUES] * n
    )


@functools.lru_cache(maxsize=_MAX_ROWS_PER_STATEMENT)
def _settle_sql(n: int) -> str:
    """Delete the reservations of ``n`` rows (their ids)."""
    return f"DELETE FROM reservations WHERE id IN ({', '.join('?' * n)})"


def _rows_per_statement(conn: sqlite3.Connection) -> int:
    """Rows per multi-row statement, within this SQLite's limit on bound values."""
    try:
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    except (AttributeError, sqlite3.Error):
        limit = 999  # the oldest SQLite default
    return max(1, min(_MAX_ROWS_PER_STATEMENT, limit // len(COLUMNS)))


NANO = Decimal("1e-9")


def usd(nusd: int | float | None) -> Decimal | None:
    """Stored nano-dollars as exact dollars (9 decimal places; an average rounds half-even)."""
    if nusd is None:
        return None
    return (Decimal(nusd) / 10**9).quantize(NANO, rounding=ROUND_HALF_EVEN)


def _row_out(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("streamed") is not None:
        row["streamed"] = bool(row["streamed"])
    if "cost_nusd" in row:
        row["cost_usd"] = usd(row["cost_nusd"])
    return row


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


class Ledger:
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
                raise LedgerError(f"cannot open the ledger {where}: {e}") from e
            raise NotALedger(f"{where} is not a spendtap ledger: {e}") from e

    def _pending_migrations(self) -> bool:
        done = {r[0] for r in self.db.conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")}
        return any(m.__name__ not in done for m in MIGRATIONS)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        of rows actually inserted. ``sqlite3.OperationalError`` (locked, read-only,
        disk full) propagates with nothing written.
        """
        prepared = list(rows) if normalized else [normalize_row(r) for r in rows]
        if not prepared:
            return 0
        conn = self.db.conn
        # Many rows per statement: sqlite3 releases the GIL around every step it takes
        # (each row of an executemany), and the writer thread must win the GIL back after
        # each one from a busy event loop (up to the 5 ms switch interval each time). One
        # multi-row INSERT and one DELETE ... IN per group of rows take a few GIL
        # hand-offs per batch instead of two per row.
        per = _rows_per_statement(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            inserted = 0
            for i in range(0, len(prepared), per):
                group = prepared[i : i + per]
                n = len(group)
                values = [r[c] for r in group for c in COLUMNS]
                # rowcount counts the rows inserted, not the triggers' budget updates.
                inserted += conn.execute(_insert_sql(n), values).rowcount
                # Settle: the row's usage becomes spend (the triggers) in the same
                # commit that drops its reservation, so no instant counts it twice
                # or not at all. A row without a reservation deletes nothing.
                conn.execute(_settle_sql(n), [r["id"] for r in group])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return inserted

    # -- reading ------------------------------------------------------------------

    def _where(
        self,
        *,
        since: str | datetime | None,
        until: str | datetime | None,
        account: str | None = None,
        key: str | None = None,
        model: str | None = None,
        node: str | None = None,
        outcome: str | None = None,
    ) -> tuple[list[str], dict[str, Any]]:
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if since is not None:
            clauses.append("ts >= :since")
            params["since"] = normalize_ts(since)
        if until is not None:
            clauses.append("ts < :until")
            params["until"] = normalize_ts(until)
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        for name, value in (
            ("account", account),
            ("key", key),
            ("model", model),
            ("node", node),
            ("outcome", outcome),
        ):
            if value is not None:
                clauses.append(f"{name} = :{name}")
                params[name] = value
        return clauses, params

    def requests(
        self,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        account: str | None = None,
        key: str | None = None,
        model: str | None = None,
        node: str | None = None,
        outcome: str | None = None,
        limit: int | None = None,
        after_rowid: int | None = None,
        order: str = "desc",
        include_rowid: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Request rows as dicts (keys ``COLUMNS``; ``streamed`` a bool).

        ``since`` is inclusive, ``until`` exclusive. Rows are ordered by ``ts``
        (then insertion), newest first unless ``order="asc"``. With ``after_rowid``
        only rows inserted after that rowid are returned, in insertion order (for
        following the ledger live); ``include_rowid`` adds each row's ``rowid``.
        The query runs (and raises) when called; rows are fetched lazily.
        """
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be zero or more, not {limit}")
        clauses, params = self._where(
            since=since,
            until=until,
            account=account,
            key=key,
            model=model,
            node=node,
            outcome=outcome,
        )
        if after_rowid is not None:
            clauses.append("rowid > :after_rowid")
            params["after_rowid"] = after_rowid
            order_by = f"rowid {order}"
        else:
            order_by = f"ts {order}, rowid {order}"
        columns = ", ".join(("rowid", *COLUMNS) if include_rowid else COLUMNS)
        sql = f"SELECT {columns} FROM requests"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY {order_by}"
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = limit
        cursor = self.db.conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return (_row_out(dict(zip(names, r, strict=True))) for r in cursor)

    def set_costs(self, updates: Sequence[tuple[str, int | None, str | None]]) -> int:
        """Store ``(id, cost_nusd, price_source)`` for existing rows, in one transaction;
        returns how many rows changed (a row already holding those values is untouched)."""
        if not updates:
            return 0
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            changed = conn.executemany(
                "UPDATE requests SET cost_nusd = ?, price_source = ? WHERE id = ? "
                "AND (cost_nusd IS NOT ? OR price_source IS NOT ?)",
                [(c, src, rid, c, src) for rid, c, src in updates],
            ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return changed

    def last_rowid(self) -> int:
        """The rowid of the last row inserted (0 for an empty ledger): where ``tail`` starts."""
        return self.db.conn.execute("SELECT coalesce(max(rowid), 0) FROM requests").fetchone()[0]

    def spend_series(
        self,
        by: str,
        bucket_s: int,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        metric: str = "tokens",
        **filters: Any,
    ) -> list[dict[str, Any]]:
        """Tokens spent (prompt + completion), or with ``metric="cost"`` nano-dollars,
        per ``by`` group and time bucket.

        ``by`` is ``account``, ``key``, ``model`` or ``node``. Each dict has the
        group under ``by`` (None for rows without one), ``bucket`` (the Unix time
        at which its ``bucket_s``-second bucket starts, aligned to the epoch),
        ``value`` and ``refused`` (requests spendtap refused, which spend
        nothing); ordered by group, then bucket. Filters as in ``requests()``.
        """
        if metric not in ("tokens", "cost"):
            raise ValueError(f"metric must be tokens or cost, not {metric!r}")
        if by not in ("account", "key", "model", "node"):
            raise ValueError(f"by must be account, key, model or node, not {by!r}")
        if isinstance(bucket_s, bool) or not isinstance(bucket_s, int) or bucket_s <= 0:
            raise ValueError(f"bucket_s must be a positive whole number, not {bucket_s!r}")
        clauses, params = self._where(since=since, until=until, **filters)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        params["bucket"] = bucket_s
        value = (
            "coalesce(sum(cost_nusd), 0)"
            if metric == "cost"
            else "coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0)"
        )
        sql = f"""
            SELECT {by} AS grp,
                   CAST(strftime('%s', substr(ts, 1, 19)) AS INTEGER) / :bucket * :bucket
                       AS bucket,
                   {value} AS value,
                   sum(outcome = 'rejected') AS refused
            FROM requests{where}
            GROUP BY grp, bucket
            ORDER BY grp, bucket
        """
        return [
            {by: grp, "bucket": bucket, "value": value, "refused": refused}
            for grp, bucket, value, refused in self.db.conn.execute(sql, params)
        ]

    def time_span(self, **filters: Any) -> tuple[str, str] | None:
        """The first and last ``ts`` of the rows matching the filters, None if none do."""
        clauses, params = self._where(
            since=filters.pop("since", None), until=filters.pop("until", None), **filters
        )
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        row = self.db.conn.execute(f"SELECT min(ts), max(ts) FROM requests{where}", params)
        first, last = row.fetchone()
        return None if first is None else (first, last)

    def count(self, **filters: Any) -> int:
        """How many request rows match the filters of ``requests()``."""
        clauses, params = self._where(
            since=filters.pop("since", None), until=filters.pop("until", None), **filters
        )
        sql = "SELECT count(*) FROM requests"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return self.db.conn.execute(sql, params).fetchone()[0]

    def report(
        self,
        by: str,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        account: str | None = None,
        key: str | None = None,
        model: str | None = None,
        node: str | None = None,
        outcome: str | None = None,
        sort: str | None = None,
    ) -> list[dict[str, Any]]:
        """Usage and cost totals grouped by a row field (``REPORT_BY``), ``day`` or ``hour``.

        Each dict has the group value under the name of ``by`` (``None`` for
        anonymous rows; ``day`` as ``2025-01-31``, ``hour`` as ``2025-01-31T12:00:00Z``,
        both UTC), then ``requests``, the token sums (NULL when no row of the
        group reported the figure), ``total_tokens``, ``errors`` (upstream errors
        and client disconnects), ``refused`` (requests spendtap answered itself:
        budget, auth and ledger refusals, and an SDK's retries of them),
        ``usage_missing`` (served requests with no usage reported or estimated;
        refusals are never in it, nor in ``errors``),
        ``avg_ttft_s`` and ``avg_tokens_per_s`` (over the rows that have them),
        ``unpriced`` (rows with usage but no known price), ``cost_usd`` (the exact sum
        of the priced rows' costs, a ``Decimal``; None when none is priced) and
        ``avg_cost_usd`` (over the priced rows). Time groups are in time order unless
        ``sort`` says ``tokens``, ``cost`` or ``requests`` (most first); the others
        by total tokens unless ``sort`` says otherwise.
        """
        if by not in REPORT_BY:
            raise ValueError(f"by must be one of {', '.join(REPORT_BY)}, not {by!r}")
        if sort is not None and sort not in REPORT_SORT:
            raise ValueError(f"sort must be one of {', '.join(REPORT_SORT)}, not {sort!r}")
        if by == "day":
            group = "substr(ts, 1, 10)"
        elif by == "hour":
            group = "substr(ts, 1, 13) || ':00:00Z'"
        else:
            group = by
        clauses, params = self._where(
            since=since,
            until=until,
            account=account,
            key=key,
            model=model,
            node=node,
            outcome=outcome,
        )
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        tie = "requests DESC, grp IS NULL, grp"
        if sort == "cost":
            order_by = f"cost_nusd IS NULL, cost_nusd DESC, total_tokens DESC, {tie}"
        elif sort == "requests":
            order_by = "requests DESC, total_tokens DESC, grp IS NULL, grp"
        elif sort == "tokens" or by not in ("day", "hour"):
            order_by = f"total_tokens IS NULL, total_tokens DESC, {tie}"
        else:
            order_by = "grp"
        sql = f"""
            SELECT
                {group} AS grp,
                count(*) AS requests,
                sum(prompt_tokens) AS prompt_tokens,
                sum(completion_tokens) AS completion_tokens,
                sum(cached_tokens) AS cached_tokens,
                sum(cache_creation_tokens) AS cache_creation_tokens,
                sum(reasoning_tokens) AS reasoning_tokens,
                CASE WHEN count(prompt_tokens) + count(completion_tokens) = 0 THEN NULL
                     ELSE coalesce(sum(prompt_tokens), 0) + coalesce(sum(completion_tokens), 0)
                END AS total_tokens,
                sum(outcome NOT IN ('completed', 'rejected')) AS errors,
                sum(outcome = 'rejected') AS refused,
                sum((usage_source IS NULL OR usage_source = 'none') AND outcome != 'rejected')
                    AS usage_missing,
                round(avg(ttft_s), 4) AS avg_ttft_s,
                round(avg(tokens_per_s), 2) AS avg_tokens_per_s,
                sum(cost_nusd) AS cost_nusd,
                count(cost_nusd) AS priced,
                coalesce(sum(price_source = 'none'), 0) AS unpriced
            FROM requests{where}
            GROUP BY grp
            ORDER BY {order_by}
        """
        cursor = self.db.conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        names[0] = by
        out = []
        for r in cursor:
            row = dict(zip(names, r, strict=True))
            nusd, priced = row.pop("cost_nusd"), row.pop("priced")
            # Sums of whole nano-dollars: exact, whatever the number of rows.
            row["cost_usd"] = usd(nusd)
            row["avg_cost_usd"] = usd(Decimal(nusd) / priced) if priced else None
            out.append(row)
        return out
