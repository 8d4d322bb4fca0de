"""The central store against a real PostgreSQL server: budgets, the database's own cap
check, idempotent shipping that settles, leases, migrations and errors."""

from __future__ import annotations

import time

import psycopg
import pytest

from spendtap.options import BY_NAME, OptionError, redact
from spendtap.store.budgets import BudgetUnavailable
from spendtap.store.central import (
    MIGRATIONS,
    CentralError,
    CentralStore,
    NotCentral,
    is_central_url,
    redact_dsn,
)
from spendtap.store.fleet import Shipper
from spendtap.store.ledger import Ledger
from spendtap.timeparse import ts_from_epoch
from tests.pg import PASSWORD


@pytest.fixture
def store(pg_dsn):
    s = CentralStore(pg_dsn)
    yield s
    s.close()


def row(rid: str, key: str = "k", tokens: int = 10, ts: float | None = None, **extra) -> dict:
    return {
        "id": rid,
        "ts": ts_from_epoch(ts if ts is not None else time.time()),
        "account": "acct",
        "key": key,
        "prompt_tokens": tokens // 2,
        "completion_tokens": tokens - tokens // 2,
        "outcome": "completed",
        "usage_source": "reported",
        **extra,
    }


def test_reserve_refuses_over_a_balance_and_settles_on_ship(store):
    """Reservations count against the cap until the row ships; then its usage counts."""
    store.set("key", "k", 100, None)
    assert store.reserve("r1", "acct", "k", 60, "o", node_id="n").allowed
    refused = store.reserve("r2", "acct", "k", 60, "o", node_id="n")
    assert not refused.allowed and refused.reason == "balance"
    assert (refused.spent, refused.reserved, refused.cap) == (0, 60, 100)
    assert store.ship("n", [(1, row("r1", tokens=20))], "mark") == 1
    status = store.status("key", "k")
    assert (status.spent, status.reserved) == (20, 0)
    assert store.reserve("r2", "acct", "k", 60, "o", node_id="n").allowed


def test_a_batch_is_decided_in_order_and_never_overshoots(store):
    """reserve_many decides each item as reserve would after the batch's earlier items:
    the third 40 of a 100 cap is refused, with the first two counted as reserved."""
    store.set("key", "k", 100, None)
    decided = store.reserve_many(
        [("a", "acct", "k", 40), ("b", "acct", "k", 40), ("c", "acct", "k", 40),
         ("free", "acct2", "k2", 10**9), ("anon", None, None, 5), ("bad", "acct", "k", -1),
         ("d", "acct", "k", 20)],
        "o", node_id="n",
    )  # fmt: skip
    a, b, c, free, anon, bad, d = decided
    assert a.allowed and a.reservation_id == "a" and b.allowed and d.allowed
    assert not c.allowed and c.reason == "balance"
    assert (c.spent, c.reserved, c.cap) == (0, 80, 100)
    assert free.allowed and free.reservation_id is None  # no budget: nothing reserved
    assert anon.allowed and anon.reservation_id is None
    assert isinstance(bad, ValueError)
    assert store.status("key", "k").reserved == 100
    assert {r["id"] for r in store.reservations()} == {"a", "b", "d"}


def test_an_id_already_open_fails_only_its_item(store):
    """The database refuses a duplicate id for the whole transaction; the batch is then
    reserved item by item, so only that item fails."""
    store.set("key", "k", 1000, None)
    assert store.reserve("dup", "acct", "k", 10, "o").allowed
    x, dup, y = store.reserve_many(
        [("x", "acct", "k", 10), ("dup", "acct", "k", 10), ("y", "acct", "k", 10)], "o"
    )
    assert x.allowed and y.allowed
    assert isinstance(dup, ValueError) and "already open" in str(dup)
    assert store.status("key", "k").reserved == 30


