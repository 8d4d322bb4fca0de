"""End to end: budgets enforced by real mitmdump processes, with the official SDKs.

A capped key is served, then refused with the right status, envelope and
headers, then served again once its window has moved on. Hundreds of
concurrent requests from one key, through one sidecar and through two sidecars
sharing one ledger, never dispatch more than the cap allows, and leave no
reservation open.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import openai
import pytest

from tests.helpers import anthropic_client, openai_client, sim_total, spendtap, tokens_of
from tests.proc import Sidecar, read_rows

pytestmark = pytest.mark.e2e


def open_reservations(db) -> int:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return con.execute("select count(*) from reservations").fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def budget_sidecar(sim, start_sidecar):
    """A sidecar of the test's own: budgets and their spend must not leak between tests."""
    return start_sidecar(sim.url)


def _chat(client: openai.OpenAI, key: str):
    return client.chat.completions.with_raw_response.create(
        model="sim-chat",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        extra_headers={"x-helexa-account-id": "acme", "x-helexa-key-id": key, "x-sim-tokens": "10"},
    )


def test_window_budget_refuses_then_recovers(sim, budget_sidecar):
    """A key over its rolling cap gets 429 rate_limit_exceeded with Retry-After, then service."""
    db = budget_sidecar.db
    spendtap("budget", "set", "--key", "win-key", "--cap", "400", "--window", "4s", db=db)
    with openai_client(budget_sidecar.url, api_key="x") as client:
        served = 0
        before = sim_total(sim)
        with pytest.raises(openai.RateLimitError) as refused:
            for _ in range(50):
                _chat(client, "win-key")
                served += 1
        assert served >= 1
        assert sim_total(sim) - before == served, "a refused request must not reach the upstream"
        err = refused.value
        assert err.status_code == 429
        assert err.body["code"] == "rate_limit_exceeded"
        retry_after = int(err.response.headers["retry-after"])
        assert 1 <= retry_after <= 5
        time.sleep(retry_after + 0.5)
        resp = _chat(client, "win-key")  # the window moved on
        assert resp.http_response.status_code == 200
    row = next(r for r in read_rows(db) if r["outcome"] == "rejected")
    assert row["status"] == 429 and row["key"] == "win-key" and row["prompt_tokens"] is None
    show = spendtap("budget", "show", "--key", "win-key", "--format", "json", db=db)
    assert '"cap": 400' in show
    assert 'cortex_rejections_total{reason="window"}' in budget_sidecar.metrics()
    assert open_reservations(db) == 0


def test_balance_budget_refusal_shapes(sim, budget_sidecar):
    """An exhausted balance is insufficient_quota for OpenAI and Anthropic-shaped on messages."""
    db = budget_sidecar.db
    spendtap("budget", "set", "--account", "poor", "--cap", "10", "--window", "balance", db=db)
    headers = {"x-helexa-account-id": "poor", "x-helexa-key-id": "k"}
    with (
        openai_client(budget_sidecar.url, headers, api_key="x") as client,
        pytest.raises(openai.RateLimitError) as refused,
    ):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=100
        )
    assert refused.value.body["code"] == "insufficient_quota"
    assert "retry-after" not in refused.value.response.headers
    with (
        anthropic_client(budget_sidecar.url, headers, api_key="x") as client,
        pytest.raises(anthropic.RateLimitError) as refused,
    ):
        client.messages.create(
            model="c", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    body = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"


def _hammer(url: str, key: str, n: int, workers: int = 64) -> tuple[int, int, int]:
    """n concurrent chat requests from one key; (served, refused, other)."""

    def one(i: int) -> int:
        r = httpx.post(
            url + "/v1/chat/completions",
            json={
                "model": "m",
                "max_tokens": 20,
                "messages": [{"role": "user", "content": f"request {i}"}],
            },
            headers={"x-helexa-account-id": "race", "x-helexa-key-id": key, "x-sim-tokens": "20"},
            timeout=30,
        )
        return r.status_code

    with ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(one, range(n)))
    return codes.count(200), codes.count(429), len(codes) - codes.count(200) - codes.count(429)


@pytest.mark.parametrize("sidecars", [1, 2])
def test_concurrent_requests_never_overshoot(sim, tmp_path, sidecars):
    """Hundreds of racing requests (one or two sidecars, one ledger) stay within the cap."""
    db = tmp_path / "shared.db"
    proxies = [Sidecar(tmp_path, sim.url, db=db) for _ in range(sidecars)]
    try:
        cap = 3000
        key = f"race-{sidecars}"
        spendtap("budget", "set", "--key", key, "--cap", str(cap), "--window", "balance", db=db)
        before = sim_total(sim)
        n = 300
        with ThreadPoolExecutor(len(proxies)) as pool:
            results = list(pool.map(lambda p: _hammer(p.url, key, n // len(proxies)), proxies))
        served = sum(r[0] for r in results)
        refused = sum(r[1] for r in results)
        other = sum(r[2] for r in results)
        dispatched = sim_total(sim) - before
        deadline = time.monotonic() + 15
        while open_reservations(db) and time.monotonic() < deadline:
            time.sleep(0.1)
        total_spent = tokens_of(read_rows(db), key)
        print(
            f"\n{sidecars} sidecar(s): sent {n}, dispatched {dispatched}, served {served}, "
            f"refused {refused}, other {other}, spent {total_spent} of cap {cap}, "
            f"open reservations {open_reservations(db)}"
        )
        assert other == 0
        assert served + refused == n
        assert dispatched == served, "every refusal stayed local; every admission reached it"
        assert refused > 0 and served > 0, "the cap must bind for this test to prove anything"
        assert total_spent <= cap
        assert open_reservations(db) == 0
    finally:
        for p in proxies:
            p.stop()


@pytest.mark.parametrize("fail_open", [False, True])
def test_ledger_that_cannot_reserve(sim, fail_open, start_sidecar):
    """A budgeted request meets a locked ledger: 503 + Retry-After (fail closed), or dispatch."""
    import sqlite3

    proxy = start_sidecar(sim.url, f"spendtap_fail_open={str(fail_open).lower()}")
    spendtap("budget", "set", "--key", "locked-key", "--cap", "100000", "--window", "1h",
             db=proxy.db)  # fmt: skip
    time.sleep(1.2)  # the sidecar's view of which principals have budgets refreshes each second
    blocker = sqlite3.connect(proxy.db, timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        before = sim_total(sim)
        r = httpx.post(
            proxy.url + "/v1/chat/completions",
            json={
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            },
            headers={"x-helexa-account-id": "a", "x-helexa-key-id": "locked-key"},
            timeout=30,
        )
        dispatched = sim_total(sim) - before
    finally:
        blocker.rollback()
        blocker.close()
    if fail_open:
        assert r.status_code == 200 and dispatched == 1
    else:
        assert r.status_code == 503 and dispatched == 0
        assert r.json()["error"]["code"] == "service_unavailable"
        assert int(r.headers["retry-after"]) >= 1
