"""The budget, keys, reservations and sweep commands: output, effects and errors."""

from __future__ import annotations

import json
import time

import pytest

from spendtap.store.budgets import Budgets, process_owner
from spendtap.store.keys import Keys, fingerprint
from spendtap.store.ledger import Ledger
from spendtap.timeparse import ts_from_epoch
from tests.helpers import dead_owner, invoke, usage_error


@pytest.fixture
def db(tmp_path):
    return tmp_path / "ledger.db"


def test_budget_set_show_list_rm(db):
    """A budget is set, shown with its figures, listed and removed."""
    result = invoke("budget", "set", "--key", "k1", "--cap", "1000", "--window", "1h", db=db)
    assert result.exit_code == 0, result.output
    assert result.output == "key k1: cap 1000 tokens, per rolling 1h\n"
    result = invoke(
        "budget", "set", "--account", "acme", "--cap", "5000", "--window", "balance", db=db
    )
    assert result.output.startswith("account acme: cap 5000 tokens, balance, counting spend since ")
    now = time.time()
    with Ledger(db) as ledger:
        ledger.insert_rows(
            [{"id": "a", "ts": ts_from_epoch(now), "account": "acme", "key": "k1",
              "prompt_tokens": 100, "completion_tokens": 50}]
        )  # fmt: skip
    result = invoke("budget", "show", "--key", "k1", "-f", "json", db=db)
    doc = json.loads(result.output)[0]
    assert {k: doc[k] for k in ("scope", "principal", "cap", "window", "spent", "reserved")} == {
        "scope": "key", "principal": "k1", "cap": 1000, "window": "1h", "spent": 150,
        "reserved": 0,
    }  # fmt: skip
    assert doc["remaining"] == 850 and doc["resets_at"] == ts_from_epoch(now + 3600)
    table = invoke("budget", "list", db=db).output.splitlines()
    assert table[0].split() == [
        "scope", "principal", "unit", "cap", "window", "spent", "reserved", "remaining",
        "resets_at",
    ]  # fmt: skip
    assert table[2].split()[:8] == ["key", "k1", "tokens", "1000", "1h", "150", "0", "850"]
    assert table[3].split() == [
        "account", "acme", "tokens", "5000", "balance", "150", "0", "4850", "-",
    ]  # fmt: skip
    assert invoke("budget", "rm", "--key", "k1", db=db).output == "removed the budget of key k1\n"
    assert [
        r["principal"] for r in json.loads(invoke("budget", "list", "-f", "json", db=db).output)
    ] == ["acme"]


def test_budget_reset(db):
    """--reset starts counting a balance afresh; a cap change alone keeps the spend."""
    invoke("budget", "set", "--key", "k1", "--cap", "10", "--window", "balance", db=db)
    time.sleep(0.01)
    with Ledger(db) as ledger:
        ledger.insert_rows([{"id": "a", "ts": time.time(), "key": "k1", "prompt_tokens": 7}])
    time.sleep(0.01)

    def spent():
        return json.loads(invoke("budget", "show", "--key", "k1", "-f", "json", db=db).output)[0][
            "spent"
        ]

    assert spent() == 7
    invoke("budget", "set", "--key", "k1", "--cap", "20", "--window", "balance", db=db)
    assert spent() == 7
    invoke("budget", "set", "--key", "k1", "--cap", "20", "--window", "balance", "--reset", db=db)
    assert spent() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["budget", "set", "--cap", "1", "--window", "1h"],
            "give exactly one of --key and --account",
        ),
        (
            ["budget", "set", "--key", "k", "--account", "a", "--cap", "1", "--window", "1h"],
            "give exactly one of --key and --account",
        ),
        (["budget", "set", "--key", "k", "--cap", "-5", "--window", "1h"], "-5 is not in"),
        (
            ["budget", "set", "--key", "k", "--cap", "5", "--window", "soon"],
            "invalid window 'soon'",
        ),
    ],
)
def test_budget_usage_errors(db, args, message):
    """Options that conflict or a value out of range or form: click's usage error, exit 2."""
    Ledger(db).close()
    assert message in usage_error(invoke(*args, db=db))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["budget", "show", "--key", "nope"], "no budget for key nope"),
        (["budget", "rm", "--account", "nope"], "no budget for account nope"),
    ],
)
def test_budget_errors(db, args, message):
    """A budget that is not there: one line, exit 1."""
    Ledger(db).close()
    result = invoke(*args, db=db)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1