def test_batches_reservations_and_shipping_at_once_never_overshoot_nor_deadlock(pg_dsn):
    """Threads reserving in batches and one by one over overlapping principals, while rows
    ship and settle: every cap holds and no transaction deadlocks."""
    import random
    import threading

    caps = {("key", "k1"): 3000, ("key", "k2"): 2500, ("account", "a1"): 4000}
    with CentralStore(pg_dsn) as setup:
        for (scope, who), cap in caps.items():
            setup.set(scope, who, cap, None)
    store = CentralStore(pg_dsn, pool_size=6)
    errors: list[BaseException] = []
    allowed: list[tuple[str, str, str, int]] = []
    lock = threading.Lock()

    def reserving(n: int) -> None:
        rnd = random.Random(n)
        try:
            for j in range(40):
                items = [(f"t{n}-{j}-{i}", rnd.choice(["a1", "a2"]), rnd.choice(["k1", "k2"]),
                          rnd.randint(1, 60)) for i in range(rnd.randint(1, 6))]  # fmt: skip
                decided = (
                    store.reserve_many(items, "o", node_id="n")
                    if n % 2
                    else [store.reserve(*item, "o", node_id="n") for item in items]
                )
                for item, d in zip(items, decided, strict=True):
                    if isinstance(d, Exception):
                        raise d
                    if d.allowed and d.reservation_id:
                        with lock:
                            allowed.append(item)
        except BaseException as e:  # reported by the test
            errors.append(e)

    def shipping() -> None:
        rowid = 0
        try:
            while any(t.is_alive() for t in workers):
                with lock:
                    batch, allowed[:] = allowed[:], []
                rows = []
                for rid, account, key, tokens in batch:
                    rowid += 1
                    rows.append((rowid, row(rid, key=key, tokens=tokens // 2, account=account)))
                store.ship("n", rows, "m")
                time.sleep(0.005)
        except BaseException as e:  # reported by the test
            errors.append(e)

    workers = [threading.Thread(target=reserving, args=(n,)) for n in range(4)]
    shipper = threading.Thread(target=shipping)
    for t in workers:
        t.start()
    shipper.start()
    for t in [*workers, shipper]:
        t.join(60)
    store.close()
    assert not errors, errors
    with CentralStore(pg_dsn) as check:
        for (scope, who), cap in caps.items():
            status = check.status(scope, who)
            assert status.spent + status.reserved <= cap, (scope, who, status)
            assert status.spent > 0


def test_unbudgeted_principal_reserves_nothing(store):
    """A principal with no budget is admitted with no reservation row."""
    d = store.reserve("r1", "acct", "nobody", 10**9, "o")
    assert d.allowed and d.reservation_id is None
    assert store.open_reservation_count() == 0


def test_window_refusal_has_retry_after(store):
    """A rolling window refuses with the time until enough spend ages out."""
    now = time.time()
    store.set("key", "w", 100, 60, now=now - 100)
    store.ship("n", [(1, row("old", key="w", tokens=90, ts=now - 30))], "m")
    d = store.reserve("r", "acct", "w", 20, "o", now=now)
    assert not d.allowed and d.reason == "window"
    assert 29 <= d.retry_after_s <= 31


def test_the_database_refuses_an_overshooting_reservation(store, pg_dsn):
    """Written straight into PostgreSQL, a reservation over the cap fails a check."""
    store.set("account", "acct", 50, None)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO reservations (id, account, key, tokens, created_at, owner) "
            "VALUES ('a', 'acct', 'x', 40, %s, 'me')",
            (ts_from_epoch(time.time()),),
        )
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO reservations (id, account, key, tokens, created_at, owner) "
                "VALUES ('b', 'acct', 'y', 11, %s, 'me')",
                (ts_from_epoch(time.time()),),
            )


def test_ship_is_idempotent_and_counts_spend_once(store):
    """The same rows shipped twice are stored once, and spend is counted once."""
    store.set("key", "k", 10_000, None)
    batch = [(i, row(f"r{i}", tokens=10)) for i in range(1, 6)]
    assert store.ship("n", batch, "m") == 5
    assert store.ship("n", batch, "m") == 0
    assert store.count_rows() == 5
    assert store.status("key", "k").spent == 50
    assert store.shipped_rowid("n", "m") == 5
    assert store.shipped_rowid("n", "another ledger") == 0


def test_expired_lease_reservations_are_swept(store):
    """Any node's sweep releases the reservations of a node whose lease expired."""
    store.set("key", "k", 1000, None)
    store.heartbeat("dead", "dead-owner", 1)
    store.heartbeat("live", "live-owner", 30)
    store.reserve("d1", "acct", "k", 10, "dead-owner", node_id="dead")
    store.reserve("l1", "acct", "k", 10, "live-owner", node_id="live")
    time.sleep(1.3)
    assert store.sweep() == 1
    assert [r["id"] for r in store.reservations()] == ["l1"]


def test_restart_ships_then_releases_its_previous_life(store, tmp_path):
    """A restarted node ships its backlog first, then releases what its last process left."""
    store.set("key", "k", 1000, None)
    db = tmp_path / "local.db"
    with Ledger(db) as ledger:
        ledger.insert_rows([row("done", tokens=30)])  # committed, never shipped
    store.reserve("done", "acct", "k", 100, "old-pid", node_id="node")
    store.reserve("lost", "acct", "k", 100, "old-pid", node_id="node")  # no row will come
    shipper = Shipper(str(db), store, node_id="node", owner="new-pid", interval_s=0.05)
    shipper.start()
    try:
        deadline = time.monotonic() + 10
        while shipper.released_previous_life is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        shipper.close(5)
    assert shipper.released_previous_life == 1  # "done" was settled by its row
    assert store.open_reservation_count() == 0
    assert store.status("key", "k").spent == 30


def test_an_idle_shipper_reads_nothing_until_a_row_commits(store, tmp_path):
    """With nothing committed locally since its last pass, a tick costs a pragma: no pass
    (no ledger reads, no round trip); a row committed by another connection ships at the
    next tick."""
    db = tmp_path / "local.db"
    with Ledger(db) as ledger:
        ledger.insert_rows([row("first")])
    shipper = Shipper(str(db), store, node_id="node", owner="me", interval_s=0.02)
    passes: list[float] = []
    ship_once = shipper.ship_once

    def counted(ledger):
        passes.append(time.monotonic())
        return ship_once(ledger)

    shipper.ship_once = counted
    shipper.start()
    try:
        deadline = time.monotonic() + 10
        while shipper.rows_shipped < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # the passes that follow the first shipment (nothing left)
        before = len(passes)
        time.sleep(0.5)  # ~25 ticks
        assert len(passes) == before, f"{len(passes) - before} passes over an idle ledger"
        with Ledger(db) as ledger:
            ledger.insert_rows([row("second")])
        while shipper.rows_shipped < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        shipper.close(5)
    assert shipper.rows_shipped == 2
    assert len(passes) > before


def test_a_foreign_database_is_refused(pg_dsn):
    """A database with other tables and no spendtap migrations is not adopted."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    with pytest.raises(NotCentral, match="not a spendtap ledger"):
        CentralStore(pg_dsn)


def test_wrong_password_is_one_line_without_the_password(pg_server, pg_dsn):
    """A failed login says so in one line that names no password."""
    bad = pg_dsn.replace(PASSWORD, "wrong-password-123")
    with pytest.raises(CentralError) as e:
        CentralStore(bad, timeout_s=2)
    message = str(e.value)
    assert "\n" not in message and "password authentication failed" in message
    assert "wrong-password-123" not in message and PASSWORD not in message


def test_unreachable_server_makes_reserve_unavailable(pg_dsn):
    """With PostgreSQL away, reserve raises BudgetUnavailable within the timeout."""
    store = CentralStore("postgresql://spendtap:x@127.0.0.1:1/none", timeout_s=1, open_now=False)
    started = time.monotonic()
    with pytest.raises(BudgetUnavailable):
        store.reserve("r", "a", "k", 1, "o")
    assert time.monotonic() - started < 5
    decided = store.reserve_many([("r1", "a", "k", 1), ("r2", None, None, 1)], "o")
    assert isinstance(decided[0], BudgetUnavailable) and decided[1].allowed  # anonymous
    store.close()


def test_dsn_redaction_and_option():
    """The central URL's password never shows; a bad URL is refused without echoing it."""
    dsn = "postgresql://u:s3cret@db:5432/spendtap?sslmode=require&password=also"
    assert "s3cret" not in redact_dsn(dsn) and "also" not in redact_dsn(dsn)
    assert redact_dsn(dsn).startswith("postgresql://u:***@db:5432/spendtap")
    assert redact([f"spendtap_central={dsn}"]) == [f"spendtap_central={redact_dsn(dsn)}"]
    assert is_central_url(dsn) and not is_central_url("/var/lib/ledger.db")
    with pytest.raises(OptionError) as e:
        BY_NAME["spendtap_central"].validate("mysql://u:pw@h/db")
    assert "pw" not in str(e.value)


def test_a_duplicate_reservation_or_key_is_the_callers_error(store, pg_dsn):
    """The same reservation id twice is a ValueError; the same secret twice a DuplicateKey."""
    from spendtap.store.central import CentralKeys
    from spendtap.store.keys import DuplicateKey

    store.set("key", "k", 1000, None)
    store.reserve("dup", "acct", "k", 10, "o")
    with pytest.raises(ValueError, match="already open"):
        store.reserve("dup", "acct", "k", 10, "o")
    with CentralKeys(pg_dsn) as keys:
        keys.add("acct", "k", "s" * 40)
        with pytest.raises(DuplicateKey):
            keys.add("acct", "k", "s" * 40)


def test_reserve_survives_a_server_restart(pg_server, pg_dsn):
    """Pooled connections the server dropped are replaced: the first reserve after a
    restart succeeds."""
    store = CentralStore(pg_dsn, pool_size=2)
    try:
        store.set("key", "k", 10**6, None)
        assert store.reserve("before", "acct", "k", 10, "o").allowed
        pg_server.stop("fast")
        pg_server.start()
        assert store.reserve("after", "acct", "k", 10, "o").allowed
    finally:
        store.close()


def test_an_idle_pooled_connection_is_checked_only_when_the_server_said_something(
    pg_server, pg_dsn, monkeypatch
):
    """A connection idle past ``CHECK_IDLE_S`` costs no round trip while nothing arrived
    on it; after a restart (the server told it so and closed it) it is checked, found
    dead and replaced, and the reservation goes through."""
    from psycopg_pool import ConnectionPool

    from spendtap.store import central

    checks = []
    real_check = ConnectionPool.check_connection

    def counted(conn):
        checks.append(conn)
        return real_check(conn)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(counted))
    monkeypatch.setattr(central, "CHECK_IDLE_S", 0.05)
    store = CentralStore(pg_dsn, pool_size=1)
    try:
        store.set("key", "k", 10**6, None)
        for i in range(3):
            time.sleep(0.1)
            assert store.reserve(f"idle{i}", "acct", "k", 10, "o").allowed
        assert checks == []
        pg_server.stop("fast")
        pg_server.start()
        time.sleep(0.1)
        assert store.reserve("after", "acct", "k", 10, "o").allowed
        assert len(checks) >= 1
    finally:
        store.close()


