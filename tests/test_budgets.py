"""Budget arithmetic: reserve/settle/release, balances, rolling windows, sweep, estimates."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from prometheus_client import CollectorRegistry

from spendtap.metrics.budgets import BudgetCollector
from spendtap.store.budgets import (
    EPOCH_TS,
    UNBUDGETED,
    USD,
    Budgets,
    BudgetUnavailable,
    format_window,
    owner_alive,
    parse_window,
    process_owner,
    prompt_tokens_upper_bound,
    reservation_tokens,
)
from spendtap.store.ledger import Ledger, LedgerNotFound
from spendtap.store.writer import LedgerWriter
from spendtap.timeparse import parse_datetime, ts_from_epoch
from tests.helpers import dead_owner

T0 = parse_datetime("2025-01-31T12:00:00Z").timestamp()
OWNER = "test-host:1:1"


def row(id_: str, ts: float, tokens: int, *, account="acme", key="k1", completion=0) -> dict:
    return {
        "id": id_,
        "ts": ts_from_epoch(ts),
        "account": account,
        "key": key,
        "outcome": "completed",
        "prompt_tokens": tokens,
        "completion_tokens": completion,
        "usage_source": "reported",
    }


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def budgets(path):
    b = Budgets(path)
    yield b
    b.close()


@pytest.fixture
def ledger(path, budgets):
    lg = Ledger(path)
    yield lg
    lg.close()


# -- windows ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("balance", None),
        ("15m", 900),
        ("1h", 3600),
        ("1d", 86400),
        ("30d", 2592000),
        ("1h30m", 5400),
    ],
)
def test_parse_window(text, seconds):
    """Windows parse to seconds (None for a balance) and format back."""
    assert parse_window(text) == seconds
    assert parse_window(format_window(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "forever", "0s", "1x", "-1h"])
def test_parse_window_rejects(text):
    """Bad windows raise ValueError naming what is accepted."""
    with pytest.raises(ValueError, match="window"):
        parse_window(text)


# -- configuration ---------------------------------------------------------------------


def test_set_get_list_remove(budgets):
    """A budget can be created, changed, listed and removed."""
    b = budgets.set("key", "k1", 1000, 3600, now=T0)
    assert (b.scope, b.principal, b.cap, b.window_s, b.window) == ("key", "k1", 1000, 3600, "1h")
    assert b.since == EPOCH_TS  # a new window counts what is already in it
    budgets.set("account", "acme", 5000, None, now=T0)
    assert budgets.get("account", "acme").since == ts_from_epoch(T0)
    assert [(x.scope, x.principal) for x in budgets.list()] == [("key", "k1"), ("account", "acme")]
    assert budgets.remove("key", "k1") is True
    assert budgets.remove("key", "k1") is False
    assert budgets.get("key", "k1") is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("team", "x", 1, None), "scope"),
        (("key", "", 1, None), "principal"),
        (("key", "x", -1, None), "cap"),
        (("key", "x", 1.5, None), "cap"),
        (("key", "x", 1, 0), "window"),
    ],
)
def test_set_rejects_bad_arguments(budgets, args, match):
    """Bad scope, principal, cap or window raise ValueError."""
    with pytest.raises(ValueError, match=match):
        budgets.set(*args)


def test_cap_change_keeps_since_and_reset_restarts(budgets, ledger):
    """Changing a balance's cap keeps the spend; --reset counts from now."""
    budgets.set("key", "k1", 1000, None, now=T0)
    ledger.insert_rows([row("a", T0 + 1, 300)])
    budgets.set("key", "k1", 2000, None, now=T0 + 10)
    assert budgets.status("key", "k1", T0 + 10).spent == 300
    budgets.set("key", "k1", 2000, None, reset=True, now=T0 + 20)
    status = budgets.status("key", "k1", T0 + 20)
    assert (status.spent, status.remaining) == (0, 2000)