@pytest.mark.parametrize(
    "args", [["budget", "list"], ["budget", "show", "--key", "k"], ["reservations"], ["sweep"],
             ["keys", "list"], ["keys", "rm", "--key-id", "k"]],
)  # fmt: skip
def test_reading_commands_need_a_ledger(tmp_path, args):
    """Commands that read never create a ledger: they say where they looked."""
    db = tmp_path / "missing.db"
    result = invoke(*args, db=db)
    assert result.exit_code == 1
    assert f"Error: no ledger at {db}" in result.output
    assert not db.exists()


def test_reservations_and_sweep(db):
    """Open reservations are listed; sweep releases a dead owner's, --older-than old ones."""
    dead = dead_owner()
    now = time.time()
    with Budgets(db) as budgets:
        budgets.set("account", "acme", 1000, None)
        budgets.reserve("f-live", "acme", None, 10, process_owner(), now - 2)
        budgets.reserve("f-dead", "acme", None, 20, dead, now - 1)
        budgets.reserve("f-far", "acme", "k1", 30, "elsewhere.example:1:1", now)
    rows = json.loads(invoke("reservations", "-f", "json", db=db).output)
    assert [(r["id"], r["tokens"]) for r in rows] == [("f-live", 10), ("f-dead", 20), ("f-far", 30)]
    assert set(rows[0]) == {
        "id", "account", "key", "tokens", "usd", "created_at", "age_s", "owner",
    }  # fmt: skip
    assert rows[0]["age_s"] >= 2
    assert invoke("sweep", db=db).output == "released 1 stale reservation\n"
    assert invoke("sweep", "--older-than", "0s", db=db).output == "released 2 stale reservations\n"
    assert json.loads(invoke("reservations", "-f", "json", db=db).output) == []
    assert (
        invoke("reservations", "-f", "csv", db=db).output
        == "id,account,key,tokens,usd,created_at,age_s,owner\n"
    )
    result = invoke("sweep", "--older-than", "soon", db=db)
    assert usage_error(result).startswith("Error: Invalid value for '--older-than': ")


def test_keys_add_from_stdin_list_rm(db):
    """A piped secret is registered by fingerprint; list never shows it; rm revokes it."""
    secret = "sk-live-0123456789abcdef"
    result = invoke(
        "keys", "add", "--account", "acme", "--key-id", "k1", input=secret + "\n", db=db
    )
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"registered sk-liv\u2026 (fingerprint {fingerprint(secret)[:12]}) "
        "for account acme, key k1\n"
    )
    with Keys(db) as keys:
        assert keys.resolve(secret) == ("acme", "k1")
    listing = invoke("keys", "list", "-f", "json", db=db).output
    assert secret not in listing
    (entry,) = json.loads(listing)
    assert entry["fingerprint"] == fingerprint(secret) and entry["prefix"] == "sk-liv\u2026"
    table = invoke("keys", "list", db=db).output
    assert fingerprint(secret)[:12] in table and fingerprint(secret)[:13] not in table
    assert invoke("keys", "rm", "--key-id", "k1", db=db).output == "revoked 1 key\n"
    assert json.loads(invoke("keys", "list", "-f", "json", db=db).output) == []
    assert len(json.loads(invoke("keys", "list", "--all", "-f", "json", db=db).output)) == 1
    assert secret.encode() not in db.read_bytes()


def test_keys_add_generates_and_prints_once(db):
    """--generate prints a new secret once on stdout; only its fingerprint is kept."""
    result = invoke("keys", "add", "--account", "acme", "--key-id", "k9", "--generate", db=db)
    assert result.exit_code == 0
    secret = result.stdout.strip()
    assert secret.startswith("sk-st-")
    assert "cannot be shown again" in result.stderr
    with Keys(db) as keys:
        assert keys.resolve(secret) == ("acme", "k9")
    assert secret not in invoke("keys", "list", db=db).output


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["keys", "add", "--account", "a", "--key-id", "k"], "", "no secret on stdin and it"),
        (["keys", "add", "--account", "a", "--key-id", "k"], "short", "at least 16 characters"),
        (["keys", "rm", "--key-id", "ghost"], None, "no active key with key id ghost"),
        (["keys", "rm", "--fingerprint", "xyz"], None, "at least 8 hex digits"),
    ],
)
def test_keys_errors(db, args, stdin, message):
    """Bad keys commands fail with one line and exit 1."""
    Ledger(db).close()
    result = invoke(*args, input=stdin, db=db)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output