def test_shipping_stuck_while_the_store_is_away(tmp_path):
    """With PostgreSQL unreachable, the backlog and lag are measured from the local ledger
    alone, errors are counted, and the shipper reports itself stuck past its limit."""
    db = tmp_path / "local.db"
    with Ledger(db) as ledger:
        ledger.insert_rows([row("a", ts=time.time() - 5), row("b")])
    store = CentralStore("postgresql://spendtap:x@127.0.0.1:1/none", timeout_s=1, open_now=False)
    shipper = Shipper(str(db), store, node_id="n", owner="o", interval_s=0.05, stuck_after_s=2)
    shipper.start()
    try:
        deadline = time.monotonic() + 10
        while shipper.ship_errors < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shipper.backlog_rows == 2
        assert shipper.lag_seconds >= 4
        assert shipper.ship_errors >= 2 and shipper.failing
        assert shipper.stuck
    finally:
        shipper.close(0.5)
        store.close()


def test_libpq_password_variables_work(pg_dsn, monkeypatch):
    """A URL without a password works with PGPASSWORD (libpq's usual ways apply)."""
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    with CentralStore(pg_dsn.replace(f":{PASSWORD}@", "@")) as store:
        assert store.migrations() == [name for name, _ in MIGRATIONS]


def test_every_ledger_column_has_a_central_column(store, pg_dsn):
    """A column added to the SQLite ledger needs its PostgreSQL migration too, or rows
    could not ship: this fails until it has one."""
    from spendtap.store.ledger import COLUMNS

    with psycopg.connect(pg_dsn) as conn:
        central = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'requests'"
            )
        }
    assert set(COLUMNS) <= central, sorted(set(COLUMNS) - central)


