"""The SQLite ledger: schema, migrations, inserts, queries, reports, and bad files."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest
import sqlite_utils
from hypothesis import given, settings
from hypothesis import strategies as st

from spendtap.store.ledger import (
    COLUMNS,
    MIGRATIONS,
    Ledger,
    LedgerBusy,
    LedgerError,
    LedgerNotFound,
    NotALedger,
    normalize_row,
    run_migrations,
)
from tests.helpers import ledger_row


@pytest.fixture
def memory_ledger():
    ledger = Ledger(sqlite_utils.Database(memory=True))
    yield ledger
    ledger.close()


@pytest.fixture(params=["memory", "file"])
def ledger(request, tmp_path):
    if request.param == "memory":
        lg = Ledger(sqlite_utils.Database(memory=True))
    else:
        lg = Ledger(tmp_path / "ledger.db")
    yield lg
    lg.close()


# -- migrations and opening ---------------------------------------------------


def test_new_file_is_created_and_migrated(tmp_path):
    """Ledger(path) creates the file (and its directory) with the schema, WAL and indexes."""
    path = tmp_path / "sub" / "dir" / "ledger.db"
    with Ledger(path) as ledger:
        assert path.exists()
        assert ledger.db.journal_mode == "wal"
        assert ledger.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert ledger.db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert tuple(ledger.db["requests"].columns_dict) == COLUMNS
        assert ledger.db["requests"].pks == ["id"]
        indexes = {tuple(i.columns)[:2] for i in ledger.db["requests"].indexes}
        assert {("ts",), ("account", "ts"), ("key", "ts"), ("model", "ts")} <= indexes


def test_schema_column_types(memory_ledger):
    """Each column has its declared SQLite type."""
    types = {c.name: c.type for c in memory_ledger.db["requests"].columns}
    assert types["id"] == "TEXT"
    assert types["streamed"] == "INTEGER"
    assert types["ttft_s"] == "REAL"
    assert types["prompt_tokens"] == "INTEGER"
    assert types["response_bytes"] == "INTEGER"


def test_reopen_keeps_data(tmp_path):
    """Closing and reopening a ledger file keeps its rows."""
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        ledger.insert_rows([ledger_row("a"), ledger_row("b")])
    with Ledger(path) as ledger:
        assert ledger.count() == 2
    with Ledger.open_existing(path) as ledger:
        assert [r["id"] for r in ledger.requests()] == ["b", "a"]


def test_migrations_recorded_once(tmp_path):
    """Each migration is recorded once by name, however often the ledger is opened."""
    path = tmp_path / "ledger.db"
    for _ in range(3):
        Ledger(path).close()
    with Ledger.open_existing(path) as ledger:
        names = [r[0] for r in ledger.db.execute("SELECT name FROM _spendtap_migrations")]
    assert names == [m.__name__ for m in MIGRATIONS]
    assert names[0] == "m001_requests"


def test_run_migrations_applies_only_new_ones(memory_ledger):
    """A second migration list (another module's tables) applies once and keeps order."""
    calls = []

    def test_m001_extra(db):
        calls.append("m001")
        db.execute("CREATE TABLE extra (x INTEGER)")

    assert run_migrations(memory_ledger.db, [test_m001_extra]) == ["test_m001_extra"]
    assert run_migrations(memory_ledger.db, [test_m001_extra]) == []
    assert calls == ["m001"]
    assert "extra" in memory_ledger.db.table_names()


def test_failed_migration_rolls_back(tmp_path):
    """A migration that fails leaves neither its tables nor its record behind."""

    def test_m001_broken(db):
        db.execute("CREATE TABLE half (x INTEGER)")
        raise RuntimeError("boom")

    with Ledger(tmp_path / "ledger.db") as ledger:
        with pytest.raises(RuntimeError):
            run_migrations(ledger.db, [test_m001_broken])
        assert "half" not in ledger.db.table_names()
        assert run_migrations(ledger.db, []) == []


def test_text_file_is_not_a_ledger(tmp_path):
    """A text file raises NotALedger for writers and readers, and is left as it was."""
    path = tmp_path / "notes.txt"
    content = "these are not the rows you are looking for\n" * 20
    path.write_text(content)
    with pytest.raises(NotALedger, match="is not a spendtap ledger: file is not a database"):
        Ledger(path)
    with pytest.raises(NotALedger, match="is not a spendtap ledger"):
        Ledger.open_existing(path)
    assert path.read_text() == content


def test_foreign_sqlite_is_not_a_ledger(tmp_path):
    """An SQLite database without the migrations table is refused, not adopted."""
    path = tmp_path / "other.db"
    foreign = sqlite_utils.Database(path)
    foreign["dogs"].insert({"name": "Cleo"})
    foreign.close()
    with pytest.raises(NotALedger, match="without spendtap's migrations table"):
        Ledger(path)
    with pytest.raises(NotALedger, match="without spendtap's migrations table"):
        Ledger.open_existing(path)
    foreign = sqlite_utils.Database(path)  # sqlite-utils 3 has no context manager
    try:
        assert foreign.table_names() == ["dogs"]
    finally:
        foreign.close()


def test_empty_file_is_not_a_ledger_for_readers(tmp_path):
    """A zero-byte file is refused by readers, and becomes a ledger only for the writer."""
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(NotALedger, match="an empty database"):
        Ledger.open_existing(path)
    with Ledger(path) as ledger:
        assert ledger.count() == 0


def test_directory_is_not_a_ledger(tmp_path):
    """A directory at the ledger path is a clear error."""
    with pytest.raises(NotALedger, match="is a directory"):
        Ledger.open_existing(tmp_path)
    with pytest.raises(NotALedger, match="is a directory"):
        Ledger(tmp_path)


def test_missing_file_is_not_created_by_readers(tmp_path):
    """open_existing on a missing path raises LedgerNotFound and creates nothing."""
    path = tmp_path / "nope" / "ledger.db"
    with pytest.raises(LedgerNotFound, match="ledger not found"):
        Ledger.open_existing(path)
    assert not path.exists()
    assert not path.parent.exists()
    assert list(tmp_path.iterdir()) == []


def test_exception_hierarchy():
    """LedgerNotFound and NotALedger are LedgerErrors."""
    assert issubclass(LedgerNotFound, LedgerError)
    assert issubclass(NotALedger, LedgerError)


# -- inserting ------------------------------------------------------------------


def test_insert_is_idempotent_on_id(ledger):
    """A row re-inserted with the same id is ignored, never duplicated or overwritten."""
    assert ledger.insert_rows([ledger_row("a"), ledger_row("b")]) == 2
    assert ledger.insert_rows([ledger_row("a", prompt_tokens=999), ledger_row("c")]) == 1
    assert ledger.count() == 3
    assert next(ledger.requests(account="acme", limit=1, order="asc"))["prompt_tokens"] == 10


def test_insert_is_one_transaction(ledger):
    """A batch with an invalid row writes nothing at all."""
    with pytest.raises(ValueError, match="outcome must be one of"):
        ledger.insert_rows([ledger_row("a"), ledger_row("b", outcome="exploded")])
    assert ledger.count() == 0


def test_insert_round_trips_every_column(ledger):
    """Every column comes back as written, streamed as a bool, missing ones as None."""
    full = ledger_row(
        "x",
        cached_tokens=3,
        cache_creation_tokens=2,
        reasoning_tokens=1,
        error="upstream said no",
    )
    ledger.insert_rows([full, {"id": "y", "ts": "2025-01-31T12:00:01.000Z"}])
    got = {r["id"]: r for r in ledger.requests()}
    assert got["x"] == {c: full.get(c) for c in COLUMNS} | {"cost_usd": None}
    assert got["x"]["streamed"] is True
    assert got["y"] == {c: None for c in (*COLUMNS, "cost_usd")} | {
        "id": "y",
        "ts": "2025-01-31T12:00:01.000Z",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-01-31T12:00:00.123Z", "2025-01-31T12:00:00.123Z"),
        ("2025-01-31T14:00:00+02:00", "2025-01-31T12:00:00.000Z"),
        (datetime(2025, 1, 31, 12, 0, 0, 999999, tzinfo=UTC), "2025-01-31T12:00:00.999Z"),
        (1738324800.25, "2025-01-31T12:00:00.250Z"),
    ],
)
def test_ts_is_normalized(value, expected):
    """Any accepted timestamp is stored as fixed-width UTC text with milliseconds."""
    assert normalize_row({"id": "a", "ts": value})["ts"] == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"id": "", "ts": "2025-01-31"}, "non-empty text id"),
        ({"id": "a"}, "needs a ts"),
        ({"id": "a", "ts": "2025-01-31", "body": "secret"}, "unknown ledger column"),
        ({"id": "a", "ts": "2025-01-31", "prompt_tokens": "12"}, "must be an integer"),
        ({"id": "a", "ts": "2025-01-31", "prompt_tokens": True}, "must be an integer"),
        ({"id": "a", "ts": "2025-01-31", "usage_source": "guess"}, "usage_source must be"),
        ({"id": "a", "ts": "yesterday"}, "invalid time"),
    ],
)
def test_normalize_row_refuses_bad_rows(fields, message):
    """A row with a missing, unknown or mistyped column is refused with a precise message."""
    with pytest.raises((ValueError, TypeError), match=message):
        normalize_row(fields)


