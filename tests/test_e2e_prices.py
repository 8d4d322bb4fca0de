"""End to end: a real mitmdump with a price file prices every row it writes.

The official SDKs talk through the sidecar to the simulator; the ledger's cost of each
row equals its usage at the file's rates (computed here by hand), a model in no file
and no catalogue has no cost (never 0), the cost metrics count the same dollars, and
``spendtap report`` / ``reprice`` agree with the rows.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from decimal import Decimal

import openai
import pytest

from tests.helpers import (
    SPENDTAP_SCRIPT,
    anthropic_client,
    openai_client,
    principal,
    read_then_hang_up,
)
from tests.proc import Sidecar, Simulator

pytestmark = pytest.mark.e2e

PRICES = """
[models."sim-*"]
input = 0.50
cached_input = 0.05
output = 1.50
request = 0.000001
"""


def _cost(prompt: int, completion: int) -> int:
    """Nano-dollars at the file's rates (no cache figures from the simulator)."""
    dollars = (prompt * Decimal("0.50") + completion * Decimal("1.50")) / 1_000_000 + Decimal(
        "0.000001"
    )
    return int(dollars * 10**9)


@pytest.fixture
def priced(tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    sim = Simulator(tmp_path)
    sidecar = Sidecar(tmp_path, sim.url, f"spendtap_prices={prices}")
    yield sidecar, prices
    sidecar.stop()
    sim.stop()


def test_rows_carry_their_cost(priced):
    sidecar, prices = priced
    account, headers = principal(key="key-1")
    with openai_client(sidecar.url, headers) as client:
        for _ in range(3):
            client.chat.completions.create(
                model="sim-chat", messages=[{"role": "user", "content": "price me"}],
                max_tokens=20, extra_headers={"x-sim-tokens": "20"},
            )  # fmt: skip
        # A model in neither the file nor the catalogue: no cost, never 0.
        client.chat.completions.create(
            model="house-model-7", messages=[{"role": "user", "content": "and me"}],
            max_tokens=5, extra_headers={"x-sim-tokens": "5"},
        )  # fmt: skip
    with anthropic_client(sidecar.url, headers) as client:
        client.messages.create(
            model="sim-claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-sim-tokens": "16"},
        )  # fmt: skip
    rows = [r for r in sidecar.rows(expect=5) if r["account"] == account]
    assert len(rows) == 5
    total = 0
    for row in rows:
        assert row["prompt_tokens"] and row["completion_tokens"]
        if row["model"] == "house-model-7":
            assert row["cost_nusd"] is None and row["price_source"] == "none"
            continue
        assert row["price_source"] == f"file:{prices}"
        assert row["cost_nusd"] == _cost(row["prompt_tokens"], row["completion_tokens"])
        total += row["cost_nusd"]

    # The metrics count the same dollars, and the unpriced request apart.
    metrics = sidecar.metrics()
    line = next(x for x in metrics.splitlines()
                if x.startswith("cortex_spend_usd_total{") and account in x)  # fmt: skip
    assert abs(float(line.split()[-1]) - total / 1e9) < 1e-9
    assert 'cortex_unpriced_requests_total{model="house-model-7"' in metrics

    # The report's total is the exact sum of the rows.
    out = subprocess.run(
        [str(SPENDTAP_SCRIPT), "report", "--db", str(sidecar.db), "--account", account,
         "-f", "csv"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    header, values = out[0].split(","), out[1].split(",")
    got = dict(zip(header, values, strict=True))
    assert Decimal(got["cost_usd"]) == Decimal(total) / 10**9
    assert got["unpriced"] == "1"

    # Repricing with the same prices changes nothing.
    repriced = subprocess.run(
        [str(SPENDTAP_SCRIPT), "reprice", "--db", str(sidecar.db), "--prices", str(prices)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert " 0 changed;" in repriced, repriced


def test_reprice_after_a_price_change(priced, tmp_path):
    sidecar, _prices = priced
    account = "acct-" + uuid.uuid4().hex[:8]
    headers = {"x-helexa-account-id": account}
    with openai_client(sidecar.url, headers) as client:
        for _ in range(2):
            client.chat.completions.create(
                model="sim-chat", messages=[{"role": "user", "content": "x"}],
                max_tokens=10, extra_headers={"x-sim-tokens": "10"},
            )  # fmt: skip
    rows = [r for r in sidecar.rows(expect=2) if r["account"] == account]
    before = sum(r["cost_nusd"] for r in rows)
    doubled = tmp_path / "doubled.toml"
    doubled.write_text('[models."sim-*"]\ninput = 1.0\ncached_input = 0.1\noutput = 3.0\n'
                       "request = 0.000002\n")  # fmt: skip
    args = [str(SPENDTAP_SCRIPT), "reprice", "--db", str(sidecar.db), "--prices", str(doubled)]
    first = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert " 2 changed;" in first
    assert f"${Decimal(before) / 10**9:.9f} before, ${Decimal(2 * before) / 10**9:.9f} after" in (
        first
    )
    second = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert " 0 changed;" in second


def test_a_bad_price_file_stops_spendtap_run(tmp_path):
    bad = tmp_path / "prices.toml"
    bad.write_text('[models."m"]\ninput = -1\noutput = 1\n')
    proc = subprocess.run(
        [str(SPENDTAP_SCRIPT), "run", "--upstream", "http://127.0.0.1:9", "--prices", str(bad),
         "--db", str(tmp_path / "l.db"), "--metrics", ""],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: spendtap_prices: price file {bad}: models.'m': input must be a finite "
        "number >= 0, got -1"
    ]


DEAR = """
[models."sim-*"]
input = 1000
output = 1000
"""  # a tenth of a cent per token: a few requests reach a cap of ten cents


def test_money_cap_refuses_at_the_right_request_and_serves_again(tmp_path):
    """A key with a $0.10 money cap per 4s window: requests are served while their
    priced reservation fits, the next is refused 429 naming the money cap with a
    Retry-After, and after that wait the key is served again. Spend never passes the
    cap, and each row's cost is its usage at the file's rates."""
    prices = tmp_path / "prices.toml"
    prices.write_text(DEAR)
    sim = Simulator(tmp_path)
    db = tmp_path / "ledger.db"
    subprocess.run(
        [str(SPENDTAP_SCRIPT), "budget", "set", "--key", "k-money", "--cap-usd", "0.10",
         "--window", "4s", "--db", str(db)],
        check=True, capture_output=True,
    )  # fmt: skip
    sidecar = Sidecar(tmp_path, sim.url, f"spendtap_prices={prices}", db=db)
    headers = {"x-helexa-account-id": "acme", "x-helexa-key-id": "k-money"}
    served, refusal = 0, None
    try:
        with openai_client(sidecar.url, headers) as client:

            def ask():
                return client.chat.completions.create(
                    model="sim-chat", messages=[{"role": "user", "content": "hi"}],
                    max_tokens=10, extra_headers={"x-sim-tokens": "10"},
                )  # fmt: skip

            for _ in range(20):
                try:
                    ask()
                    served += 1
                except openai.RateLimitError as e:
                    refusal = e
                    break
            assert refusal is not None and 1 <= served < 20
            message = refusal.body["message"] if isinstance(refusal.body, dict) else str(refusal)
            assert "key 'k-money'" in message and "limit $0.1 per 4s" in message, message
            assert refusal.response.headers["x-spendtap-refusal"] == "window"
            wait = float(refusal.response.headers["retry-after"])
            assert 0 < wait <= 4

            # The house model has no price: under a money cap it is refused, never free.
            with pytest.raises(openai.PermissionDeniedError) as unpriced:
                client.chat.completions.create(
                    model="house-model-7", messages=[{"role": "user", "content": "hi"}],
                    max_tokens=5,
                )  # fmt: skip
            assert unpriced.value.response.headers["x-spendtap-refusal"] == "unpriced"
            assert "has no known price" in str(unpriced.value)

            time.sleep(wait + 0.2)
            ask()  # served again once the window moved on
            served += 1
        rows = sidecar.rows(expect=served + 2)
    finally:
        sidecar.stop()
        sim.stop()
    ok = [r for r in rows if r["status"] == 200]
    assert len(ok) == served
    for r in ok:
        assert r["cost_nusd"] == (r["prompt_tokens"] + r["completion_tokens"]) * 1_000_000
    first_window = sorted(ok, key=lambda r: r["ts"])[:-1]
    assert sum(r["cost_nusd"] for r in first_window) <= 100_000_000  # never past $0.10
    refused = [r for r in rows if r["status"] in (429, 403)]
    assert sorted(r["status"] for r in refused) == [403, 429]


def test_a_stream_cut_short_is_priced_on_what_was_observed(priced):
    """A client that hangs up mid-stream: the row has the usage spendtap observed
    (estimated from what streamed), and its cost is that usage at the file's rates."""
    sidecar, prices = priced
    account = "acct-" + uuid.uuid4().hex[:8]
    headers = {"x-helexa-account-id": account, "x-sim-tokens": "400", "x-sim-tps": "50"}
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": "a long one"}],
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    read_then_hang_up(sidecar.url + "/v1/chat/completions", body, headers, after_bytes=600)
    row = sidecar.row_for(account)
    assert row["outcome"] == "client_disconnected"
    assert 0 < row["completion_tokens"] < 400
    assert row["price_source"] == f"file:{prices}"
    assert row["cost_nusd"] == _cost(row["prompt_tokens"], row["completion_tokens"])
