"""The fleet's central store: budgets, reservations, shipped rows and node leases in PostgreSQL.

With ``--central postgresql://...`` every sidecar of a fleet shares one budget
authority and one ledger. This module is the PostgreSQL implementation of the
budget store (the SQLite one is ``spendtap.store.budgets.Budgets``; both satisfy
``spendtap.store.backend.BudgetStore``) plus what only a fleet needs: shipping rows in
from each node's local ledger, and node leases.

How the guarantees carry over from one node to a fleet:

- **No overshoot**: ``reserve`` locks the key's and account's budget rows
  (``SELECT ... FOR UPDATE``, always in the same order, so two sidecars never
  deadlock), reads spend and open reservations under that lock and inserts the
  reservation, all in one transaction. A ``BEFORE INSERT`` trigger on
  ``reservations`` checks ``spent + reserved + tokens <= cap`` for every
  budget of the principal inside the database (for any insert but the one
  ``spendtap_reserve`` checked a moment before under the same locks): an
  overshooting reservation is impossible whatever client writes it, not just unlikely.
- **Settle on ship**: a request's row is committed to the node's SQLite ledger
  first (durable before delivery, locally). ``ship`` inserts rows idempotently
  (``ON CONFLICT (id) DO NOTHING``: a row shipped twice is stored once), deletes
  the reservations whose id is a shipped row's id, and advances the node's
  shipping cursor, all in one transaction. Until a row ships its reservation
  stays open, so the fleet never counts a request's tokens as neither reserved
  nor spent.
- **Leases**: each sidecar heartbeats a row in ``nodes`` from its own thread. Any live sidecar's
  sweep releases the reservations of nodes whose lease expired; a restarted
  node ships its backlog first and only then releases what its previous life
  left open (ship-then-release: the rows that settle reservations are never
  outrun by the release).

Exceptions::

    LedgerError (spendtap.store.errors)
     +-- StorageError
     |    +-- CentralError      the central store failed (message names no password)
     |         +-- NotCentral   the database is someone else's (no spendtap migrations)
     |         +-- CentralBusy, CentralUnwritable, CentralCorrupt: also LedgerBusy,
     |             LedgerUnwritable, LedgerCorrupt (the kind of PostgreSQL's SQLSTATE)
     +-- BudgetUnavailable      (spendtap.store.budgets) PostgreSQL cannot answer a reserve now

Every connection has a bounded connect timeout and statement timeout; callers
run these methods on worker threads, never on an event loop. No SQL lives
outside the backend modules (this one, ``ledger``, ``budgets``, ``keys``).

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from spendtap.options import redact_url
from spendtap.store import queries
from spendtap.store.budgets import (
    RESERVED_RETRY_S,
    TOKENS,
    UNBUDGETED,
    Budget,
    BudgetStatus,
    BudgetUnavailable,
    Decision,
    _binding,
    _epoch,
    _ts_epoch,
    check_cap,
    check_principal,
    check_reservation,
    counting_since,
)
from spendtap.store.errors import (
    LedgerBusy,
    LedgerCorrupt,
    LedgerUnwritable,
    StorageError,
    boundary_class,
    storage_error,
)
from spendtap.store.ledger import (
    Closing,
    normalize_row,
)
from spendtap.timeparse import ts_from_epoch

__all__ = [
    "CentralError",
    "CentralStore",
    "NotCentral",
    "is_central_url",
    "node_identity",
    "redact_dsn",
]

MIGRATIONS_TABLE = "spendtap_migrations"
_COLUMN = {"key": "key", "account": "account"}
_SPEND = "coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)"
_BUDGET_COLUMNS = "scope, principal, cap_tokens, window_s, since, created_at, updated_at"


class CentralError(StorageError):
    """The central store failed; the message is one line and never holds a password."""


class CentralBusy(CentralError, LedgerBusy):
    """PostgreSQL could not take a lock or serialize the transaction: try again later."""


class CentralUnwritable(CentralError, LedgerUnwritable):
    """PostgreSQL is out of disk or memory, or the transaction is read-only."""


class CentralCorrupt(CentralError, LedgerCorrupt):
    """PostgreSQL reports corrupted data or an index it cannot read."""


# The store's kind of a driver error (``errors.storage_error``), as a central error.
_CENTRAL_KINDS: dict[type[StorageError], type[CentralError]] = {
    LedgerBusy: CentralBusy,
    LedgerUnwritable: CentralUnwritable,
    LedgerCorrupt: CentralCorrupt,
}


class NotCentral(CentralError):
    """The database is reachable but is not spendtap's (tables, no spendtap migrations)."""


def is_central_url(value: str | os.PathLike[str] | None) -> bool:
    """Whether ``--db``/``--central`` names PostgreSQL rather than an SQLite file."""
    return isinstance(value, str) and value.startswith(("postgresql://", "postgres://"))


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***`` (for logs, metrics and output)."""
    return redact_url(dsn)


def node_identity(local_db: str | os.PathLike[str]) -> str:
    """A sidecar's stable node id: this host and its local ledger's absolute path."""
    return f"{socket.gethostname()}:{os.path.abspath(local_db)}"


# -- migrations (append-only: never edit a shipped one) -------------------------------

_REQUESTS_COLUMNS_SQL = """
    id TEXT PRIMARY KEY,
    ts TEXT NOT NULL,
    account TEXT,
    key TEXT,
    model TEXT,
    node TEXT,
    api TEXT,
    method TEXT,
    path TEXT,
    streamed BOOLEAN,
    status INTEGER,
    outcome TEXT,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    cached_tokens BIGINT,
    cache_creation_tokens BIGINT,
    reasoning_tokens BIGINT,
    usage_source TEXT,
    ttft_s DOUBLE PRECISION,
    duration_s DOUBLE PRECISION,
    tokens_per_s DOUBLE PRECISION,
    error TEXT,
    response_bytes BIGINT,
    cost_nusd BIGINT CHECK (cost_nusd IS NULL OR cost_nusd >= 0),
    price_source TEXT,
    server_prompt_s DOUBLE PRECISION,
    server_decode_s DOUBLE PRECISION,
    shipped_from TEXT,
    shipped_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    seq BIGSERIAL
"""

M001_INITIAL = f"""
CREATE TABLE requests ({_REQUESTS_COLUMNS_SQL});
CREATE INDEX requests_ts ON requests (ts);
CREATE INDEX requests_seq ON requests (seq);
CREATE INDEX requests_account_ts_spend ON requests (account, ts, prompt_tokens, completion_tokens);
CREATE INDEX requests_key_ts_spend ON requests (key, ts, prompt_tokens, completion_tokens);
CREATE INDEX requests_model_ts ON requests (model, ts);

