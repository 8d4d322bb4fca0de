"""Property: any interleaving of reserve, settle (ship), release, duplicate ships and lease
sweeps across several simulated nodes keeps ``spent + reserved <= cap`` in PostgreSQL."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendtap.store.central import CentralStore
from spendtap.timeparse import ts_from_epoch

NODES = ("n1", "n2", "n3")
KEYS = ("k1", "k2")

op = st.one_of(
    st.tuples(
        st.just("reserve"), st.sampled_from(NODES), st.sampled_from(KEYS), st.integers(0, 60)
    ),
    st.tuples(st.just("settle"), st.integers(0, 50), st.floats(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("reship"), st.integers(0, 50)),
    st.tuples(st.just("expire"), st.sampled_from(NODES)),
)


@pytest.fixture(scope="module")
def prop_store(pg_server):
    store = CentralStore(pg_server.create_database())
    yield store
    store.close()


def check_invariant(store: CentralStore) -> None:
    for status in store.statuses():
        assert status.spent + status.reserved <= status.budget.cap, status


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=st.lists(op, min_size=1, max_size=40),
    caps=st.tuples(st.integers(0, 200), st.integers(0, 200), st.integers(0, 300)),
)
def test_any_interleaving_keeps_the_caps(prop_store, ops, caps):
    """Reservations, settlements with usage up to what was reserved, releases, re-shipped
    batches and expired leases, in any order, never take a budget over its cap."""
    store = prop_store
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE requests, reservations, budgets, nodes, ship_cursors")
    store.set("key", "k1", caps[0], None)
    store.set("key", "k2", caps[1], 3600)
    store.set("account", "acct", caps[2], None)
    for node in NODES:
        store.heartbeat(node, f"owner-{node}", 30)
    ids = itertools.count()
    made: list[tuple[str, str, str, int]] = []  # (id, node, key, tokens) of admitted ones
    shipped: dict[str, list] = {n: [] for n in NODES}
    for step in ops:
        kind = step[0]
        if kind == "reserve":
            _, node, key, tokens = step
            rid = f"r{next(ids)}"
            d = store.reserve(rid, "acct", key, tokens, f"owner-{node}", node_id=node)
            if d.reservation_id:
                made.append((rid, node, key, tokens))
        elif kind == "settle" and made:
            rid, node, key, tokens = made.pop(step[1] % len(made))
            used = int(tokens * step[2])  # an upstream bills at most what was reserved
            row = {
                "id": rid,
                "ts": ts_from_epoch(time.time()),
                "account": "acct",
                "key": key,
                "prompt_tokens": used // 2,
                "completion_tokens": used - used // 2,
                "outcome": "completed",
                "usage_source": "reported",
            }
            shipped[node].append((len(shipped[node]) + 1, row))
            store.ship(node, shipped[node][-1:], "mark")
        elif kind == "release" and made:
            rid, *_ = made.pop(step[1] % len(made))
            store.release(rid)
        elif kind == "reship":
            node = NODES[step[1] % len(NODES)]
            if shipped[node]:
                store.ship(node, shipped[node], "mark")
        elif kind == "expire":
            with psycopg.connect(store.dsn, autocommit=True) as conn:
                conn.execute(
                    "UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE node_id = %s",
                    (step[1],),
                )
            store.sweep()
            made = [m for m in made if m[1] != step[1]]
            store.heartbeat(step[1], f"owner-{step[1]}", 30)
        check_invariant(store)
    all_rows = [r for rows in shipped.values() for _, r in rows]
    assert store.count_rows() == len({r["id"] for r in all_rows})


def test_racing_nodes_never_overshoot(pg_dsn):
    """Threads for several nodes reserving and settling at once stay within the caps, and
    a snapshot taken at any moment shows spent + reserved <= cap."""
    store = CentralStore(pg_dsn, pool_size=8)
    store.set("key", "hot", 5_000, None)
    store.set("account", "acct", 4_000, None)
    stop = threading.Event()
    violations: list = []

    def monitor() -> None:
        while not stop.is_set():
            for status in store.statuses():
                if status.spent + status.reserved > status.budget.cap:
                    violations.append(status)

    def node(n: int) -> int:
        admitted = 0
        for i in range(60):
            rid = f"{n}-{i}"
            if store.reserve(rid, "acct", "hot", 50, f"o{n}", node_id=f"n{n}").reservation_id:
                admitted += 1
                row = {
                    "id": rid,
                    "ts": ts_from_epoch(time.time()),
                    "account": "acct",
                    "key": "hot",
                    "prompt_tokens": 10,
                    "completion_tokens": 20,
                    "outcome": "completed",
                    "usage_source": "reported",
                }
                if i % 3:
                    store.ship(f"n{n}", [(i + 1, row)], "m")
                else:
                    store.release(rid)
        return admitted

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            admitted = sum(pool.map(node, range(6)))
    finally:
        stop.set()
        watcher.join()
    final = {s.budget.scope: s for s in store.statuses()}
    store.close()
    assert not violations, violations[:3]
    assert admitted > 0
    assert final["account"].spent <= 4_000 and final["account"].reserved == 0