def test_keys_rm_needs_one_selector(db):
    """Neither --key-id nor --fingerprint: click's usage error, exit 2."""
    Ledger(db).close()
    error = usage_error(invoke("keys", "rm", db=db))
    assert "give exactly one of --key-id and --fingerprint" in error


def test_keys_add_duplicate(db):
    """Registering the same secret twice is refused."""
    invoke("keys", "add", "--account", "a", "--key-id", "k", input="0123456789abcdefgh", db=db)
    result = invoke(
        "keys", "add", "--account", "b", "--key-id", "j", input="0123456789abcdefgh", db=db
    )
    assert result.exit_code == 1 and "already registered" in result.output


@pytest.mark.parametrize(
    "command",
    [["budget"], ["budget", "set"], ["budget", "show"], ["budget", "list"], ["budget", "rm"],
     ["keys"], ["keys", "add"], ["keys", "list"], ["keys", "rm"], ["reservations"], ["sweep"],
     ["tail"], ["export"]],
)  # fmt: skip
def test_help_has_examples(command):
    """Every new command has help text with an Examples block."""
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output


def test_money_budget_set_show_rm(db):
    """A money cap beside a token cap: set in dollars, shown exactly, removed apart."""
    assert (
        invoke("budget", "set", "--key", "k1", "--cap", "1000", "--window", "1h", db=db).exit_code
        == 0
    )
    result = invoke("budget", "set", "--key", "k1", "--cap-usd", "2.5", "--window", "1d", db=db)
    assert result.exit_code == 0, result.output
    assert result.output == "key k1: cap $2.5, per rolling 1d\n"
    now = time.time()
    with Ledger(db) as ledger:
        ledger.insert_rows(
            [{"id": "a", "ts": ts_from_epoch(now), "key": "k1", "prompt_tokens": 100,
              "completion_tokens": 50, "cost_nusd": 1_250_000_000, "price_source": "none"}]
        )  # fmt: skip
    docs = json.loads(invoke("budget", "show", "--key", "k1", "-f", "json", db=db).output)
    assert [(d["unit"], d["cap"], d["spent"], d["remaining"]) for d in docs] == [
        ("tokens", 1000, 150, 850),
        ("usd", 2.5, 1.25, 1.25),
    ]
    raw = invoke("budget", "show", "--key", "k1", "-f", "jsonl", db=db).output.splitlines()[1]
    assert '"cap": 2.500000000' in raw and '"spent": 1.250000000' in raw
    assert invoke("budget", "rm", "--key", "k1", "--usd", db=db).output == (
        "removed the money budget of key k1\n"
    )
    docs = json.loads(invoke("budget", "show", "--key", "k1", "-f", "json", db=db).output)
    assert [d["unit"] for d in docs] == ["tokens"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cap-usd", "-1"], "Invalid value for '--cap-usd': expected an amount in dollars >= 0"),
        (["--cap-usd", "lots"], "expected an amount in dollars"),
        (["--cap-usd", "0.0000000001"], "at most 9 decimal places"),
        (["--cap-usd", "99999999999999"], "at most 9223372036.854775807 dollars"),
        (["--cap", "99999999999999999999999"], "is not in the range 0<=x<=9223372036854775807"),
        (["--cap", "5", "--cap-usd", "5"], "give exactly one of --cap"),
        ([], "give exactly one of --cap"),
    ],
)
def test_money_budget_errors(db, args, message):
    """A bad amount or conflicting caps: click's usage error, exit 2, one Error line."""
    error = usage_error(invoke("budget", "set", "--key", "k1", "--window", "1d", *args, db=db))
    assert error.startswith("Error: ") and message in error