def test_balance_counts_only_rows_since(budgets, ledger):
    """A balance ignores rows before it was set, however they arrive."""
    ledger.insert_rows([row("old", T0 - 100, 500)])
    budgets.set("key", "k1", 1000, None, now=T0)
    ledger.insert_rows([row("late", T0 - 1, 400), row("new", T0 + 1, 100)])
    assert budgets.status("key", "k1", T0 + 2).spent == 100


def test_running_total_equals_recount(budgets, ledger, path):
    """A balance's running total equals a recount of the rows, also after deletes and updates."""
    budgets.set("key", "k1", 10**9, None, now=T0)
    budgets.set("account", "acme", 10**9, None, now=T0)
    ledger.insert_rows([row(f"r{i}", T0 + i, i * 7, completion=i) for i in range(50)])
    ledger.insert_rows([row("r1", T0, 999)])  # a duplicate id is ignored, not counted
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM requests WHERE id IN ('r3', 'r4')")
        conn.execute("UPDATE requests SET prompt_tokens = 1000 WHERE id = 'r5'")
        conn.execute("UPDATE requests SET key = 'k2' WHERE id = 'r6'")
    recount_key, recount_account = conn.execute(
        "SELECT sum(CASE WHEN key = 'k1' THEN prompt_tokens + completion_tokens END), "
        "sum(prompt_tokens + completion_tokens) FROM requests"
    ).fetchone()
    conn.close()
    assert budgets.status("key", "k1", T0 + 100).spent == recount_key
    assert budgets.status("account", "acme", T0 + 100).spent == recount_account


# -- reserve ----------------------------------------------------------------------------


def test_unbudgeted_and_anonymous_reserve_nothing(budgets):
    """Principals without a budget, and anonymous requests, get no reservation."""
    assert budgets.reserve("f1", "acme", "k1", 10**9, OWNER, T0) == UNBUDGETED
    assert budgets.reserve("f2", None, None, 10, OWNER, T0) == UNBUDGETED
    assert not UNBUDGETED.budgeted
    assert budgets.reservations() == []


def test_reserve_until_the_balance_is_spent(budgets):
    """Reservations are admitted while spent + reserved + tokens <= cap, then refused."""
    budgets.set("key", "k1", 1000, None, now=T0)
    first = budgets.reserve("f1", "acme", "k1", 600, OWNER, T0)
    assert (first.allowed, first.reservation_id, first.tokens) == (True, "f1", 600)
    assert budgets.reserve("f2", "acme", "k1", 400, OWNER, T0).allowed
    refused = budgets.reserve("f3", "acme", "k1", 1, OWNER, T0)
    assert not refused.allowed
    assert (refused.reason, refused.scope, refused.principal, refused.cap) == (
        "balance",
        "key",
        "k1",
        1000,
    )
    assert (refused.spent, refused.reserved, refused.retry_after_s) == (0, 1000, None)
    status = budgets.status("key", "k1", T0)
    assert (status.spent, status.reserved, status.remaining) == (0, 1000, 0)


def test_reserve_duplicate_id_and_bad_tokens(budgets):
    """Reserving an id twice or a negative amount raises ValueError."""
    budgets.set("key", "k1", 1000, None, now=T0)
    budgets.reserve("f1", "acme", "k1", 1, OWNER, T0)
    with pytest.raises(ValueError, match="already open"):
        budgets.reserve("f1", "acme", "k1", 1, OWNER, T0)
    with pytest.raises(ValueError, match="tokens"):
        budgets.reserve("f2", "acme", "k1", -1, OWNER, T0)


def test_key_and_account_both_bind(budgets):
    """A key is bound by its own cap and by its account's; the tighter refuses."""
    budgets.set("key", "k1", 1000, None, now=T0)
    budgets.set("account", "acme", 500, 3600, now=T0)
    refused = budgets.reserve("f1", "acme", "k1", 600, OWNER, T0)
    assert (refused.allowed, refused.reason, refused.scope, refused.principal) == (
        False,
        "window",
        "account",
        "acme",
    )
    assert refused.too_large and refused.retry_after_s is None
    assert budgets.reserve("f2", "acme", "k1", 500, OWNER, T0).allowed
    # Another key of the account is bound by the account's cap too.
    assert not budgets.reserve("f3", "acme", "k2", 1, OWNER, T0).allowed
    # The balance refusal wins over a window's (waiting does not help).
    budgets.set("key", "k1", 500, None, now=T0)
    assert budgets.reserve("f4", "acme", "k1", 1, OWNER, T0).reason == "balance"


