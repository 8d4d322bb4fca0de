"""tail (following the ledger live), export (streaming a range) and report --chart."""

from __future__ import annotations

import csv
import io
import json
import threading
import time

import pytest

from spendtap.cli.chart import choose_bucket, render_chart
from spendtap.store.ledger import ROW_FIELDS, Ledger
from spendtap.timeparse import parse_datetime, ts_from_epoch
from tests.helpers import invoke, usage_error

T0 = parse_datetime("2025-01-31T12:00:00Z").timestamp()


def make_row(i: int, ts: float, **fields) -> dict:
    return {
        "id": f"r{i:03d}",
        "ts": ts_from_epoch(ts),
        "account": "acme" if i % 2 else "beta",
        "key": f"k{i % 3}",
        "model": "m1",
        "outcome": "completed",
        "prompt_tokens": 10 * i,
        "completion_tokens": i,
        "usage_source": "reported",
    } | fields


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        ledger.insert_rows([make_row(i, T0 + 60 * i) for i in range(1, 7)])
    return path


# -- tail -----------------------------------------------------------------------------


def test_tail_once_shows_the_last_rows_in_order(db):
    """tail -n N --once prints the last N rows, oldest first, with every column in jsonl."""
    result = invoke("tail", "-n", "3", "--once", "-f", "jsonl", db=db)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["id"] for r in rows] == ["r004", "r005", "r006"]
    assert list(rows[0]) == list(ROW_FIELDS)


def test_tail_filters(db):
    """tail takes the filters of requests."""
    result = invoke("tail", "--account", "acme", "--once", "-f", "jsonl", db=db)
    assert [json.loads(x)["id"] for x in result.output.splitlines()] == ["r001", "r003", "r005"]
    result = invoke("tail", "--key", "k0", "--model", "m1", "--once", "-f", "json", db=db)
    assert [r["id"] for r in json.loads(result.output)] == ["r003", "r006"]


def test_tail_follows_new_rows(db):
    """tail -n 0 prints rows as they land, and stops after --max-rows."""

    def writer():
        time.sleep(0.3)
        with Ledger(db) as ledger:
            for i in range(7, 10):
                ledger.insert_rows([make_row(i, T0 + 60 * i)])
                time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    started = time.monotonic()
    result = invoke("tail", "-n", "0", "--interval", "0.05", "--max-rows", "3",
                 "--timeout", "20", "-f", "csv", db=db)  # fmt: skip
    thread.join()
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["id"] for r in rows] == ["r007", "r008", "r009"]
    assert time.monotonic() - started < 20


def test_tail_timeout_closes_json(db):
    """A tail stopped by --timeout still prints a well-formed JSON array."""
    result = invoke(
        "tail", "-n", "1", "--interval", "0.05", "--timeout", "0.2", "-f", "json", db=db
    )
    assert result.exit_code == 0
    assert [r["id"] for r in json.loads(result.output)] == ["r006"]


def test_tail_table_streams_header_once(db):
    """The table format prints its header once and one aligned line per row."""
    lines = invoke("tail", "-n", "2", "--once", db=db).output.splitlines()
    assert lines[0].split()[:3] == ["ts", "account", "key"]
    assert len(lines) == 3
    assert lines[1].startswith(ts_from_epoch(T0 + 300))
    assert len({line.index("completed") for line in lines[1:]}) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tail", "-n", "-1"], "Invalid value for '-n' / '--lines': -1 is not in the range 0<="),
        (["tail", "--max-rows", "-2"], "Invalid value for '--max-rows': -2 is not in the range"),
        (["tail", "--outcome", "bad"], "'bad' is not one of"),
    ],
)
def test_tail_errors(db, args, message):
    """Bad tail options are click's usage errors, exit 2."""
    assert message in usage_error(invoke(*args, db=db))


def test_tail_needs_a_ledger(tmp_path):
    """tail never creates a ledger."""
    result = invoke("tail", "--once", db=tmp_path / "none.db")
    assert result.exit_code == 1 and "no ledger at" in result.output


# -- export -------------------------------------------------------------------------------


def test_export_jsonl_range(db):
    """export streams the rows of a range oldest first, since inclusive, until exclusive."""
    since, until = ts_from_epoch(T0 + 120), ts_from_epoch(T0 + 300)
    result = invoke("export", "--since", since, "--until", until, db=db)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["id"] for r in rows] == ["r002", "r003", "r004"]
    assert list(rows[0]) == list(ROW_FIELDS)
    assert "exporting" not in result.output


def test_export_csv_and_filters(db):
    """export -f csv writes a header and every column; filters apply."""
    result = invoke("export", "-f", "csv", "--account", "beta", db=db)
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["id"] for r in rows] == ["r002", "r004", "r006"]
    assert rows[0]["prompt_tokens"] == "20" and rows[0]["cached_tokens"] == ""


def test_export_progress_goes_to_stderr(db):
    """A forced progress bar is drawn on stderr, never mixed into the rows."""
    result = invoke("export", "--progress", db=db)
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 6
    assert all(line.startswith("{") for line in result.stdout.splitlines())
    assert "exporting" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "-f", "table"], "'table' is not one of 'jsonl', 'csv'"),
        (["export", "--since", "yesterday"], "Invalid value for '--since'"),
        (["export", "--since", "1h", "--until", "2h"], "must be later than --since"),
    ],
)
def test_export_errors(db, args, message):
    """Bad export options are click's usage errors, exit 2."""
    assert message in usage_error(invoke(*args, db=db))


# -- report --chart -------------------------------------------------------------------------


def test_report_chart(db):
    """report --chart draws one sparkline per principal, heaviest first, on one scale."""
    result = invoke("report", "--chart", db=db)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        "tokens per account, one mark per 1m, 2025-01-31T12:01Z to 2025-01-31T12:07Z"
    )
    assert lines[1] == "beta  | \u2583 \u2586 \u2588|  132"
    assert lines[2] == "acme  |\u2582 \u2584 \u2587 |  99"
    assert lines[3] == "       scale: full mark = 66 tokens"


def test_report_chart_ascii_and_by_key(db):
    """--ascii draws with plain characters; --by key charts keys."""
    result = invoke("report", "--chart", "--ascii", "--by", "key", db=db)
    assert result.exit_code == 0
    assert all(ord(c) < 128 for c in result.output)
    assert [line.split()[0] for line in result.output.splitlines()[1:4]] == ["k0", "k2", "k1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--chart", "-f", "json"], "does not take --format"),
        (["report", "--chart", "--by", "day"], "per account, key, model or node"),
        (["report", "--ascii"], "--ascii only applies to --chart"),
    ],
)
def test_report_chart_errors(db, args, message):
    """Conflicting chart options are click's usage errors, exit 2."""
    assert message in usage_error(invoke(*args, db=db))


def test_report_chart_empty_range(db):
    """A range without rows says so."""
    result = invoke("report", "--chart", "--since", "2020-01-01", "--until", "2020-01-02", db=db)
    assert result.exit_code == 0
    assert result.output.splitlines()[-1] == "(no spend in this range)"


def test_render_chart_folds_the_tail_and_buckets():
    """Past the top groups the rest fold into one line; bucket sizes fit the width."""
    series = [{"account": f"a{i}", "bucket": 0, "value": i + 1} for i in range(5)]
    lines = render_chart(series, "account", 0, 60, 60, top=2)
    assert [line.split()[0] for line in lines[1:4]] == ["a4", "a3", "(other"]
    assert choose_bucket(3600) == 60
    assert choose_bucket(86400) == 1800 or choose_bucket(86400) == 3600
    assert choose_bucket(10**9) == 30 * 86400