def test_error_is_one_short_line():
    """The error column keeps only the first line, cut to 200 characters."""
    out = normalize_row({"id": "a", "ts": "2025-01-31", "error": "x" * 500 + "\nsecond line"})
    assert out["error"] == "x" * 200


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "id": st.text(min_size=1, max_size=20),
                "ts": st.datetimes(
                    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)
                ).map(lambda d: d.replace(tzinfo=UTC)),
                "account": st.none() | st.text(max_size=10),
                "prompt_tokens": st.none() | st.integers(0, 2**40),
                "completion_tokens": st.none() | st.integers(0, 2**40),
                "ttft_s": st.none() | st.floats(0, 1e6),
                "streamed": st.none() | st.booleans(),
            }
        ),
        max_size=20,
    )
)
def test_rows_round_trip(rows):
    """Any valid rows come back as written (first of each id wins), ts in ledger form."""
    with Ledger(sqlite_utils.Database(memory=True)) as ledger:
        ledger.insert_rows(rows)
        got = {r["id"]: r for r in ledger.requests()}
    first: dict = {}
    for r in rows:
        first.setdefault(r["id"], r)
    assert set(got) == set(first)
    for rid, r in first.items():
        assert got[rid]["ts"] == normalize_row(r)["ts"]
        for name in ("account", "prompt_tokens", "completion_tokens", "ttft_s", "streamed"):
            assert got[rid][name] == r[name]