def test_settle_through_the_writer(budgets, path):
    """The writer's batch turns a reservation into spend in one commit, releasing the rest."""
    budgets.set("key", "k1", 1000, None, now=T0)
    budgets.reserve("f1", "acme", "k1", 800, OWNER, T0)
    budgets.reserve("f2", "acme", "k1", 200, OWNER, T0)
    writer = LedgerWriter(path)
    writer.start()
    try:
        writer.submit(row("f1", T0 + 1, 120, completion=30))
        writer.submit(row("f2", T0 + 1, 0) | {"prompt_tokens": None, "usage_source": "none"})
        assert writer.flush(10)
    finally:
        writer.close(10)
    status = budgets.status("key", "k1", T0 + 2)
    assert (status.spent, status.reserved, status.remaining) == (150, 0, 850)
    assert budgets.reservations() == []


def test_release(budgets):
    """Release drops a reservation once; releasing again is a no-op."""
    budgets.set("account", "acme", 100, None, now=T0)
    budgets.reserve("f1", "acme", None, 100, OWNER, T0)
    assert budgets.release("f1") is True
    assert budgets.release("f1") is False
    assert budgets.status("account", "acme", T0).reserved == 0


def test_reserve_fails_cleanly_when_the_ledger_is_locked(path):
    """A ledger locked past the busy timeout raises BudgetUnavailable and reserves nothing."""
    fast = Budgets(path, busy_timeout_s=0.05)
    fast.set("key", "k1", 1000, None, now=T0)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BudgetUnavailable):
            fast.reserve("f1", "acme", "k1", 1, OWNER, T0)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert fast.reservations() == []
    fast.close()


