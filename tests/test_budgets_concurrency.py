"""Concurrency: many threads and several processes reserving against one ledger never overshoot."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spendtap.store.budgets import Budgets, process_owner
from spendtap.store.ledger import Ledger
from spendtap.timeparse import ts_from_epoch

CAP = 5000
REPO = Path(__file__).resolve().parent.parent


# One worker: reserve `n` times; settle about half (usage up to the reservation,
# through Ledger.insert_rows, the writer's transaction) and release the rest,
# unless `hold` (keep every reservation open). Returns what it was granted.
def run_worker(path, name: str, n: int, hold: bool, seed: int) -> dict:
    rng = random.Random(seed)
    budgets = Budgets(path, busy_timeout_s=60)
    ledger = Ledger(path, busy_timeout_s=60)
    owner = process_owner()
    out = {"granted": [], "refused": [], "used": 0}
    try:
        for i in range(n):
            rid = f"{name}-{i}"
            tokens = rng.randint(1, 120)
            d = budgets.reserve(rid, "acme", "k1", tokens, owner)
            if not d.allowed:
                out["refused"].append(tokens)
                continue
            out["granted"].append(tokens)
            if hold:
                continue
            if rng.random() < 0.5:
                used = rng.randint(0, tokens)
                row = {"id": rid, "ts": ts_from_epoch(time.time()), "account": "acme",
                       "key": "k1", "prompt_tokens": used, "completion_tokens": 0}  # fmt: skip
                ledger.insert_rows([row])
                out["used"] += used
            else:
                budgets.release(rid)
    finally:
        budgets.close()
        ledger.close()
    return out


# The same worker in its own process (so the processes share only the ledger file).
WORKER = r"""
import json, sys
from tests.test_budgets_concurrency import run_worker
path, name, n, hold, seed = sys.argv[1:6]
print(json.dumps(run_worker(path, name, int(n), hold == "1", int(seed))))
"""


def _observer(path, stop: threading.Event, violations: list, samples: list) -> None:
    """Sample the budget all along: spent + reserved never exceeds the cap."""
    with Budgets(path, busy_timeout_s=60) as budgets:
        while not stop.is_set():
            for scope, principal in (("key", "k1"), ("account", "acme")):
                status = budgets.status(scope, principal)
                samples.append(1)
                if status.spent + status.reserved > status.budget.cap:
                    violations.append(status)
            time.sleep(0.001)


def _setup(path, window_s=None):
    with Budgets(path) as budgets:
        budgets.set("key", "k1", CAP, window_s)
        budgets.set("account", "acme", CAP + 500, None)


def _thread_worker(path, name, n, hold, seed, results, errors):
    try:
        results.append(run_worker(path, name, n, hold, seed))
    except BaseException as e:  # reported by the test
        errors.append(e)


def _run_processes(path, count, n, hold):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(path),
                f"p{i}",
                str(n),
                "1" if hold else "0",
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,  # so the worker can import this module
        )
        for i in range(count)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    return results


def _run_threads(path, count, n, hold, seed0=100):
    results: list = []
    errors: list = []
    threads = [
        threading.Thread(
            target=_thread_worker, args=(path, f"t{i}", n, hold, seed0 + i, results, errors)
        )
        for i in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
        assert not t.is_alive(), "a worker thread deadlocked"
    assert not errors, errors
    return results


@pytest.mark.parametrize("hold", [True, False], ids=["hold", "settle-release"])
def test_threads_and_processes_never_overshoot(tmp_path, hold):
    """16 threads and 4 processes race on one ledger: the cap holds at every sample and at end."""
    path = tmp_path / "ledger.db"
    _setup(path)
    stop = threading.Event()
    violations: list = []
    samples: list = []
    observer = threading.Thread(target=_observer, args=(path, stop, violations, samples))
    observer.start()
    results: list = []
    proc_thread = threading.Thread(target=lambda: results.extend(_run_processes(path, 4, 60, hold)))
    proc_thread.start()
    results.extend(_run_threads(path, 16, 30, hold))
    proc_thread.join(300)
    stop.set()
    observer.join(60)
    assert not violations, violations[:3]
    assert samples

    granted = [t for r in results for t in r["granted"]]
    refused = [t for r in results for t in r["refused"]]
    sent = len(granted) + len(refused)
    assert sent == 4 * 60 + 16 * 30
    with Budgets(path) as budgets:
        status = budgets.status("key", "k1")
        opened = budgets.reservations()
    if hold:
        # Every grant is still reserved: their sum is the reserved figure, within the cap.
        assert sum(granted) == status.reserved <= CAP
        assert len(opened) == len(granted)
        # Refusals only when full: what is left is less than the smallest refused request.
        assert refused and CAP - sum(granted) < min(refused)
    else:
        used = sum(r["used"] for r in results)
        assert status.reserved == 0 and opened == []
        assert status.spent == used <= CAP
    print(
        f"\nconcurrency ({'hold' if hold else 'settle/release'}): sent {sent}, "
        f"granted {len(granted)}, refused {len(refused)}, spent {status.spent}, "
        f"reserved {status.reserved}, cap {CAP}, open at end {len(opened)}"
    )