def test_shipping_keeps_every_value_of_a_row(store, pg_dsn):
    """Every ledger column arrives as the node wrote it (the rows travel as JSON to the
    shipping function): text with quotes and non-ASCII, large integers, floats, booleans
    and NULLs."""
    from spendtap.store.ledger import COLUMNS, normalize_row
    from tests.helpers import ledger_row

    full = ledger_row(
        "r-full", ts=ts_from_epoch(time.time()), account='acct "quoted"', key="k\u00e9\u4e2d",
        error="upstream said \\ no\nreally", cached_tokens=3, cache_creation_tokens=2**40,
        reasoning_tokens=0, cost_nusd=123_456_789_012, price_source="table",
        server_prompt_s=0.125, server_decode_s=1e-7, tokens_per_s=33.333333333333336,
    )  # fmt: skip
    sparse = {"id": "r-sparse", "ts": ts_from_epoch(time.time()), "outcome": "upstream_error",
              "streamed": False}  # fmt: skip
    assert store.ship("n", [(1, full), (2, sparse)], "m") == 2
    with psycopg.connect(pg_dsn) as conn:
        cur = conn.execute(f"SELECT {', '.join(COLUMNS)}, shipped_from FROM requests ORDER BY id")
        got = [dict(zip([*COLUMNS, "shipped_from"], r, strict=True)) for r in cur]
    for want, have in zip((full, sparse), got, strict=True):
        expected = normalize_row(want)
        expected["streamed"] = None if expected["streamed"] is None else bool(expected["streamed"])
        assert have == {**expected, "shipped_from": "n"}