# -- querying ----------------------------------------------------------------------


@pytest.fixture
def sample(ledger):
    ledger.insert_rows(
        [
            ledger_row("r1", "2025-01-30T23:59:59.999Z", account="acme", key="k1", model="m1"),
            ledger_row("r2", "2025-01-31T00:00:00.000Z", account="acme", key="k2", model="m2"),
            ledger_row(
                "r3",
                "2025-01-31T01:30:00.000Z",
                account="beta",
                key="k3",
                model="m1",
                node="n2",
                outcome="upstream_error",
                status=502,
                prompt_tokens=None,
                completion_tokens=None,
                usage_source="none",
                ttft_s=None,
                tokens_per_s=None,
            ),
            ledger_row(
                "r4",
                "2025-01-31T01:45:00.000Z",
                account=None,
                key=None,
                model="m2",
                prompt_tokens=7,
                completion_tokens=None,
                cached_tokens=4,
                ttft_s=1.5,
            ),
        ]
    )
    return ledger


def ids(rows) -> list[str]:
    return [r["id"] for r in rows]


def test_requests_newest_first(sample):
    """Rows come newest first by default and oldest first with order='asc'."""
    assert ids(sample.requests()) == ["r4", "r3", "r2", "r1"]
    assert ids(sample.requests(order="asc")) == ["r1", "r2", "r3", "r4"]
    assert ids(sample.requests(limit=2)) == ["r4", "r3"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"account": "acme"}, ["r2", "r1"]),
        ({"key": "k3"}, ["r3"]),
        ({"model": "m2"}, ["r4", "r2"]),
        ({"node": "n2"}, ["r3"]),
        ({"outcome": "upstream_error"}, ["r3"]),
        ({"since": "2025-01-31T00:00:00.000Z"}, ["r4", "r3", "r2"]),
        ({"until": "2025-01-31T00:00:00.000Z"}, ["r1"]),
        ({"since": "2025-01-31", "until": "2025-01-31T01:45:00Z"}, ["r3", "r2"]),
        ({"since": datetime(2025, 1, 31, 1, 0, tzinfo=UTC)}, ["r4", "r3"]),
        ({"account": "acme", "model": "m1"}, ["r1"]),
        ({"account": "nobody"}, []),
    ],
)
def test_requests_filters(sample, filters, expected):
    """Each filter narrows the rows; since is inclusive and until exclusive."""
    assert ids(sample.requests(**filters)) == expected
    assert sample.count(**filters) == len(expected)