CREATE TABLE budgets (
    scope TEXT NOT NULL CHECK (scope IN ('key', 'account')),
    principal TEXT NOT NULL,
    cap_tokens BIGINT NOT NULL CHECK (cap_tokens >= 0),
    window_s INTEGER CHECK (window_s IS NULL OR window_s > 0),
    since TEXT NOT NULL,
    spent_since BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (scope, principal)
);

-- Each sidecar's lease, renewed by its own thread (never held up by shipping).
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    owner TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_s INTEGER NOT NULL CHECK (lease_s > 0)
);

-- Where each node's shipping stands in its local ledger; moves with the shipped rows.
CREATE TABLE ship_cursors (
    node_id TEXT PRIMARY KEY,
    ledger_mark TEXT,
    shipped_rowid BIGINT NOT NULL DEFAULT 0 CHECK (shipped_rowid >= 0),
    shipped_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    account TEXT,
    key TEXT,
    tokens BIGINT NOT NULL CHECK (tokens >= 0),
    created_at TEXT NOT NULL,
    owner TEXT NOT NULL,
    node_id TEXT
);
CREATE INDEX reservations_account ON reservations (account);
CREATE INDEX reservations_key ON reservations (key);
CREATE INDEX reservations_node ON reservations (node_id);

CREATE TABLE api_keys (
    fingerprint TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    account TEXT NOT NULL,
    key_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX api_keys_key_id ON api_keys (key_id);

-- The start of a budget's rolling window that ends at ``at`` (ledger time text).
CREATE FUNCTION spendtap_window_start(at TEXT, window_s INTEGER) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char((at::timestamptz - make_interval(secs => window_s)) AT TIME ZONE 'UTC',
                   'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- Spend of one budget at ``at``: the running total for a balance, the window's rows otherwise.
CREATE FUNCTION spendtap_spent(b budgets, at TEXT) RETURNS BIGINT
LANGUAGE plpgsql STABLE AS $$
DECLARE
    total BIGINT;
    start_ts TEXT;
BEGIN
    IF b.window_s IS NULL THEN
        RETURN b.spent_since;
    END IF;
    start_ts := spendtap_window_start(at, b.window_s);
    IF b.scope = 'key' THEN
        SELECT coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0)
        INTO total FROM requests r
        WHERE r.key = b.principal AND r.ts > start_ts AND r.ts >= b.since;
    ELSE
        SELECT coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0)
        INTO total FROM requests r
        WHERE r.account = b.principal AND r.ts > start_ts AND r.ts >= b.since;
    END IF;
    RETURN total;
END
$$;

-- Tokens held by one budget's open reservations.
CREATE FUNCTION spendtap_reserved(b budgets) RETURNS BIGINT
LANGUAGE plpgsql STABLE AS $$
DECLARE
    total BIGINT;
BEGIN
    IF b.scope = 'key' THEN
        SELECT coalesce(sum(tokens), 0) INTO total FROM reservations r WHERE r.key = b.principal;
    ELSE
        SELECT coalesce(sum(tokens), 0) INTO total FROM reservations r
        WHERE r.account = b.principal;
    END IF;
    RETURN total;
END
$$;

-- The database's own guarantee: no reservation may take a budget over its cap.
CREATE FUNCTION spendtap_reservation_fits() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    b budgets;
    spent BIGINT;
    reserved BIGINT;
BEGIN
    FOR b IN
        SELECT * FROM budgets
        WHERE (scope = 'key' AND principal = NEW.key)
           OR (scope = 'account' AND principal = NEW.account)
        ORDER BY scope, principal
        FOR UPDATE
    LOOP
        spent := spendtap_spent(b, NEW.created_at);
        reserved := spendtap_reserved(b);
        IF spent + reserved + NEW.tokens > b.cap_tokens THEN
            RAISE EXCEPTION 'reservation % would take % budget % over its cap (% + % + % > %)',
                NEW.id, b.scope, b.principal, spent, reserved, NEW.tokens, b.cap_tokens
                USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
    RETURN NEW;
END
$$;
CREATE TRIGGER reservations_fit_caps BEFORE INSERT ON reservations
    FOR EACH ROW EXECUTE FUNCTION spendtap_reservation_fits();

-- Reserve in one round trip: lock the principal's budgets (always in the same order),
-- check each, and record the reservation only if all fit. No rows: no budget applies.
-- Otherwise one row per refusing budget, or one row with allowed = true.
CREATE FUNCTION spendtap_reserve(p_id TEXT, p_account TEXT, p_key TEXT, p_tokens BIGINT,
                                 p_at TEXT, p_owner TEXT, p_node TEXT)