def test_the_shipping_function_inserts_every_ledger_column():
    """The shipping function lists its columns (a migration's text is frozen): a column
    added to the ledger needs a migration that replaces it. This fails until it has one."""
    from spendtap.store import central
    from spendtap.store.ledger import COLUMNS

    shipping = [m for m in central.MIGRATIONS if "spendtap_ship(" in m[1]][-1][1]
    listed = shipping.split("INSERT INTO requests (")[1].split(")")[0]
    assert [c.strip() for c in listed.split(",") if c.strip()] == [*COLUMNS, "shipped_from"]


def test_summing_open_reservations_skips_settled_ones(store, pg_dsn):
    """Settled reservations leave dead index entries until a vacuum; the sum of a
    principal's open reservations (four a reservation, under its budget locks) must not
    walk them again on every call (a bitmap scan does: its index reads grow with the
    traffic since the last vacuum)."""
    store.set("key", "k", 10**9, None)
    for i in range(1500):
        assert store.reserve(f"r{i}", "acct", "k", 10, "o", node_id="n").allowed
        assert store.release(f"r{i}")
    assert store.reserve("open", "acct", "k", 7, "o", node_id="n").allowed

    def index_reads() -> tuple[int, int]:
        with psycopg.connect(pg_dsn) as conn:  # one transaction: its own counters
            (reserved,) = conn.execute(
                "SELECT spendtap_reserved(b) FROM budgets b WHERE scope = 'key'"
            ).fetchone()
            (reads,) = conn.execute(
                "SELECT pg_stat_get_xact_tuples_returned('reservations_key'::regclass)"
            ).fetchone()
            return reserved, reads

    index_reads()  # the first scan after the traffic meets the dead entries
    reserved, reads = index_reads()
    assert reserved == 7
    assert reads < 100, f"{reads} index entries read to sum one open reservation"


def test_a_reservation_is_checked_once_and_any_other_insert_still_is(store, pg_dsn):
    """``spendtap_reserve`` checks a reservation's budgets under their locks; the insert
    trigger does not sum the open reservations again for it, and still checks every
    other insert (a marker naming another reservation does not let one through)."""
    store.set("account", "acct", 100, None)
    store.set("key", "k", 100, None)
    with psycopg.connect(pg_dsn) as conn:  # one transaction: its own function counters
        conn.execute("SET LOCAL track_functions = 'pl'")
        at = ts_from_epoch(time.time())
        for rid in ("a", "b"):
            (allowed,) = conn.execute(
                "SELECT allowed FROM spendtap_reserve(%s, 'acct', 'k', 30, %s, 'o', 'n')",
                (rid, at),
            ).fetchone()
            assert allowed
        (sums,) = conn.execute(
            "SELECT pg_stat_get_xact_function_calls('spendtap_reserved(budgets)'::regprocedure)"
        ).fetchone()
        assert sums == 4, f"{sums} sums of open reservations for 2 reservations of 2 budgets"
        conn.execute("SELECT set_config('spendtap.checked_reservation', 'a', true)")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO reservations (id, account, key, tokens, created_at, owner) "
                "VALUES ('c', 'acct', 'k', 41, %s, 'me')",
                (at,),
            )