def test_requests_after_rowid(sample):
    """after_rowid returns only rows inserted later, in insertion order, with their rowid."""
    rows = list(sample.requests(order="asc", include_rowid=True))
    second = rows[1]["rowid"]
    later = list(sample.requests(after_rowid=second, order="asc", include_rowid=True))
    assert ids(later) == ["r3", "r4"]
    assert all(r["rowid"] > second for r in later)


def test_requests_refuses_bad_arguments(sample):
    """A bad order, limit or outcome is a ValueError, raised at the call."""
    with pytest.raises(ValueError, match="order"):
        sample.requests(order="sideways")
    with pytest.raises(ValueError, match="limit"):
        sample.requests(limit=-1)
    with pytest.raises(ValueError, match="outcome"):
        sample.requests(outcome="exploded")
    with pytest.raises(ValueError, match="invalid time"):
        sample.requests(since="last tuesday")


# -- reports -------------------------------------------------------------------


FIGURES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "total_tokens",
    "errors",
    "refused",
    "usage_missing",
    "avg_ttft_s",
    "avg_tokens_per_s",
    "unpriced",
    "cost_usd",
    "avg_cost_usd",
)


def test_report_by_account(sample):
    """Totals per account, biggest first, anonymous rows under None."""
    report = sample.report("account")
    assert [tuple(r) for r in report] == [("account", *FIGURES)] * 3
    assert report == [
        {
            "account": "acme",
            "requests": 2,
            "prompt_tokens": 20,
            "completion_tokens": 10,
            "cached_tokens": None,
            "cache_creation_tokens": None,
            "reasoning_tokens": None,
            "total_tokens": 30,
            "errors": 0,
            "refused": 0,
            "usage_missing": 0,
            "avg_ttft_s": 0.5,
            "avg_tokens_per_s": 10.0,
            "unpriced": 0,
            "cost_usd": None,
            "avg_cost_usd": None,
        },
        {
            "account": None,
            "requests": 1,
            "prompt_tokens": 7,
            "completion_tokens": None,
            "cached_tokens": 4,
            "cache_creation_tokens": None,
            "reasoning_tokens": None,
            "total_tokens": 7,
            "errors": 0,
            "refused": 0,
            "usage_missing": 0,
            "avg_ttft_s": 1.5,
            "avg_tokens_per_s": 10.0,
            "unpriced": 0,
            "cost_usd": None,
            "avg_cost_usd": None,
        },
        {
            "account": "beta",
            "requests": 1,
            "prompt_tokens": None,
            "completion_tokens": None,
            "cached_tokens": None,
            "cache_creation_tokens": None,
            "reasoning_tokens": None,
            "total_tokens": None,
            "errors": 1,
            "refused": 0,
            "usage_missing": 1,
            "avg_ttft_s": None,
            "avg_tokens_per_s": None,
            "unpriced": 0,
            "cost_usd": None,
            "avg_cost_usd": None,
        },
    ]


def test_report_keeps_refusals_out_of_errors_and_no_usage(tmp_path):
    """Refused requests (and an SDK's retries of them) count as refused, never as errors
    nor as usage missing: no_usage stays the metering gap an operator watches."""
    rows = []
    for i, (outcome, status, source) in enumerate(
        [
            ("completed", 200, "reported"),
            ("completed", 200, "none"),  # a real metering gap
            ("upstream_error", 502, "none"),
            ("client_disconnected", None, "estimated"),
            ("rejected", 429, "none"),  # a refusal and two SDK retries of it
            ("rejected", 429, "none"),
            ("rejected", 429, "none"),
            ("rejected", 401, "none"),
        ]
    ):
        rows.append(
            {"id": f"r{i}", "ts": f"2025-01-01T00:00:0{i}.000Z", "account": "a", "key": "k",
             "model": "m", "node": "n", "api": "openai-chat", "method": "POST",
             "path": "/v1/chat/completions", "streamed": False, "status": status,
             "outcome": outcome, "usage_source": source, "duration_s": 0.1,
             "prompt_tokens": 5 if source == "reported" else None}
        )  # fmt: skip
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.insert_rows(rows)
        (report,) = ledger.report("account")
        assert (report["requests"], report["errors"], report["refused"]) == (8, 2, 4)
        assert report["usage_missing"] == 2  # the gap and the 502, not the refusals
        (by_key,) = ledger.report("key", outcome="rejected")
        assert by_key["refused"] == 4 and by_key["errors"] == 0 and by_key["usage_missing"] == 0
        series = ledger.spend_series("account", 3600)
        assert sum(r["refused"] for r in series) == 4


