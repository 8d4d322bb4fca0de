"""End to end: a ledger that misbehaves never stops the traffic, and loses no row."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
import uuid

import httpx
import pytest

from tests.helpers import metric_value
from tests.proc import Sidecar, read_rows

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def _request(proxy, account: str, timeout: float = 10) -> float:
    """One streamed request; returns its wall time. The response must be complete and right."""
    t0 = time.monotonic()
    r = httpx.post(
        proxy.url + CHAT,
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        headers={"x-helexa-account-id": account, "x-sim-tokens": "5"},
        timeout=timeout,
    )
    assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
    return time.monotonic() - t0


def test_corrupt_ledger_at_start_is_a_clear_error(sim, tmp_path):
    """A corrupt ledger file stops the sidecar at start with a clear message, untouched."""
    db = tmp_path / "ledger.db"
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    before = db.read_bytes()
    with pytest.raises(RuntimeError):
        Sidecar(tmp_path, sim.url, db=db)
    log = next(tmp_path.glob("mitmdump-*.log")).read_text()
    assert "spendtap_db" in log
    assert db.read_bytes() == before, "a corrupt ledger must never be replaced silently"


def test_foreign_sqlite_file_is_refused(sim, tmp_path):
    """An SQLite file that is not a spendtap ledger is refused, never adopted."""
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("create table customers (id integer)")
    con.commit()
    con.close()
    with pytest.raises(RuntimeError):
        Sidecar(tmp_path, sim.url, db=db)


def test_locked_ledger_delays_rows_not_traffic(sim, start_sidecar):
    """While another process holds the ledger locked, requests flow; rows land afterwards."""
    proxy = start_sidecar(sim.url, "spendtap_commit_wait_ms=200")
    _request(proxy, "warm")
    proxy.row_for("warm")
    blocker = sqlite3.connect(proxy.db, timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    accounts = [f"locked-{i}" for i in range(5)]
    try:
        times = [_request(proxy, a) for a in accounts]
    finally:
        blocker.rollback()
        blocker.close()
    # Each waited at most the bounded commit wait (0.2 s), never the lock.
    assert max(times) < 2, times
    for account in accounts:
        proxy.row_for(account, timeout=20)


def test_deleted_ledger_is_recreated(sim, start_sidecar):
    """Deleting the ledger under a running sidecar loses no later row: a new file is made."""
    proxy = start_sidecar(sim.url)
    _request(proxy, "before")
    proxy.row_for("before")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(proxy.db) + suffix)
    _request(proxy, "after")
    row = proxy.row_for("after", timeout=20)
    assert row["completion_tokens"] == 5


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs, to fill the ledger's disk for real."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_rows_until_space_returns(sim, tiny_tmpfs, start_sidecar):
    """On a full disk the traffic keeps flowing and the rows land once space is freed."""
    db = tiny_tmpfs / "ledger.db"
    proxy = start_sidecar(sim.url, "spendtap_commit_wait_ms=200", db=db)
    _request(proxy, "first")
    proxy.row_for("first")
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    # Distinct by their index: six random hex digits alone collide in 150 now and then
    # (once in ~1,500 runs), which read as a duplicate row.
    accounts = [f"full-{i:03d}-{uuid.uuid4().hex[:6]}-{'x' * 100}" for i in range(150)]
    times = [_request(proxy, a) for a in accounts]
    assert max(times) < 2, times
    time.sleep(0.5)
    landed = {r["account"] for r in read_rows(db)}
    errors = metric_value(proxy.metrics(), "cortex_ledger_write_errors_total")
    filler.unlink()
    for account in accounts:
        proxy.row_for(account, timeout=30, settle=0)
    print(f"rows on disk while full: {len(landed & set(accounts))} of {len(accounts)}")
    assert errors > 0, "the disk never filled up: this test proved nothing"