def test_open_existing_only(tmp_path):
    """Budgets(create=False) never creates a ledger."""
    with pytest.raises(LedgerNotFound):
        Budgets(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


# -- rolling windows ----------------------------------------------------------------------


def test_window_spend_ages_out(budgets, ledger):
    """Spend counts while ts > now - window, and no longer once it has aged out."""
    budgets.set("key", "k1", 1000, 3600, now=T0)
    ledger.insert_rows([row("a", T0, 300), row("b", T0 + 600, 200)])
    assert budgets.status("key", "k1", T0 + 3599).spent == 500
    status = budgets.status("key", "k1", T0 + 3600)
    assert status.spent == 200
    assert status.resets_at == ts_from_epoch(T0 + 600 + 3600)
    assert budgets.status("key", "k1", T0 + 4200).spent == 0
    assert budgets.status("key", "k1", T0 + 4200).resets_at is None


def test_window_retry_after_is_when_enough_spend_ages_out(budgets, ledger):
    """retry_after_s is the time until enough of the oldest spend leaves the window."""
    budgets.set("key", "k1", 1000, 3600, now=T0)
    ledger.insert_rows([row("a", T0, 300), row("b", T0 + 600, 300), row("c", T0 + 1200, 300)])
    now = T0 + 1800
    # 900 spent; 400 needs 300 freed: "a" ages out at T0 + 3600.
    refused = budgets.reserve("f1", "acme", "k1", 400, OWNER, now)
    assert (refused.reason, refused.retry_after_s) == ("window", 3600 - 1800)
    # 700 needs 600 freed: "a" and "b", at T0 + 600 + 3600.
    assert budgets.reserve("f2", "acme", "k1", 700, OWNER, now).retry_after_s == 2400
    # At the instant given, the request fits.
    assert budgets.reserve("f3", "acme", "k1", 700, OWNER, T0 + 4200).allowed


def test_window_retry_after_when_reservations_block(budgets, ledger):
    """When open reservations (not spend) block, the retry is short."""
    budgets.set("key", "k1", 1000, 3600, now=T0)
    budgets.reserve("f1", "acme", "k1", 900, OWNER, T0)
    refused = budgets.reserve("f2", "acme", "k1", 200, OWNER, T0 + 1)
    assert refused.retry_after_s == 1.0 and not refused.too_large


def test_window_reset_counts_from_now(budgets, ledger):
    """--reset on a window ignores the spend before it."""
    ledger.insert_rows([row("a", T0, 900)])
    budgets.set("key", "k1", 1000, 3600, now=T0 + 10)
    assert budgets.status("key", "k1", T0 + 10).spent == 900
    budgets.set("key", "k1", 1000, 3600, reset=True, now=T0 + 20)
    assert budgets.status("key", "k1", T0 + 20).spent == 0


# -- sweep and owners ------------------------------------------------------------------------


def test_owner_strings():
    """This process is alive; a finished one, a reused pid and a bad string are judged right."""
    me = process_owner()
    host, pid, _start = me.rsplit(":", 2)
    assert int(pid) == os.getpid()
    assert owner_alive(me)
    assert not owner_alive(dead_owner())
    assert not owner_alive(f"{host}:{os.getpid()}:12345")  # same pid, other start: reused
    assert owner_alive("elsewhere.example:1:1")  # another host cannot be judged
    assert owner_alive("garbage")


def test_sweep_releases_dead_owners_not_live_ones(budgets):
    """Sweep releases the reservations of a dead process and keeps a live one's."""
    budgets.set("account", "acme", 1000, None, now=T0)
    budgets.reserve("live", "acme", None, 100, process_owner(), T0)
    budgets.reserve("dead", "acme", None, 100, dead_owner(), T0)
    assert budgets.sweep(owner_alive, None, T0) == 1
    assert [r["id"] for r in budgets.reservations()] == ["live"]


def test_sweep_by_age(budgets):
    """With an age limit, sweep releases old reservations whoever holds them."""
    budgets.set("account", "acme", 1000, None, now=T0)
    budgets.reserve("old", "acme", None, 100, process_owner(), T0)
    budgets.reserve("new", "acme", None, 100, process_owner(), T0 + 3000)
    assert budgets.sweep(None, 3600, T0 + 3601) == 1
    assert [r["id"] for r in budgets.reservations()] == ["new"]
    assert budgets.status("account", "acme", T0 + 3601).reserved == 100


def test_sweep_marks_requests_a_dead_sidecar_cut_short(budgets, ledger):
    """A dead owner's reservation becomes a marked ledger row; an aged-out one does not."""
    budgets.set("account", "acme", 1000, None, now=T0)
    budgets.reserve("cut-short", "acme", "k1", 100, dead_owner(), T0)
    budgets.reserve("long-running", "acme", "k1", 100, process_owner(), T0)
    assert budgets.sweep(owner_alive, 3600, T0 + 7200) == 2
    rows = {r["id"]: r for r in ledger.requests()}
    assert set(rows) == {"cut-short"}
    marked = rows["cut-short"]
    assert marked["outcome"] == "upstream_error" and marked["usage_source"] == "none"
    assert "sidecar process ended" in marked["error"]
    assert marked["account"] == "acme" and marked["key"] == "k1"
    assert budgets.status("account", "acme", T0 + 7200).spent == 0


# -- estimates ---------------------------------------------------------------------------------


def test_estimate_over_counts_english_and_cjk():
    """The estimate is above a generous real count (4 chars/token English, 1.3 tokens/CJK char)."""
    english = "The quick brown fox jumps over the lazy dog. " * 100
    cjk = "日本語のテキストを数える。" * 100
    for text, real in ((english, len(english) / 4), (cjk, len(cjk) * 1.3)):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
        assert prompt_tokens_upper_bound(body.encode(), "openai-chat") > real


def test_estimate_counts_images_flat_and_never_raises():
    """A base64 image counts a flat figure, not its size; junk bodies count their bytes."""
    image = "data:image/png;base64," + "A" * 1_000_000
    body = json.dumps(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}
            ]
        }
    ).encode()
    assert prompt_tokens_upper_bound(body) < 10_000
    assert prompt_tokens_upper_bound(b"\xff\xfe not json") > 0
    assert prompt_tokens_upper_bound(b"") > 0
    assert prompt_tokens_upper_bound(b"[" * 100_000) > 0