RETURNS TABLE (allowed BOOLEAN, b_scope TEXT, b_principal TEXT, b_cap BIGINT,
               b_window_s INTEGER, b_since TEXT, b_created_at TEXT, b_updated_at TEXT,
               b_spent BIGINT, b_reserved BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    b budgets;
    s BIGINT;
    r BIGINT;
    found_any BOOLEAN := false;
    refused BOOLEAN := false;
BEGIN
    FOR b IN
        SELECT * FROM budgets bb
        WHERE (bb.scope = 'key' AND bb.principal = p_key)
           OR (bb.scope = 'account' AND bb.principal = p_account)
        ORDER BY bb.scope, bb.principal
        FOR UPDATE
    LOOP
        found_any := true;
        s := spendtap_spent(b, p_at);
        r := spendtap_reserved(b);
        IF s + r + p_tokens > b.cap_tokens THEN
            refused := true;
            RETURN QUERY SELECT false, b.scope, b.principal, b.cap_tokens, b.window_s,
                                b.since, b.created_at, b.updated_at, s, r;
        END IF;
    END LOOP;
    IF found_any AND NOT refused THEN
        INSERT INTO reservations (id, account, key, tokens, created_at, owner, node_id)
        VALUES (p_id, p_account, p_key, p_tokens, p_at, p_owner, p_node);
        RETURN QUERY SELECT true, NULL::TEXT, NULL::TEXT, NULL::BIGINT, NULL::INTEGER,
                            NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT, NULL::BIGINT;
    END IF;
END
$$;

-- A balance's running total moves with the rows, in the row's own transaction.
CREATE FUNCTION spendtap_row_spend() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(NEW.prompt_tokens, 0) + coalesce(NEW.completion_tokens, 0) != 0 THEN
        UPDATE budgets SET spent_since = spent_since
            + coalesce(NEW.prompt_tokens, 0) + coalesce(NEW.completion_tokens, 0)
        WHERE ((scope = 'key' AND principal = NEW.key)
            OR (scope = 'account' AND principal = NEW.account))
          AND NEW.ts >= since;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER requests_budget_spend AFTER INSERT ON requests
    FOR EACH ROW EXECUTE FUNCTION spendtap_row_spend();
"""

# Shipping in one statement: the budget rows it locks are held for the server's work
# only, never across a round trip to a sidecar's thread that may be waiting for the GIL
# while every reservation of those principals queues on the lock. The columns are
# written out (this text is frozen once shipped): a later column needs a migration that
# replaces the function (tests/test_central.py checks it covers ``COLUMNS``).
M002_SHIP_FUNCTION = """
CREATE FUNCTION spendtap_ship(p_node TEXT, p_mark TEXT, p_last BIGINT, p_keys TEXT[],
                              p_accounts TEXT[], p_ids TEXT[], p_rows JSONB)
RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    inserted BIGINT;
BEGIN
    -- The cursor first: a node's batches serialize here, before any budget is locked.
    INSERT INTO ship_cursors (node_id, ledger_mark, shipped_rowid)
    VALUES (p_node, p_mark, p_last)
    ON CONFLICT (node_id) DO UPDATE SET
        ledger_mark = excluded.ledger_mark,
        shipped_rowid = excluded.shipped_rowid,
        shipped_at = now();
    -- Lock the budgets these rows will charge in the order spendtap_reserve locks them
    -- (scope, principal), before the triggers do: shipping and reserving never deadlock.
    PERFORM 1 FROM budgets
    WHERE (scope = 'key' AND principal = ANY(p_keys))
       OR (scope = 'account' AND principal = ANY(p_accounts))
    ORDER BY scope, principal
    FOR UPDATE;
    INSERT INTO requests (
        id, ts, account, key, model, node,
        api, method, path, streamed, status, outcome,
        prompt_tokens, completion_tokens, cached_tokens, cache_creation_tokens,
        reasoning_tokens, usage_source,
        ttft_s, duration_s, tokens_per_s, error, response_bytes, cost_nusd,
        price_source, server_prompt_s, server_decode_s,
        shipped_from)
    SELECT
        id, ts, account, key, model, node,
        api, method, path, streamed, status, outcome,
        prompt_tokens, completion_tokens, cached_tokens, cache_creation_tokens,
        reasoning_tokens, usage_source,
        ttft_s, duration_s, tokens_per_s, error, response_bytes, cost_nusd,
        price_source, server_prompt_s, server_decode_s,
        p_node
    FROM jsonb_populate_recordset(NULL::requests, p_rows)
    ON CONFLICT (id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    DELETE FROM reservations WHERE id = ANY(p_ids);
    RETURN inserted;
END
$$;
"""

# Every reservation is deleted when its row ships, so ``reservations_key`` and
# ``reservations_account`` fill with entries of dead rows between two autovacuums (a
# minute apart by default: 36,000 at 600 requests a second). A bitmap scan, the plan
# chosen for a handful of open reservations, visits every one of them on every sum, four
# sums a reservation, with the principal's budget rows locked: 26 µs a sum after 3,000
# requests, 52 µs after 6,000, growing until the vacuum. A plain index scan marks each
# dead entry the first time it meets one, and later scans skip it (6 µs a sum).
M003_RESERVED_INDEX_SCAN = """
ALTER FUNCTION spendtap_reserved(budgets) SET enable_bitmapscan = off;
"""

# Many reservations in one round trip and one transaction (a sidecar sends the ones
# its requests ask for while the previous batch is out): each item is
# ``spendtap_reserve``'s, in order, so it sees the batch's earlier reservations. Every
# budget of the batch is locked first, in the order ``spendtap_reserve`` and
# ``spendtap_ship`` lock them: batches, single reservations and shipments never deadlock.
M004_RESERVE_MANY = """
CREATE FUNCTION spendtap_reserve_many(p_ids TEXT[], p_accounts TEXT[], p_keys TEXT[],
                                      p_tokens BIGINT[], p_at TEXT, p_owner TEXT,
                                      p_node TEXT)
RETURNS TABLE (item INTEGER, allowed BOOLEAN, b_scope TEXT, b_principal TEXT, b_cap BIGINT,
               b_window_s INTEGER, b_since TEXT, b_created_at TEXT, b_updated_at TEXT,
               b_spent BIGINT, b_reserved BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM budgets
    WHERE (scope = 'key' AND principal = ANY(p_keys))
       OR (scope = 'account' AND principal = ANY(p_accounts))
    ORDER BY scope, principal
    FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        RETURN QUERY SELECT i, r.* FROM spendtap_reserve(
            p_ids[i], p_accounts[i], p_keys[i], p_tokens[i], p_at, p_owner, p_node) r;
    END LOOP;
END
$$;
"""

# ``spendtap_reserve`` checks every budget of a reservation under the budgets' locks and
# inserts it at once; the insert trigger then checked the same budgets, under the same
# locks, in the same transaction: the same answer, for two of the four sums of open
# reservations a reservation cost (a quarter of PostgreSQL's time under the fleet's
# load). The function now names the reservation it checked in a setting local to the
# transaction, cleared after the insert; the trigger still checks every other insert,
# whoever writes it.
M005_CHECKED_ONCE = """
CREATE OR REPLACE FUNCTION spendtap_reservation_fits() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    b budgets;
    spent BIGINT;
    reserved BIGINT;
BEGIN
    IF current_setting('spendtap.checked_reservation', true) = NEW.id THEN
        RETURN NEW;  -- spendtap_reserve checked it under these locks a moment ago
    END IF;
    FOR b IN
        SELECT * FROM budgets
        WHERE (scope = 'key' AND principal = NEW.key)
           OR (scope = 'account' AND principal = NEW.account)
        ORDER BY scope, principal
        FOR UPDATE
    LOOP
        spent := spendtap_spent(b, NEW.created_at);
        reserved := spendtap_reserved(b);
        IF spent + reserved + NEW.tokens > b.cap_tokens THEN
            RAISE EXCEPTION 'reservation % would take % budget % over its cap (% + % + % > %)',
                NEW.id, b.scope, b.principal, spent, reserved, NEW.tokens, b.cap_tokens
                USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION spendtap_reserve(p_id TEXT, p_account TEXT, p_key TEXT,
                                            p_tokens BIGINT, p_at TEXT, p_owner TEXT,
                                            p_node TEXT)
RETURNS TABLE (allowed BOOLEAN, b_scope TEXT, b_principal TEXT, b_cap BIGINT,
               b_window_s INTEGER, b_since TEXT, b_created_at TEXT, b_updated_at TEXT,
               b_spent BIGINT, b_reserved BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    b budgets;
    s BIGINT;
    r BIGINT;
    found_any BOOLEAN := false;
    refused BOOLEAN := false;
BEGIN
    FOR b IN
        SELECT * FROM budgets bb
        WHERE (bb.scope = 'key' AND bb.principal = p_key)
           OR (bb.scope = 'account' AND bb.principal = p_account)
        ORDER BY bb.scope, bb.principal
        FOR UPDATE
    LOOP
        found_any := true;
        s := spendtap_spent(b, p_at);
        r := spendtap_reserved(b);
        IF s + r + p_tokens > b.cap_tokens THEN
            refused := true;
            RETURN QUERY SELECT false, b.scope, b.principal, b.cap_tokens, b.window_s,
                                b.since, b.created_at, b.updated_at, s, r;
        END IF;
    END LOOP;
    IF found_any AND NOT refused THEN
        PERFORM set_config('spendtap.checked_reservation', p_id, true);
        INSERT INTO reservations (id, account, key, tokens, created_at, owner, node_id)
        VALUES (p_id, p_account, p_key, p_tokens, p_at, p_owner, p_node);
        PERFORM set_config('spendtap.checked_reservation', '', true);
        RETURN QUERY SELECT true, NULL::TEXT, NULL::TEXT, NULL::BIGINT, NULL::INTEGER,
                            NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT, NULL::BIGINT;
    END IF;
END
$$;
"""

# A balance's running total moved one row at a time: a trigger call and an UPDATE of the
# key's and the account's budget rows for every shipped row (a new version of each
# budget row a row, 20 µs a row under load). Once a statement now: the budgets the
# inserted rows charge are locked in the order every writer locks them (shipping holds
# them already), then each gets the sum of its new rows at or after its ``since``.
M006_SPEND_ONCE_A_STATEMENT = """
CREATE FUNCTION spendtap_rows_spend() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM budgets
    WHERE (scope = 'key' AND principal IN (SELECT key FROM added))
       OR (scope = 'account' AND principal IN (SELECT account FROM added))
    ORDER BY scope, principal
    FOR UPDATE;
    UPDATE budgets b SET spent_since = b.spent_since + s.tokens
    FROM (
        SELECT bb.scope, bb.principal,
               sum(coalesce(a.prompt_tokens, 0) + coalesce(a.completion_tokens, 0)) AS tokens
        FROM added a JOIN budgets bb
            ON bb.scope = 'key' AND bb.principal = a.key AND a.ts >= bb.since
        GROUP BY bb.scope, bb.principal
        UNION ALL
        SELECT bb.scope, bb.principal,
               sum(coalesce(a.prompt_tokens, 0) + coalesce(a.completion_tokens, 0))
        FROM added a JOIN budgets bb
            ON bb.scope = 'account' AND bb.principal = a.account AND a.ts >= bb.since
        GROUP BY bb.scope, bb.principal
    ) s
    WHERE b.scope = s.scope AND b.principal = s.principal AND s.tokens != 0;
    RETURN NULL;
END
$$;
DROP TRIGGER requests_budget_spend ON requests;
CREATE TRIGGER requests_budget_spend AFTER INSERT ON requests
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION spendtap_rows_spend();
DROP FUNCTION spendtap_row_spend();
"""

MIGRATIONS: list[tuple[str, str]] = [
    ("m001_initial", M001_INITIAL),
    ("m002_ship_function", M002_SHIP_FUNCTION),
    ("m003_reserved_index_scan", M003_RESERVED_INDEX_SCAN),
    ("m004_reserve_many", M004_RESERVE_MANY),
    ("m005_checked_once", M005_CHECKED_ONCE),
    ("m006_spend_once_a_statement", M006_SPEND_ONCE_A_STATEMENT),
]


def _dsn_kwargs(timeout_s: float) -> dict[str, Any]:
    return {
        "connect_timeout": max(1, math.ceil(timeout_s)),
        "options": f"-c statement_timeout={int(timeout_s * 1000)} "
        f"-c lock_timeout={int(timeout_s * 1000)}",
        "application_name": "spendtap",
    }


@boundary_class
class CentralStore(queries.LedgerReads, Closing):
    """The fleet's store in the PostgreSQL database ``dsn``.

    ``pool_size`` > 0 keeps a ``psycopg_pool.ConnectionPool`` (the sidecar);
    0 uses one connection under a lock (the CLI). ``timeout_s`` bounds the
    connect, each statement and each wait for a pooled connection.
    ``create`` False refuses a database without spendtap's migrations
    (``NotCentral``); True migrates it on first use.
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 0,
        timeout_s: float = 2.0,
        create: bool = True,
        open_now: bool = True,
    ):
        import psycopg  # imported here: the SQLite-only paths never need it

        self._psycopg = psycopg
        self.dsn = dsn
        self.where = redact_dsn(dsn)
        self.timeout_s = timeout_s
        self.create = create
        self._migrated = False
        self._lock = threading.Lock()
        self._conn = None
        self._pool = None
        if pool_size > 0:
            from psycopg_pool import ConnectionPool

            self._pool = ConnectionPool(
                dsn,
                min_size=1,
                max_size=pool_size,
                kwargs={"autocommit": True, **_dsn_kwargs(timeout_s)},
                timeout=timeout_s,
                reconnect_timeout=0,  # keep retrying for as long as the sidecar runs
                check=_check_idle_connection,
                open=False,
                name="spendtap-central",
            )
            self._pool.open(wait=False)
        if open_now:
            self.migrate()

    def __repr__(self) -> str:
        return f"<CentralStore {self.where}>"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close(timeout=2)
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    # -- connections ---------------------------------------------------------------

    def _error(self, e: BaseException) -> CentralError:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        mapped = storage_error(e)
        kind = _CENTRAL_KINDS.get(type(mapped), CentralError)
        return kind(f"central store {self.where}: {text}")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection in autocommit mode; wrap writes in ``conn.transaction()``."""
        psycopg = self._psycopg
        try:
            if self._pool is not None:
                with self._pool.connection(timeout=self.timeout_s) as conn:
                    if not self._migrated:
                        self._migrate(conn)
                    yield conn
                return
            with self._lock:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.dsn, autocommit=True, **_dsn_kwargs(self.timeout_s)
                    )
                if not self._migrated:
                    self._migrate(self._conn)
                try:
                    yield self._conn
                except psycopg.OperationalError:
                    with contextlib.suppress(Exception):
                        self._conn.close()
                    self._conn = None
                    raise
        except CentralError:
            raise
        except psycopg.IntegrityError:
            raise  # a duplicate id or a cap the database enforces: the caller's to answer
        except (psycopg.Error, OSError) as e:
            raise self._error(e) from e
        except Exception as e:  # psycopg_pool.PoolTimeout and friends
            if type(e).__module__.startswith("psycopg"):
                raise self._error(e) from e
            raise

    def migrate(self) -> None:
        """Apply pending migrations now (raises ``CentralError``/``NotCentral``)."""
        with self._connection():
            pass

    def _migrate(self, conn: Any) -> None:
        with conn.transaction():
            # One migrator at a time across the fleet.
            conn.execute("SELECT pg_advisory_xact_lock(72616)")
            tables = {
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                )
            }
            if MIGRATIONS_TABLE not in tables:
                if tables or not self.create:
                    what = "tables but no spendtap migrations" if tables else "an empty database"
                    raise NotCentral(
                        f"central store {self.where} is not a spendtap ledger ({what})"
                    )
                conn.execute(
                    f"CREATE TABLE {MIGRATIONS_TABLE} (name TEXT PRIMARY KEY, "
                    "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
            done = {r[0] for r in conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")}
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                conn.execute(sql)
                conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name) VALUES (%s)", (name,))
        self._migrated = True

    def migrations(self) -> list[str]:
        with self._connection() as conn:
            return [r[0] for r in conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY 1")]

    # -- budgets: configuration ----------------------------------------------------

    @staticmethod
    def _check(scope: str, principal: str, unit: str = TOKENS) -> None:
        if unit != TOKENS:
            raise ValueError(
                "money caps (--cap-usd) are not enforced by the central store yet; "
                "set a token cap for the fleet"
            )
        check_principal(scope, principal)

    def set(
        self,
        scope: str,
        principal: str,
        cap: int,
        window_s: int | None,
        *,
        reset: bool = False,
        now: float | datetime | None = None,
        unit: str = TOKENS,
    ) -> Budget:
        """Create or change a fleet budget (same semantics as ``Budgets.set``; tokens only)."""
        self._check(scope, principal, unit)
        check_cap(cap, window_s)
        now_ts = ts_from_epoch(_epoch(now))
        column = _COLUMN[scope]
        with self._connection() as conn, conn.transaction():
            old = self._get(conn, scope, principal, lock=True)
            since = counting_since(old, window_s, reset=reset, now_ts=now_ts)
            spent_since = conn.execute(
                f"SELECT coalesce(sum({_SPEND}), 0) FROM requests WHERE {column} = %s AND ts >= %s",
                (principal, since),
            ).fetchone()[0]
            conn.execute(
                """
                INSERT INTO budgets (scope, principal, cap_tokens, window_s, since,
                                     spent_since, created_at, updated_at)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (scope, principal) DO UPDATE SET
                    cap_tokens = excluded.cap_tokens,
                    window_s = excluded.window_s,
                    since = excluded.since,
                    spent_since = excluded.spent_since,
                    updated_at = excluded.updated_at
                """,
                (scope, principal, cap, window_s, since, spent_since, now_ts, now_ts),
            )
            budget = self._get(conn, scope, principal)
        assert budget is not None
        return budget

    def remove(self, scope: str, principal: str, unit: str = TOKENS) -> bool:
        if unit != TOKENS:
            return False  # the central store holds no money caps
        self._check(scope, principal)
        with self._connection() as conn:
            cur = conn.execute(
                "DELETE FROM budgets WHERE scope = %s AND principal = %s", (scope, principal)
            )
            return cur.rowcount > 0

    @staticmethod
    def _get(conn: Any, scope: str, principal: str, lock: bool = False) -> Budget | None:
        row = conn.execute(
            f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE scope = %s AND principal = %s"
            + (" FOR UPDATE" if lock else ""),
            (scope, principal),
        ).fetchone()
        return Budget(*row) if row else None

    def get(self, scope: str, principal: str, unit: str = TOKENS) -> Budget | None:
        if unit != TOKENS:
            return None
        with self._connection() as conn:
            return self._get(conn, scope, principal)

    def list(self) -> list[Budget]:
        """Every budget: keys first, then accounts, each by principal."""
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_BUDGET_COLUMNS} FROM budgets ORDER BY scope DESC, principal"
            ).fetchall()
        return [Budget(*r) for r in rows]

    def status(
        self,
        scope: str,
        principal: str,
        now: float | datetime | None = None,
        unit: str = TOKENS,
    ) -> BudgetStatus | None:
        if unit != TOKENS:
            return None
        t = _epoch(now)
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            budget = self._get(conn, scope, principal)
            return None if budget is None else _status(conn, budget, t)

    def statuses(self, now: float | datetime | None = None) -> list[BudgetStatus]:
        t = _epoch(now)
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = conn.execute(
                f"SELECT {_BUDGET_COLUMNS} FROM budgets ORDER BY scope DESC, principal"
            ).fetchall()
            return [_status(conn, Budget(*r), t) for r in rows]

    # -- budgets: reserve / release / sweep ----------------------------------------

    def reserve(
        self,
        reservation_id: str,
        account: str | None,
        key: str | None,
        tokens: int,
        owner: str,
        now: float | datetime | None = None,
        *,
        node_id: str | None = None,
        nusd: int | None = None,
        model: str | None = None,
    ) -> Decision:
        """Reserve ``tokens`` fleet-wide, or refuse; same answers as ``Budgets.reserve``
        for token caps (``nusd`` and ``model`` are accepted for the same call shape; the
        central store holds no money caps yet).

        Raises ``ValueError`` for a bad argument or an id already reserved, and
        ``BudgetUnavailable`` when PostgreSQL cannot answer within the timeout.
        """
        check_reservation(reservation_id, tokens)
        if account is None and key is None:
            return UNBUDGETED
        # Whole milliseconds, as stored: the database's trigger sees the same window.
        t = _ts_epoch(ts_from_epoch(_epoch(now)))

        def call(conn: Any) -> Decision:
            rows = conn.execute(
                "SELECT * FROM spendtap_reserve(%s, %s, %s, %s, %s, %s, %s)",
                (reservation_id, account, key, tokens, ts_from_epoch(t), owner, node_id),
            ).fetchall()
            return _decision(conn, rows, reservation_id, tokens, t)

        return self._reserving(reservation_id, call)

    def reserve_many(
        self,
        items: Sequence[tuple[str, str | None, str | None, int]],
        owner: str,
        now: float | datetime | None = None,
        *,
        node_id: str | None = None,
    ) -> list[Decision | Exception]:
        """Reserve ``(reservation_id, account, key, tokens)`` items in one round trip and
        one transaction, in order: each is decided as ``reserve`` would decide it after
        the ones before it (an item never overshoots a cap the batch's earlier items
        filled). Returns a ``Decision`` or the exception ``reserve`` would raise for each
        item, in order; a failure of the whole batch (PostgreSQL away: every item's
        ``BudgetUnavailable``) is each item's.

        An id already reserved fails the whole transaction: the items are then reserved
        one by one, so only that item fails.
        """
        out: list[Decision | Exception | None] = [None] * len(items)
        batch: list[int] = []
        for i, (reservation_id, account, key, tokens) in enumerate(items):
            try:
                check_reservation(reservation_id, tokens)
            except ValueError as e:
                out[i] = e
                continue
            if account is None and key is None:
                out[i] = UNBUDGETED
            else:
                batch.append(i)
        if not batch:
            return out  # type: ignore[return-value]
        t = _ts_epoch(ts_from_epoch(_epoch(now)))
        ids = [items[i][0] for i in batch]

        def call(conn: Any) -> list[Decision]:
            rows = conn.execute(
                "SELECT * FROM spendtap_reserve_many(%s, %s, %s, %s, %s, %s, %s)",
                (ids, [items[i][1] for i in batch], [items[i][2] for i in batch],
                 [items[i][3] for i in batch], ts_from_epoch(t), owner, node_id),
            ).fetchall()  # fmt: skip
            per_item: list[list[Any]] = [[] for _ in batch]
            for r in rows:
                per_item[r[0] - 1].append(r[1:])
            return [
                _decision(conn, found, ids[n], items[i][3], t)
                for n, (i, found) in enumerate(zip(batch, per_item, strict=True))
            ]

        try:
            decided: list[Decision | Exception] = list(self._reserving(ids[0], call))
        except ValueError:
            # One item the database refused: each alone, so only that one fails.
            decided = []
            for i in batch:
                try:
                    decided.append(self.reserve(*items[i], owner, t, node_id=node_id))
                except (ValueError, BudgetUnavailable) as e:
                    decided.append(e)
        except BudgetUnavailable as e:
            decided = [e] * len(batch)
        for i, decision in zip(batch, decided, strict=True):
            out[i] = decision
        return out  # type: ignore[return-value]

    def _reserving(self, reservation_id: str, call: Callable[[Any], Any]) -> Any:
        """Run a reservation's statement, retried once on a pooled connection the server
        dropped, with PostgreSQL's answers mapped to ``reserve``'s exceptions."""
        psycopg = self._psycopg
        try:
            for attempt in (1, 2):
                used = None
                try:
                    with self._connection() as conn:
                        used = conn
                        return call(conn)
                except CentralError:
                    # A pooled connection the server dropped (it restarted): once more, on
                    # another one. A timeout or a refusal is never retried.
                    if attempt == 1 and used is not None and (used.broken or used.closed):
                        if self._pool is not None:
                            self._pool.check()  # drop every other connection it dropped
                        continue
                    raise
            raise AssertionError("unreachable")
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"reservation {reservation_id!r} is already open") from None
        except psycopg.errors.CheckViolation as e:
            # The database's own check refused: report it as a refusal of the key.
            raise BudgetUnavailable(f"central store refused the reservation: {e}") from e
        except CentralError as e:
            raise BudgetUnavailable(str(e)) from e

    def release(self, reservation_id: str) -> bool:
        """Drop a reservation without usage; False if it was not open."""
        try:
            with self._connection() as conn:
                cur = conn.execute("DELETE FROM reservations WHERE id = %s", (reservation_id,))
                return cur.rowcount > 0
        except CentralError as e:
            raise BudgetUnavailable(str(e)) from e

    def reservations(self) -> list[dict[str, Any]]:
        """Open reservations, oldest first: id, account, key, tokens, created_at, owner."""
        with self._connection() as conn:
            cur = conn.execute(
                # No dollars are reserved centrally (money caps stay single-node for now).
                "SELECT id, account, key, tokens, NULL::bigint AS nusd, created_at, owner "
                "FROM reservations ORDER BY created_at, id"
            )
            names = [d.name for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur]

    def open_reservation_count(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT count(*) FROM reservations").fetchone()[0]

    def sweep(
        self,
        owner_alive: Callable[[str], bool] | None = None,
        older_than_s: float | None = None,
        now: float | datetime | None = None,
    ) -> int:
        """Release stale reservations: of expired node leases, of dead local owners, or old.

        ``owner_alive`` judges owners on this host (another host's count as alive:
        their leases tell). No row is written for them: a node cut off from
        PostgreSQL still holds its rows locally and ships them when it is back.
        """
        t = _epoch(now)
        cutoff = ts_from_epoch(t - older_than_s) if older_than_s is not None else None
        with self._connection() as conn, conn.transaction():
            released = conn.execute(
                """
                DELETE FROM reservations r USING nodes n
                WHERE r.node_id = n.node_id
                  AND n.heartbeat_at < now() - make_interval(secs => n.lease_s)
                """
            ).rowcount
            stale: list[str] = []
            if owner_alive is not None or cutoff is not None:
                verdicts: dict[str, bool] = {}
                for rid, owner, created_at in conn.execute(
                    "SELECT id, owner, created_at FROM reservations"
                ).fetchall():
                    if owner_alive is not None:
                        if owner not in verdicts:
                            verdicts[owner] = bool(owner_alive(owner))
                        if not verdicts[owner]:
                            stale.append(rid)
                            continue
                    if cutoff is not None and created_at < cutoff:
                        stale.append(rid)
            if stale:
                released += conn.execute(
                    "DELETE FROM reservations WHERE id = ANY(%s)", (stale,)
                ).rowcount
        return released

    # -- nodes: leases and shipping ---------------------------------------------------

    def heartbeat(self, node_id: str, owner: str, lease_s: int) -> None:
        """Claim or renew this node's lease."""
        with self._connection() as conn:
            conn.execute(
                """
                INSERT INTO nodes (node_id, host, pid, owner, lease_s)
                VALUES (%s, %s, %s, %s, %s)
                ON CONFLICT (node_id) DO UPDATE SET
                    host = excluded.host, pid = excluded.pid, lease_s = excluded.lease_s,
                    started_at = CASE WHEN nodes.owner = excluded.owner THEN nodes.started_at
                                      ELSE now() END,
                    owner = excluded.owner, heartbeat_at = now()
                """,
                (node_id, socket.gethostname(), os.getpid(), owner, lease_s),
            )

    def release_previous_life(self, node_id: str, owner: str) -> int:
        """Release this node's reservations made by another process (its previous life).

        Call only once the node's backlog has shipped (ship-then-release).
        """
        with self._connection() as conn:
            return conn.execute(
                "DELETE FROM reservations WHERE node_id = %s AND owner != %s", (node_id, owner)
            ).rowcount

    def shipped_rowid(self, node_id: str, ledger_mark: str | None) -> int:
        """Where this node's shipping resumes: 0 for a new node or a replaced local ledger."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT shipped_rowid, ledger_mark FROM ship_cursors WHERE node_id = %s",
                (node_id,),
            ).fetchone()
        if row is None or row[1] != ledger_mark:
            return 0  # re-shipping is harmless: rows are keyed by id
        return row[0]

    def ship(
        self,
        node_id: str,
        rows: Sequence[tuple[int, dict[str, Any]]],
        ledger_mark: str | None,
    ) -> int:
        """Ship ``(rowid, row)`` pairs of one node in one transaction; returns rows inserted.

        Idempotent: a row already stored is skipped. Settles (deletes) the
        reservation of every shipped row and moves the node's cursor to the last
        rowid, in the same transaction.
        """
        if not rows:
            return 0
        prepared = [normalize_row(r) for _, r in rows]
        ids = [r["id"] for r in prepared]
        last = max(rowid for rowid, _ in rows)
        keys = sorted({r["key"] for r in prepared if r["key"] is not None})
        accounts = sorted({r["account"] for r in prepared if r["account"] is not None})
        from psycopg.types.json import Jsonb  # here: the SQLite-only paths never need it

        with self._connection() as conn:
            # One statement, its own transaction (autocommit): see M002_SHIP_FUNCTION.
            return conn.execute(
                "SELECT spendtap_ship(%s, %s, %s, %s, %s, %s, %s)",
                (node_id, ledger_mark, last, keys, accounts, ids,
                 Jsonb([_pg_row(r) for r in prepared])),
            ).fetchone()[0]  # fmt: skip

    def nodes(self) -> list[dict[str, Any]]:
        """Every node's lease: node_id, host, pid, heartbeat age, lease, expired, cursor."""
        return list(
            self._rows(
                """
                SELECT n.node_id, host, pid, owner,
                       extract(epoch FROM now() - heartbeat_at)::float AS heartbeat_age_s,
                       lease_s,
                       heartbeat_at < now() - make_interval(secs => lease_s) AS expired,
                       coalesce(c.shipped_rowid, 0) AS shipped_rowid
                FROM nodes n LEFT JOIN ship_cursors c USING (node_id)
                ORDER BY n.node_id
                """
            )
        )

    # -- the fleet ledger (its reading half is ``queries.LedgerReads``, as a node's) -------

    dialect = queries.POSTGRES

    def set_costs(self, updates: Sequence[tuple[str, int | None, str | None]]) -> int:
        """Store ``(id, cost_nusd, price_source)`` for existing rows (``spendtap reprice``)."""
        if not updates:
            return 0
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            changed = 0
            for rid, cost, source in updates:
                cur.execute(
                    "UPDATE requests SET cost_nusd = %s, price_source = %s WHERE id = %s "
                    "AND (cost_nusd IS DISTINCT FROM %s OR price_source IS DISTINCT FROM %s)",
                    (cost, source, rid, cost, source),
                )
                changed += cur.rowcount
        return changed

    def last_rowid(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT coalesce(max(seq), 0) FROM requests").fetchone()[0]

    def count_rows(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT count(*) FROM requests").fetchone()[0]

    def _rows(self, sql: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Rows of a read-only query, as dicts: all fetched before the connection goes back."""
        with self._connection() as conn:
            cur = conn.execute(sql, params)
            names = [d.name for d in cur.description]
            return iter([dict(zip(names, r, strict=True)) for r in cur])


# A pooled connection used within this many seconds is taken as alive without a round
# trip; an older one is checked first (the server may have restarted meanwhile) if
# anything arrived on its socket while it sat idle: a server that goes away tells its idle
# sessions (a termination notice, then the close), and an idle session is sent nothing
# else. The pool hands its connections out in turn, so at a few requests a second every
# one of them is "old": a round trip before each reservation and each shipment.
CHECK_IDLE_S = 1.0


def _check_idle_connection(conn: Any) -> None:
    now = time.monotonic()
    if now - getattr(conn, "_spendtap_used", 0.0) > CHECK_IDLE_S and _input_waiting(conn):
        from psycopg_pool import ConnectionPool

        ConnectionPool.check_connection(conn)
    conn._spendtap_used = now


def _input_waiting(conn: Any) -> bool:
    """True when the idle connection's socket has something to read, or is closed."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except Exception:
        return True  # cannot tell: the round trip decides


def _pg_row(row: dict[str, Any]) -> dict[str, Any]:
    """A normalized row as ``spendtap_ship`` reads it, ``streamed`` as a boolean."""
    streamed = row["streamed"]
    return {**row, "streamed": bool(streamed) if streamed is not None else None}


# -- spend queries --------------------------------------------------------------------


def _window_start(budget: Budget, now: float) -> str:
    assert budget.window_s is not None
    return ts_from_epoch(now - budget.window_s)


def _spent(conn: Any, budget: Budget, now: float) -> int:
    column = _COLUMN[budget.scope]
    if budget.window_s is None:
        row = conn.execute(
            "SELECT spent_since FROM budgets WHERE scope = %s AND principal = %s",
            (budget.scope, budget.principal),
        ).fetchone()
        return row[0] if row else 0
    return conn.execute(
        f"SELECT coalesce(sum({_SPEND}), 0) FROM requests "
        f"WHERE {column} = %s AND ts > %s AND ts >= %s",
        (budget.principal, _window_start(budget, now), budget.since),
    ).fetchone()[0]


def _reserved(conn: Any, budget: Budget) -> int:
    column = _COLUMN[budget.scope]
    return conn.execute(
        f"SELECT coalesce(sum(tokens), 0) FROM reservations WHERE {column} = %s",
        (budget.principal,),
    ).fetchone()[0]


def _window_rows(conn: Any, budget: Budget, now: float) -> list[tuple[str, int]]:
    column = _COLUMN[budget.scope]
    return conn.execute(
        f"SELECT ts, {_SPEND} FROM requests "
        f"WHERE {column} = %s AND ts > %s AND ts >= %s AND {_SPEND} > 0 ORDER BY ts",
        (budget.principal, _window_start(budget, now), budget.since),
    ).fetchall()


def _status(conn: Any, budget: Budget, now: float) -> BudgetStatus:
    resets_at = None
    if budget.window_s is not None:
        rows = _window_rows(conn, budget, now)
        if rows:
            resets_at = ts_from_epoch(_ts_epoch(rows[0][0]) + budget.window_s)
    return BudgetStatus(
        budget=budget,
        spent=int(_spent(conn, budget, now)),
        reserved=int(_reserved(conn, budget)),
        resets_at=resets_at,
    )


def _decision(conn: Any, rows: Sequence[Any], reservation_id: str, tokens: int, t: float):
    """``spendtap_reserve``'s rows as a ``Decision``: none, unbudgeted; one allowed row;
    else a row per refusing budget (their Retry-After worked out now, after the
    reservation's transaction has ended)."""
    if not rows:
        return UNBUDGETED
    if rows[0][0]:
        return Decision(allowed=True, reservation_id=reservation_id, tokens=tokens)
    return _binding(
        [_refusal(conn, Budget(*r[1:8]), int(r[8]), int(r[9]), tokens, t) for r in rows]
    )


def _refusal(conn: Any, budget: Budget, spent: int, reserved: int, tokens: int, now: float):
    """The same refusal ``Budgets`` gives, Retry-After included."""
    too_large = tokens > budget.cap
    retry: float | None = None
    if budget.window_s is not None and not too_large:
        if spent + tokens <= budget.cap:
            retry = RESERVED_RETRY_S
        else:
            need = min(spent, spent + reserved + tokens - budget.cap)
            freed = 0
            for ts, amount in _window_rows(conn, budget, now):
                freed += amount
                if freed >= need:
                    retry = max(0.0, _ts_epoch(ts) + budget.window_s - now)
                    break
            if retry is None:
                retry = RESERVED_RETRY_S
            elif spent + reserved + tokens - budget.cap > spent:
                retry = max(retry, RESERVED_RETRY_S)
    return Decision(
        allowed=False,
        reason="balance" if budget.window_s is None else "window",
        scope=budget.scope,
        principal=budget.principal,
        cap=budget.cap,
        window_s=budget.window_s,
        spent=int(spent),
        reserved=int(reserved),
        tokens=tokens,
        retry_after_s=retry,
        too_large=too_large,
    )


@boundary_class
class CentralKeys(Closing):
    """Bearer keys registered in the central store: they resolve on every node.

    The same interface as ``spendtap.store.keys.Keys`` (add, resolve, list, revoke).
    """

    def __init__(self, dsn: str, *, create: bool = True, timeout_s: float = 2.0, **_: Any):
        self.store = CentralStore(dsn, create=create, timeout_s=timeout_s)
        self.where = self.store.where

    @classmethod
    def over(cls, store: CentralStore) -> CentralKeys:
        """Keys through an already open store (its pool); closing them leaves it open."""
        keys = cls.__new__(cls)
        keys.store = store
        keys.where = store.where
        keys.close = lambda: None  # type: ignore[method-assign]
        return keys

    def close(self) -> None:
        self.store.close()

    def add(self, account: str, key_id: str, secret: str, *, now: float | None = None) -> Any:
        from spendtap.store.keys import DuplicateKey, new_record

        record = new_record(account, key_id, secret, now=now)
        try:
            with self.store._connection() as conn:
                conn.execute(
                    "INSERT INTO api_keys (fingerprint, prefix, account, key_id, created_at, "
                    "revoked_at) VALUES (%s, %s, %s, %s, %s, %s)",
                    (record.fingerprint, record.prefix, record.account, record.key_id,
                     record.created_at, record.revoked_at),
                )  # fmt: skip
        except self.store._psycopg.errors.UniqueViolation:
            raise DuplicateKey("that secret is already registered") from None
        return record

    def resolve(self, secret: str | None) -> tuple[str, str] | None:
        from spendtap.store.keys import fingerprint

        if not secret:
            return None
        with self.store._connection() as conn:
            row = conn.execute(
                "SELECT account, key_id FROM api_keys "
                "WHERE fingerprint = %s AND revoked_at IS NULL",
                (fingerprint(secret),),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def list(self, *, include_revoked: bool = False) -> list[Any]:
        from spendtap.store.keys import ApiKey

        sql = "SELECT fingerprint, prefix, account, key_id, created_at, revoked_at FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        sql += ' ORDER BY account COLLATE "C", key_id COLLATE "C", created_at'
        with self.store._connection() as conn:
            return [ApiKey(*r) for r in conn.execute(sql)]

    def revoke(
        self,
        *,
        key_id: str | None = None,
        fingerprint_prefix: str | None = None,
        now: float | None = None,
    ) -> int:
        from spendtap.store.keys import at_most_one, revoke_prefix

        fp = revoke_prefix(key_id, fingerprint_prefix)
        stamp = ts_from_epoch(time.time() if now is None else now)
        with self.store._connection() as conn, conn.transaction():
            if fp is None:
                return conn.execute(
                    "UPDATE api_keys SET revoked_at = %s WHERE key_id = %s AND revoked_at IS NULL",
                    (stamp, key_id),
                ).rowcount
            matches = conn.execute(
                "SELECT fingerprint FROM api_keys WHERE starts_with(fingerprint, %s) "
                "AND revoked_at IS NULL FOR UPDATE",
                (fp,),
            ).fetchall()
            at_most_one(fp, matches)
            for (full,) in matches:
                conn.execute(
                    "UPDATE api_keys SET revoked_at = %s WHERE fingerprint = %s", (stamp, full)
                )
            return len(matches)
