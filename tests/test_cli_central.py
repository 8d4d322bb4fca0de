"""The CLI against the central store: every ledger command gives the same output with
``--db postgresql://...`` as with the SQLite ledger holding the same rows, and every
failure (unreachable, wrong password, someone else's database) is one line, exit 1,
with no password shown."""

from __future__ import annotations

import psycopg
import pytest

from spendtap.store.central import CentralStore, redact_dsn
from spendtap.store.ledger import Ledger
from tests.helpers import invoke
from tests.pg import PASSWORD
from tests.test_cli_query import ROWS


@pytest.fixture
def both(tmp_path, pg_dsn):
    """An SQLite ledger and a central store holding the same rows: (path, dsn)."""
    db = tmp_path / "ledger.db"
    with Ledger(db) as ledger:
        ledger.insert_rows(ROWS)
        rows = list(ledger.requests(after_rowid=0, order="asc", include_rowid=True))
    with CentralStore(pg_dsn) as store:
        store.ship("node-a", [(r.pop("rowid"), r) for r in rows], "m")
    return str(db), pg_dsn


def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = invoke(*args, input=stdin, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


QUERIES = [
    ("requests",),
    ("requests", "-f", "json"),
    ("requests", "-f", "jsonl", "--key", "k-acme-1"),
    ("requests", "-f", "csv", "--limit", "2"),
    ("requests", "--since", "2025-01-31", "--until", "2025-02-01", "-f", "json"),
    ("report", "--by", "account"),
    ("report", "--by", "key", "-f", "json"),
    ("report", "--by", "model", "-f", "csv"),
    ("report", "--by", "node"),
    ("report", "--by", "day", "-f", "json"),
    ("report", "--by", "hour"),
    ("export", "-f", "jsonl"),
    ("export", "-f", "csv", "--account", "acme"),
    ("report", "--by", "key", "--sort", "cost", "-f", "json"),
    ("report", "--by", "outcome", "--sort", "requests"),
    ("report", "--by", "price_source", "-f", "csv"),
    ("report", "--by", "day", "--sort", "tokens"),
    ("tail", "--once", "-n", "5", "-f", "jsonl"),
    ("prices", "--check"),
    ("reprice",),
    ("report", "--by", "model", "--chart", "--since", "2025-01-30", "--until", "2025-02-02"),
]


@pytest.mark.parametrize("args", QUERIES, ids=[" ".join(q) for q in QUERIES])
def test_query_commands_match_sqlite(both, args):
    """Reading commands print exactly what they print for the SQLite ledger."""
    db, dsn = both
    code_sqlite, out_sqlite, err_sqlite = run(*args, "--db", db)
    code_pg, out_pg, err_pg = run(*args, "--db", dsn)
    assert (code_pg, err_pg) == (code_sqlite, err_sqlite)
    assert err_pg == "" and code_pg == (1 if args == ("prices", "--check") else 0)
    assert out_pg == out_sqlite
    assert out_pg.strip()


def test_budget_commands_on_the_fleet(both):
    """budget set/show/list/rm, reservations and sweep work on the central store."""
    _, dsn = both
    code, out, err = run("budget", "set", "--key", "k-acme-1", "--cap", "5000",
                         "--window", "30d", "--db", dsn)  # fmt: skip
    assert code == 0, err
    code, out, _ = run("budget", "show", "--key", "k-acme-1", "-f", "json", "--db", dsn)
    assert code == 0 and '"cap": 5000' in out and '"window": "30d"' in out
    code, out, _ = run("budget", "list", "--db", dsn)
    assert code == 0 and "k-acme-1" in out
    with CentralStore(dsn) as store:
        store.reserve("r-open", "acme", "k-acme-1", 100, "elsewhere:1:1", node_id="n")
    code, out, _ = run("reservations", "-f", "jsonl", "--db", dsn)
    assert code == 0 and '"id": "r-open"' in out
    code, out, _ = run("sweep", "--older-than", "0s", "--db", dsn)
    assert code == 0 and "released 1 stale reservation" in out
    code, out, _ = run("budget", "rm", "--key", "k-acme-1", "--db", dsn)
    assert code == 0
    code, out, _ = run("budget", "list", "-f", "json", "--db", dsn)
    assert out.strip() == "[]"


def test_keys_registered_centrally(pg_dsn):
    """keys add/list/rm against the central store; a key resolves from the store."""
    from spendtap.store.central import CentralKeys

    secret = "sk-fleet-" + "x" * 32
    code, out, err = run(
        "keys", "add", "--account", "acme", "--key-id", "k1", "--db", pg_dsn, stdin=secret + "\n"
    )
    assert code == 0, err
    with CentralKeys(pg_dsn) as keys:
        assert keys.resolve(secret) == ("acme", "k1")
    code, out, _ = run("keys", "list", "-f", "json", "--db", pg_dsn)
    assert code == 0 and '"key_id": "k1"' in out and secret not in out
    code, out, _ = run("keys", "rm", "--key-id", "k1", "--db", pg_dsn)
    assert code == 0 and "revoked 1 key" in out


@pytest.mark.parametrize("command", [("requests",), ("report", "--by", "key"),
                                     ("budget", "list"), ("reservations",)])  # fmt: skip
def test_failures_are_one_line_without_the_password(pg_server, pg_dsn, command):
    """Unreachable server, wrong password, someone else's or an empty database: exit 1,
    one line naming the problem, and never the password."""
    foreign = pg_server.create_database()
    with psycopg.connect(foreign, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    cases = {
        "postgresql://spendtap:hunter2-secret@127.0.0.1:1/db": "Connection refused",
        pg_dsn.replace(PASSWORD, "hunter2-secret"): "password authentication failed",
        foreign: "not a spendtap ledger (tables but no spendtap migrations)",
        pg_server.create_database(): "not a spendtap ledger (an empty database)",
    }
    for dsn, expected in cases.items():
        code, out, err = run(*command, "--db", dsn)
        assert code == 1, (dsn, out, err)
        assert expected in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert "hunter2-secret" not in err + out and PASSWORD not in err + out
        assert redact_dsn(dsn) in err


def test_run_dry_run_never_shows_the_password(tmp_path, monkeypatch):
    """--central, SPENDTAP_CENTRAL and the TOML key reach mitmdump through its environment,
    and --dry-run shows the URL with its password hidden."""
    dsn = "postgresql://fleet:pa55-w0rd-xyz@db.internal:5432/spendtap"
    base = ["run", "--upstream", "http://127.0.0.1:8000", "--db", str(tmp_path / "l.db")]
    code, out, err = run(*base, "--central", dsn, "--dry-run")
    assert code == 0, err
    assert out.startswith("SPENDTAP_CENTRAL='postgresql://fleet:***@db.internal:5432/spendtap' ")
    assert "pa55-w0rd-xyz" not in out + err and "spendtap_central" not in out
    monkeypatch.setenv("SPENDTAP_CENTRAL", dsn)
    code, out, err = run(*base, "--dry-run")
    assert code == 0 and "SPENDTAP_CENTRAL='postgresql://fleet:***@" in out
    monkeypatch.delenv("SPENDTAP_CENTRAL")
    config = tmp_path / "spendtap.toml"
    config.write_text(f'upstream = "http://127.0.0.1:8000"\ncentral = "{dsn}"\n')
    code, out, err = run("run", "--config", str(config), "--dry-run")
    assert code == 0 and "SPENDTAP_CENTRAL='postgresql://fleet:***@" in out
    code, out, err = run(*base, "--central", "mysql://u:pa55-w0rd-xyz@h/db", "--dry-run")
    assert code == 1 and "expected a postgresql://" in err and "pa55-w0rd-xyz" not in err


def test_doctor_checks_the_central_store(tmp_path, pg_server, pg_dsn):
    """doctor reports the central store, this node's lease and backlog; the password never
    shows; a foreign database fails."""
    from spendtap.store.central import node_identity

    db = tmp_path / "ledger.db"
    with Ledger(db) as ledger:
        ledger.insert_rows(ROWS)
    with CentralStore(pg_dsn) as store:
        store.heartbeat(node_identity(db), "me", 30)
    code, out, err = run("doctor", "--db", str(db), "--metrics", "none", "--central", pg_dsn)
    assert PASSWORD not in out + err
    assert f"ok    central       {redact_dsn(pg_dsn)}: reachable, migrated" in out
    assert "ok    lease" in out
    assert f"FAIL  backlog       {len(ROWS)} rows not shipped yet" in out  # rows from 2025
    assert code == 1
    code, out, err = run("doctor", "--db", pg_dsn, "--metrics", "none")
    assert code == 0 and "ok    central" in out and "ok    lease" not in out
    foreign = pg_server.create_database()
    with psycopg.connect(foreign, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    code, out, err = run("doctor", "--db", foreign, "--metrics", "none")
    assert code == 1 and "FAIL  central" in out and "not a spendtap ledger" in out


def test_money_caps_are_refused_by_the_central_store(pg_dsn):
    """A money cap cannot be set on the fleet yet: one line saying so, exit 1."""
    code, _out, err = run(
        "budget", "set", "--key", "k", "--cap-usd", "10", "--window", "30d", "--db", pg_dsn
    )
    assert code == 1
    assert "money caps (--cap-usd) are not enforced by the central store yet" in err
    assert len(err.strip().splitlines()) == 1
