"""Ledgers where operators keep them: on a read-only mount, or a backup copy.

Every command that only reads opens the ledger read-only (with its WAL where
the directory can hold the ``-shm``, as an immutable snapshot where it cannot),
and every command that writes says in one line that the ledger is read-only.

The read-only case is a real read-only file system, not file modes (the tests
may run as root, who ignores modes): a bind mount remounted read-only inside
``unshare -m``. Where that is not possible the test is skipped with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spendtap.store.budgets import Budgets
from spendtap.store.keys import Keys
from spendtap.store.ledger import Ledger
from tests.helpers import SPENDTAP_MODULE

READERS = [
    ["report", "-f", "json"],
    ["report", "--by", "day", "-f", "csv"],
    ["report", "--chart", "--ascii"],
    ["requests", "-f", "json"],
    ["tail", "--once", "-f", "jsonl"],
    ["export"],
    ["budget", "show", "--key", "k", "-f", "json"],
    ["budget", "list", "-f", "json"],
    ["reservations", "-f", "json"],
    ["keys", "list", "-f", "json"],
    ["prices", "--check"],
]
WRITERS = [
    ["budget", "set", "--key", "k", "--cap", "5", "--window", "1h"],
    ["budget", "rm", "--key", "k"],
    ["sweep"],
    ["keys", "add", "--account", "a", "--key-id", "new", "--generate"],
    ["keys", "rm", "--key-id", "k"],
    ["run", "--upstream", "http://127.0.0.1:9"],
    ["reprice"],
]

# Runs inside the mount namespace: each command against the read-only ledger.
DRIVER = textwrap.dedent(
    """
    import json, subprocess, sys
    db, commands = sys.argv[1], json.loads(sys.argv[2])
    out = []
    for args in commands:
        p = subprocess.run([sys.executable, "-m", "spendtap.cli.main", *args, "--db", db],
                           capture_output=True, text=True, timeout=60)
        out.append({"args": args, "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr})
    print(json.dumps(out))
    """
)


def _make_ledger(path: Path) -> None:
    with Ledger(path) as ledger:
        ledger.insert_rows(
            [
                {"id": "r1", "ts": "2025-01-01T00:00:00.000Z", "account": "a", "key": "k",
                 "model": "m", "outcome": "completed", "prompt_tokens": 3,
                 "completion_tokens": 4, "usage_source": "reported"},
                {"id": "r2", "ts": "2025-01-01T00:00:01.000Z", "account": "a", "key": "k",
                 "model": "m", "outcome": "rejected", "status": 429, "usage_source": "none"},
            ]
        )  # fmt: skip
    with Budgets(path) as budgets:
        budgets.set("key", "k", 100, None)
    with Keys(path) as keys:
        keys.add("a", "k", "sk-" + "x" * 40)


def _leave_wal(path: Path, *, keep_shm: bool) -> None:
    """Add a row that stays in the WAL: the writer dies without a checkpoint (like kill -9)."""
    code = textwrap.dedent(
        f"""
        import os, sqlite3
        con = sqlite3.connect({str(path)!r}, isolation_level=None)
        con.execute("PRAGMA wal_autocheckpoint = 0")
        con.execute("INSERT INTO requests (id, ts, account, key, outcome, prompt_tokens, "
                    "completion_tokens, usage_source) VALUES ('r3', '2025-01-01T00:00:02.000Z', "
                    "'a', 'k', 'completed', 10, 10, 'reported')")
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert Path(str(path) + "-wal").stat().st_size > 0
    if not keep_shm:
        Path(str(path) + "-shm").unlink()


def _read_only_mount_works(tmp: Path) -> str | None:
    """None if a read-only bind mount can be made here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    src, mnt = tmp / "probe-src", tmp / "probe-mnt"
    src.mkdir()
    mnt.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount --bind {src} {mnt} && mount -o remount,bind,ro {mnt} && ! touch {mnt}/x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"no read-only bind mount (unshare -m needs root): {probe.stderr.strip()}"
    return None


def _run_read_only(tmp: Path, src: Path, commands: list[list[str]]) -> list[dict]:
    mnt = tmp / "ro"
    mnt.mkdir()
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    script = (
        f"mount --bind {src} {mnt} && mount -o remount,bind,ro {mnt} && "
        f'exec "$0" {driver} {mnt / "ledger.db"} "$1"'
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, sys.executable, json.dumps(commands)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def read_only_ok(tmp_path):
    reason = _read_only_mount_works(tmp_path)
    if reason is not None:
        pytest.skip(reason)


def test_read_only_mount_readers_work_writers_say_so(tmp_path, read_only_ok):
    """On a read-only bind mount: every reading command works (it used to fail "unable to
    open database file"), doctor names the read-only file system (it said "not an SQLite
    database"), and every writing command says the ledger is read-only in one line."""
    src = tmp_path / "src"
    src.mkdir()
    _make_ledger(src / "ledger.db")
    before = sorted(p.name for p in src.iterdir())
    results = _run_read_only(tmp_path, src, [*READERS, ["doctor", "--metrics", "none"], *WRITERS])
    by = {" ".join(r["args"]): r for r in results}
    for args in READERS:
        r = by[" ".join(args)]
        # prices --check exits 1 because model "m" has no price: it read the ledger.
        assert r["rc"] == (1 if args[0] == "prices" else 0), r
        assert r["stderr"] == "", r
    assert by["prices --check"]["stdout"].splitlines()[-1].split() == ["m", "2", "7"]
    (report,) = json.loads(by["report -f json"]["stdout"])
    assert report["requests"] == 2 and report["refused"] == 1 and report["total_tokens"] == 7
    assert json.loads(by["budget show --key k -f json"]["stdout"])[0]["cap"] == 100
    assert [k["key_id"] for k in json.loads(by["keys list -f json"]["stdout"])] == ["k"]
    doctor = by["doctor --metrics none"]
    assert "not an SQLite database" not in doctor["stdout"]
    assert "read-only file system" in doctor["stdout"]
    assert "info  last-row" in doctor["stdout"]
    for args in WRITERS:
        r = by[" ".join(args)]
        assert r["rc"] == 1, r
        assert r["stderr"].count("\n") == 1, r
        assert r["stderr"].startswith("Error: the ledger ") and "is read-only" in r["stderr"], r
        assert "read-only file system" in r["stderr"]
    assert sorted(p.name for p in src.iterdir()) == before, "nothing may be written"


def test_read_only_mount_with_live_wal(tmp_path, read_only_ok):
    """A ledger whose writer died with rows in the WAL and its -shm beside it: the readers
    see the WAL's rows too (mode=ro reads them)."""
    src = tmp_path / "src"
    src.mkdir()
    _make_ledger(src / "ledger.db")
    _leave_wal(src / "ledger.db", keep_shm=True)
    (r,) = _run_read_only(tmp_path, src, [["report", "-f", "json"]])
    assert r["rc"] == 0, r
    assert json.loads(r["stdout"])[0]["requests"] == 3


def test_read_only_mount_wal_without_shm_is_a_noted_snapshot(tmp_path, read_only_ok):
    """WAL rows but no -shm, and a directory that cannot hold one: the ledger is read as a
    snapshot (immutable) and a note on stderr says the WAL's rows are not included."""
    src = tmp_path / "src"
    src.mkdir()
    _make_ledger(src / "ledger.db")
    _leave_wal(src / "ledger.db", keep_shm=False)
    (r, doctor) = _run_read_only(
        tmp_path, src, [["report", "-f", "json"], ["doctor", "--metrics", "none"]]
    )
    assert r["rc"] == 0, r
    assert json.loads(r["stdout"])[0]["requests"] == 2
    assert r["stderr"].startswith("note: ") and "ledger.db-wal are not included" in r["stderr"]
    assert "are not included" in doctor["stdout"]


def test_backup_copy_in_a_writable_directory(tmp_path):
    """A copy of a live ledger (its -wal and -shm copied too) reads with the WAL's rows,
    and reading never changes the copy's main file."""
    live = tmp_path / "live"
    live.mkdir()
    _make_ledger(live / "ledger.db")
    _leave_wal(live / "ledger.db", keep_shm=True)
    backup = tmp_path / "backup"
    shutil.copytree(live, backup)
    main_before = (backup / "ledger.db").read_bytes()
    out = subprocess.run(
        [*SPENDTAP_MODULE, "report", "-f", "json", "--db", str(backup / "ledger.db")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["requests"] == 3
    assert (backup / "ledger.db").read_bytes() == main_before