def test_reservation_tokens():
    """A reservation is the estimate plus the output limit, or the fallback."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    prompt = prompt_tokens_upper_bound(body)
    assert reservation_tokens(body, "openai-chat", 100) == prompt + 100
    assert reservation_tokens(body, "openai-chat", None, fallback_max_output=7) == prompt + 7
    assert reservation_tokens(body, "embeddings", None) == prompt
    assert reservation_tokens(body, "other", 100) == 0


# -- metrics -------------------------------------------------------------------------------------


def test_collector_reads_budgets_at_scrape_time(budgets, ledger, path):
    """The collector reads cap, spent, reserved, remaining and open reservations from the ledger."""
    registry = CollectorRegistry()
    registry.register(BudgetCollector(path, "cortex", clock=lambda: T0 + 10))
    budgets.set("key", "k1", 1000, 3600, now=T0)
    ledger.insert_rows([row("a", T0, 300)])
    budgets.reserve("f1", "acme", "k1", 200, OWNER, T0 + 5)
    labels = {"scope": "key", "principal": "k1"}
    get = registry.get_sample_value
    assert get("cortex_budget_cap_tokens", labels) == 1000
    assert get("cortex_budget_spent_tokens", labels) == 300
    assert get("cortex_budget_reserved_tokens", labels) == 200
    assert get("cortex_budget_remaining_tokens", labels) == 500
    assert get("cortex_open_reservations") == 1
    budgets.release("f1")
    assert get("cortex_open_reservations") == 0
    assert get("cortex_budget_scrape_errors_total") == 0


def test_collector_without_a_ledger(tmp_path):
    """A ledger that does not exist yet gives zero reservations and no error."""
    registry = CollectorRegistry()
    registry.register(BudgetCollector(tmp_path / "none.db", "x"))
    assert registry.get_sample_value("x_open_reservations") == 0
    assert not (tmp_path / "none.db").exists()


# -- money caps -----------------------------------------------------------------------

CENT = 10_000_000  # nano-dollars


def priced(id_: str, ts: float, nusd: int | None, *, key="k1", account="acme") -> dict:
    return row(id_, ts, 10, key=key, account=account) | {
        "cost_nusd": nusd,
        "price_source": "none" if nusd is None else "file:test",
    }


def test_money_cap_reserves_and_settles_in_dollars(budgets, path):
    """A money balance admits what fits, refuses what does not, and settles each row's
    real cost in the commit that drops its reservation."""
    budgets.set("key", "k1", 10 * CENT, None, now=T0, unit=USD)
    first = budgets.reserve("f1", "acme", "k1", 500, OWNER, T0, nusd=6 * CENT, model="m")
    assert first.allowed and first.reservation_id == "f1"
    refused = budgets.reserve("f2", "acme", "k1", 500, OWNER, T0, nusd=5 * CENT, model="m")
    assert not refused.allowed and refused.reason == "balance" and refused.unit == USD
    assert (refused.cap, refused.spent, refused.reserved, refused.requested) == (
        10 * CENT, 0, 6 * CENT, 5 * CENT,
    )  # fmt: skip
    writer = LedgerWriter(path)
    writer.start()
    try:
        writer.submit(priced("f1", T0 + 1, 2 * CENT))  # cost less than reserved
        assert writer.flush(10)
    finally:
        writer.close(10)
    status = budgets.status("key", "k1", T0 + 2, unit=USD)
    assert (status.spent, status.reserved, status.remaining) == (2 * CENT, 0, 8 * CENT)
    assert budgets.reserve("f2", "acme", "k1", 500, OWNER, T0 + 2, nusd=5 * CENT).allowed


def test_money_and_token_caps_both_bind(budgets):
    """A key with a token cap and a money cap: whichever is tighter refuses."""
    budgets.set("key", "k1", 1000, None, now=T0)
    budgets.set("key", "k1", 10 * CENT, None, now=T0, unit=USD)
    assert [b.unit for b in budgets.list()] == ["tokens", "usd"]
    by_tokens = budgets.reserve("a", "acme", "k1", 1001, OWNER, T0, nusd=CENT)
    assert not by_tokens.allowed and by_tokens.unit == "tokens" and by_tokens.too_large
    by_money = budgets.reserve("b", "acme", "k1", 10, OWNER, T0, nusd=11 * CENT)
    assert not by_money.allowed and by_money.unit == USD and by_money.too_large
    assert budgets.reserve("c", "acme", "k1", 10, OWNER, T0, nusd=CENT).allowed
    reservations = budgets.reservations()
    assert [(r["tokens"], r["nusd"]) for r in reservations] == [(10, CENT)]


def test_unpriced_model_is_refused_under_a_money_cap(budgets):
    """No price, no free ride: a money cap refuses a request it cannot price; a token cap
    alone does not care."""
    budgets.set("account", "acme", 100 * CENT, 86400, now=T0, unit=USD)
    d = budgets.reserve("f1", "acme", "k1", 10, OWNER, T0, nusd=None, model="house-7b")
    assert not d.allowed and d.reason == "unpriced" and d.model == "house-7b"
    assert d.retry_after_s is None
    assert budgets.reservations() == []
    budgets.remove("account", "acme", unit=USD)
    budgets.set("account", "acme", 1000, None, now=T0)
    assert budgets.reserve("f1", "acme", "k1", 10, OWNER, T0, nusd=None).allowed


def test_money_window_ages_out_with_retry_after(budgets, ledger):
    budgets.set("key", "k1", 10 * CENT, 3600, now=T0, unit=USD)
    ledger.insert_rows([priced("a", T0, 4 * CENT), priced("b", T0 + 600, 5 * CENT)])
    d = budgets.reserve("f", "acme", "k1", 10, OWNER, T0 + 700, nusd=3 * CENT)
    assert not d.allowed and d.reason == "window"
    # 3 cents more needs 2 cents freed: row "a" (4 cents) ages out at T0 + 3600.
    assert d.retry_after_s == pytest.approx(3600 - 700)
    assert budgets.reserve("f", "acme", "k1", 10, OWNER, T0 + 3601, nusd=3 * CENT).allowed


def test_repricing_moves_money_spend(budgets, ledger):
    """The triggers follow a cost that changes after the fact (spendtap reprice)."""
    budgets.set("key", "k1", 100 * CENT, None, now=T0, unit=USD)
    ledger.insert_rows([priced("a", T0 + 1, 4 * CENT), priced("b", T0 + 2, None)])
    assert budgets.status("key", "k1", T0 + 3, unit=USD).spent == 4 * CENT
    ledger.set_costs([("a", 7 * CENT, "file:new"), ("b", CENT, "file:new")])
    assert budgets.status("key", "k1", T0 + 3, unit=USD).spent == 8 * CENT


def test_collector_exports_money_budgets_in_dollars(budgets, ledger, path):
    registry = CollectorRegistry()
    registry.register(BudgetCollector(path, "cortex", clock=lambda: T0 + 10))
    budgets.set("key", "k1", 250 * CENT, 86400, now=T0, unit=USD)
    ledger.insert_rows([priced("a", T0, 50 * CENT)])
    labels = {"scope": "key", "principal": "k1"}
    get = registry.get_sample_value
    assert get("cortex_budget_cap_usd", labels) == 2.5
    assert get("cortex_budget_spent_usd", labels) == 0.5
    assert get("cortex_budget_remaining_usd", labels) == 2.0
    assert get("cortex_budget_usd_window_seconds", labels) == 86400
    assert get("cortex_budget_cap_tokens", labels) is None