def test_report_null_semantics(sample):
    """A sum is None when no row reported the figure, else the sum of those that did."""
    by_model = {r["model"]: r for r in sample.report("model")}
    # m1: r1 reported 10/5, r3 reported nothing: the sum is r1's, not None and not 0.
    assert by_model["m1"]["prompt_tokens"] == 10
    assert by_model["m1"]["usage_missing"] == 1
    # m2: r4 reported a prompt but no completion: 5 (r2) + nothing.
    assert by_model["m2"]["completion_tokens"] == 5
    assert by_model["m2"]["total_tokens"] == 10 + 5 + 7
    assert by_model["m2"]["cached_tokens"] == 4
    assert by_model["m2"]["avg_ttft_s"] == 1.0


def test_report_by_day_and_hour(sample):
    """Day and hour groups come from ts, in time order, in UTC."""
    days = sample.report("day")
    assert [(r["day"], r["requests"]) for r in days] == [("2025-01-30", 1), ("2025-01-31", 3)]
    hours = sample.report("hour")
    assert [(r["hour"], r["requests"]) for r in hours] == [
        ("2025-01-30T23:00:00Z", 1),
        ("2025-01-31T00:00:00Z", 1),
        ("2025-01-31T01:00:00Z", 2),
    ]


def test_report_filters(sample):
    """Report takes the same time and principal filters as requests."""
    report = sample.report("key", since="2025-01-31", account="acme")
    assert [(r["key"], r["requests"]) for r in report] == [("k2", 1)]
    assert sample.report("node", since="2030-01-01") == []


def test_report_refuses_unknown_grouping(sample):
    """An unknown 'by' is a ValueError naming the choices."""
    with pytest.raises(ValueError, match="by must be one of account, key, model, node, api, path"):
        sample.report("week")


def test_reader_sees_writer_commits(tmp_path):
    """A reader opened with open_existing sees rows another connection commits later."""
    path = tmp_path / "ledger.db"
    with Ledger(path) as writer, Ledger.open_existing(path) as reader:
        assert reader.count() == 0
        writer.insert_rows([ledger_row("a")])
        assert reader.count() == 1


def test_locked_insert_raises_ledger_busy(tmp_path):
    """An insert that cannot get the write lock within the busy timeout raises LedgerBusy
    (SQLite's own error as its cause, its message unchanged), writing nothing."""
    path = tmp_path / "ledger.db"
    with Ledger(path, busy_timeout_s=0.05) as ledger:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(LedgerBusy, match=r"^database is locked$") as raised:
                ledger.insert_rows([ledger_row("a")])
            assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert ledger.count() == 0
        ledger.insert_rows([ledger_row("a")])
        assert ledger.count() == 1


def _reserve(path, flow_id: str) -> None:
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute(
            "INSERT INTO reservations (id, account, key, tokens, created_at, owner) "
            "VALUES (?, 'acme', 'k1', 100, '2025-01-31T12:00:00.000Z', 'test')",
            (flow_id,),
        )


def test_an_autocommit_batch_is_one_statement_that_settles(tmp_path):
    """The writer's connection (autocommit) inserts a batch with one statement, and the
    settle trigger drops each row's reservation in it: nothing else runs, no BEGIN/COMMIT."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    ledger.db.conn.isolation_level = None
    for flow_id in ("a", "b"):
        _reserve(path, flow_id)
    statements: list[str] = []
    ledger.db.conn.set_trace_callback(statements.append)
    assert ledger.insert_rows([ledger_row("a"), ledger_row("b"), ledger_row("c")]) == 3
    ledger.db.conn.set_trace_callback(None)
    # sqlite3 traces each trigger step under its statement's text: one distinct text.
    assert {s.partition(" VALUES")[0] for s in statements} == {
        f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)})"
    }
    assert ledger.db.conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0
    ledger.close()


def test_a_ledger_from_before_the_settle_trigger_gets_it(tmp_path):
    """A ledger migrated up to m006 gains m007 on open; its rows then settle as before."""
    path = tmp_path / "ledger.db"
    db = sqlite_utils.Database(path)
    db.enable_wal()
    run_migrations(db, [m for m in MIGRATIONS if m.__name__ != "m007_settle_trigger"])
    db.close()
    _reserve(path, "a")
    ledger = Ledger(path)
    assert "m007_settle_trigger" in {
        r[0] for r in ledger.db.conn.execute("SELECT name FROM _spendtap_migrations")
    }
    ledger.insert_rows([ledger_row("a")])
    assert ledger.db.conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0
    ledger.close()
