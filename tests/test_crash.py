"""Acknowledged means durable: kill -9 the sidecar mid-traffic and count what survived.

Concurrent streaming clients run through a real mitmdump; at a random moment the
sidecar is killed with SIGKILL and restarted on the same ledger. Every request a
client saw complete (its stream's final terminator arrived) must have exactly
one ledger row with the right figures; no row may be duplicated.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid

import httpx
import pytest

from spendtap.store.budgets import Budgets
from tests.proc import Sidecar, read_rows

pytestmark = pytest.mark.e2e

TOKENS = 24


def _client_loop(url: str, stop: threading.Event, completed: list[str], lock: threading.Lock):
    body = {
        "model": "sim-chat",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "crash test"}],
    }
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            request_id = uuid.uuid4().hex
            headers = {
                "x-helexa-account-id": "crash",
                "x-helexa-key-id": request_id,
                "x-sim-tokens": str(TOKENS),
                "x-sim-tps": "200",
            }
            try:
                with client.stream("POST", url, json=body, headers=headers) as resp:
                    data = b"".join(resp.iter_raw())
                if resp.status_code == 200 and data.endswith(b"data: [DONE]\n\n"):
                    with lock:
                        completed.append(request_id)
            except httpx.HTTPError:
                time.sleep(0.01)  # the sidecar is gone; try again until told to stop


# The writer process (the default) three times, the writer thread once; mitmdump on
# asyncio's loop (as run by hand) and on uvloop's (as spendtap run starts it).
@pytest.mark.parametrize(
    "run, in_process, event_loop",
    [(0, True, "asyncio"), (1, True, "uvloop"), (2, True, "asyncio"), (3, False, "uvloop")],
)
def test_kill_9_loses_no_acknowledged_request(sim, tmp_path, run, in_process, event_loop):
    """Every request a client saw complete has exactly one correct row after a kill -9."""
    rng = random.Random(run)
    db = tmp_path / "ledger.db"
    with Budgets(db) as budgets:  # every request reserves, so the crash leaves reservations
        budgets.set("account", "crash", 10**12, None)
    writer = f"spendtap_ledger_process={'true' if in_process else 'false'}"
    proxy = Sidecar(tmp_path, sim.url, writer, db=db, event_loop=event_loop)
    stop = threading.Event()
    completed: list[str] = []
    lock = threading.Lock()
    clients = [
        threading.Thread(
            target=_client_loop,
            args=(proxy.url + "/v1/chat/completions", stop, completed, lock),
        )
        for _ in range(16)
    ]
    for t in clients:
        t.start()
    time.sleep(rng.uniform(0.8, 2.5))
    with lock:
        seen_before_kill = len(completed)
    proxy.stop(signal.SIGKILL)
    stop.set()
    for t in clients:
        t.join(30)
    assert seen_before_kill > 0, "no request completed before the kill; the test proved nothing"

    restarted = Sidecar(tmp_path, sim.url, db=db)  # migrations, start-up sweep
    try:
        rows = [r for r in read_rows(db) if r["account"] == "crash"]
        with Budgets(db) as budgets:
            open_after_sweep = len(budgets.reservations())
    finally:
        restarted.stop()
    marked = [r for r in rows if r["error"] and "sidecar process ended" in r["error"]]
    by_key: dict[str, list[dict]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row)
    missing = [rid for rid in completed if rid not in by_key]
    duplicated = {k: len(v) for k, v in by_key.items() if len(v) > 1}
    print(
        f"run {run}: clients saw {len(completed)} complete, ledger has {len(rows)} rows "
        f"({len(marked)} marked as cut short by the kill), missing {len(missing)}, "
        f"duplicated {len(duplicated)}, open reservations after the start-up sweep "
        f"{open_after_sweep}"
    )
    assert open_after_sweep == 0
    assert marked, "requests in flight at the kill must be marked, not silently missing"
    assert not missing, f"{len(missing)} of {len(completed)} acknowledged requests have no row"
    assert not duplicated
    for rid in completed:
        row = by_key[rid][0]
        assert row["outcome"] == "completed"
        assert row["completion_tokens"] == TOKENS and row["usage_source"] == "reported"