def test_a_shipment_moves_each_balance_once_and_by_exactly_its_rows(store, pg_dsn):
    """The balances' running totals move once a statement: each budget by the tokens of
    the new rows of its principal at or after its ``since``; rows shipped again, rows of
    no budget and rows before a budget's ``since`` move nothing."""
    t0 = time.time()
    store.set("key", "k1", 10**9, None, now=t0 - 100)
    store.set("key", "k2", 10**9, None, now=t0 - 100)
    store.set("account", "acct", 10**9, None, now=t0 - 100)
    store.set("account", "late", 10**9, None, now=t0)  # counts from t0 on
    rows = [
        row("a", key="k1", tokens=10, ts=t0 - 50),
        row("b", key="k2", tokens=7, ts=t0 - 10),
        row("c", key="k1", tokens=0, ts=t0 - 5),
        row("d", key="free", tokens=5, ts=t0 - 1, account="late"),  # before late's since
        row("e", key="free", tokens=4, ts=t0 + 1, account="late"),
        row("f", key="k2", tokens=3, ts=t0 + 2, account=None),
    ]
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET LOCAL track_functions = 'pl'")
        shipped = conn.execute(
            "SELECT spendtap_ship('n', 'm', 6, %s, %s, %s, %s)",
            (["free", "k1", "k2"], ["acct", "late"], [r["id"] for r in rows],
             psycopg.types.json.Jsonb(rows)),
        ).fetchone()[0]  # fmt: skip
        (calls,) = conn.execute(
            "SELECT pg_stat_get_xact_function_calls('spendtap_rows_spend()'::regprocedure)"
        ).fetchone()
    assert (shipped, calls) == (6, 1)
    assert store.ship("n", [(1, rows[0]), (7, row("g", key="k1", tokens=2))], "m") == 1
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # and a plain INSERT of two
        conn.execute(
            "INSERT INTO requests (id, ts, account, key, prompt_tokens, completion_tokens) "
            "VALUES ('h', %s, 'acct', 'k2', 1, 1), ('i', %s, 'late', 'k1', NULL, 6)",
            (ts_from_epoch(t0 + 3), ts_from_epoch(t0 + 4)),
        )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        balances = {(sc, p): n for sc, p, n in conn.execute(
            "SELECT scope, principal, spent_since FROM budgets")}  # fmt: skip
    assert balances == {
        ("key", "k1"): 10 + 2 + 6,
        ("key", "k2"): 7 + 3 + 2,
        ("account", "acct"): 10 + 7 + 2 + 2,
        ("account", "late"): 4 + 6,
    }


def test_a_store_at_the_first_migration_is_brought_up_to_date(pg_dsn):
    """A fleet database created before the shipping function (m001 only) gets it from the
    first sidecar that opens it, and ships through it."""
    from spendtap.store import central

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {central.MIGRATIONS_TABLE} (name TEXT PRIMARY KEY, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")  # fmt: skip
        conn.execute(central.M001_INITIAL)
        conn.execute(f"INSERT INTO {central.MIGRATIONS_TABLE} (name) VALUES ('m001_initial')")
    with CentralStore(pg_dsn, create=False) as store:
        assert store.migrations() == [name for name, _ in MIGRATIONS]
        store.set("key", "k", 1000, None)
        assert store.reserve("r1", "acct", "k", 100, "o", node_id="n").allowed
        assert store.ship("n", [(1, row("r1", tokens=30))], "m") == 1
        status = store.status("key", "k")
        assert (status.spent, status.reserved) == (30, 0)


def test_the_fleet_answers_reading_queries_as_a_node_ledger_does(store, tmp_path):
    """One query builder serves both stores: the same rows give the same spend series
    (refused requests counted too), report, count and time span."""
    t0 = 1_750_000_000.0
    rows = [
        row("a", key="k1", tokens=10, ts=t0),
        row("b", key="k1", tokens=30, ts=t0 + 4000, cost_nusd=7),
        row("c", key="k2", tokens=0, ts=t0 + 10, outcome="rejected", usage_source="none"),
        row("d", key=None, tokens=4, ts=t0 + 20, outcome="upstream_error"),
    ]
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.insert_rows(rows)
        store.ship("n", list(enumerate(rows, 1)), "m")
        for metric in ("tokens", "cost"):
            series = ledger.spend_series("key", 3600, metric=metric)
            assert store.spend_series("key", 3600, metric=metric) == series
        assert any(s["refused"] == 1 for s in series)
        for by in ("key", "outcome", "hour"):
            assert store.report(by) == ledger.report(by)
        assert store.count(key="k1") == ledger.count(key="k1") == 2
        assert store.time_span(since=ts_from_epoch(t0 + 5)) == ledger.time_span(
            since=ts_from_epoch(t0 + 5)
        )
