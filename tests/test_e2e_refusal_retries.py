"""End to end: what the official SDKs do, with their default retries, with each refusal.

The README's table ("Answers spendtap makes itself") is this file: a refusal no
wait can cure is one attempt (``x-should-retry: false``), a window refusal is
waited out (``Retry-After``) and retried.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import anthropic
import openai
import pytest

from tests.helpers import spendtap
from tests.proc import read_rows

pytestmark = pytest.mark.e2e


def _attempts(db, key: str) -> list[dict]:
    time.sleep(0.3)  # a retry would be right behind
    return [r for r in read_rows(db) if r["key"] == key]


def _budget(db, key: str, cap: int, window: str) -> None:
    spendtap("budget", "set", "--key", key, "--cap", str(cap), "--window", window, db=db)
    time.sleep(1.2)  # the sidecar's view of which principals have budgets refreshes each second


def _openai(sidecar, key: str, **kw) -> openai.OpenAI:
    headers = {"x-helexa-account-id": "acme", "x-helexa-key-id": key}
    return openai.OpenAI(base_url=sidecar.url + "/v1", api_key="x", default_headers=headers, **kw)


def test_openai_makes_one_attempt_for_a_spent_balance(sidecar):
    """A spent balance: the openai SDK with its default retries (2) sends exactly one request."""
    key = "bal-" + uuid.uuid4().hex[:6]
    _budget(sidecar.db, key, 10, "balance")
    with _openai(sidecar, key) as client, pytest.raises(openai.RateLimitError) as refused:
        assert client.max_retries == 2  # the default, untouched
        client.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert refused.value.body["code"] == "insufficient_quota"
    rows = _attempts(sidecar.db, key)
    assert [r["outcome"] for r in rows] == ["rejected"]


def test_anthropic_makes_one_attempt_for_a_request_larger_than_the_cap(sidecar):
    """A request larger than the whole window cap: one attempt from the anthropic SDK too."""
    key = "big-" + uuid.uuid4().hex[:6]
    _budget(sidecar.db, key, 100, "1h")
    headers = {"x-helexa-account-id": "acme", "x-helexa-key-id": key}
    with (
        anthropic.Anthropic(base_url=sidecar.url, api_key="x", default_headers=headers) as client,
        pytest.raises(anthropic.RateLimitError) as refused,
    ):
        client.messages.create(
            model="sim-claude", max_tokens=1000, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.value.response.headers
    assert len(_attempts(sidecar.db, key)) == 1


def test_unknown_key_is_one_attempt(sim, start_sidecar):
    """An unknown bearer key (require_auth): AuthenticationError after one attempt."""
    bearer = start_sidecar(
        sim.url, "spendtap_principal_source=bearer", "spendtap_require_auth=true"
    )
    with (
        openai.OpenAI(base_url=bearer.url + "/v1", api_key="sk-nobody") as client,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        client.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(bearer.rows(expect=1)) == 1


def test_window_refusal_is_waited_out_and_retried(sidecar):
    """A window refusal carries Retry-After: the SDK waits that long, retries, and is served."""
    key = "win-" + uuid.uuid4().hex[:6]
    _budget(sidecar.db, key, 100, "2s")
    with _openai(sidecar, key) as client:

        def call():
            return client.chat.completions.with_raw_response.create(
                model="sim-chat",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=30,
                extra_headers={"x-sim-tokens": "30"},
            )

        call()  # spends most of the window
        started = time.monotonic()
        resp = call()  # refused once, retried after Retry-After, served
        waited = time.monotonic() - started
    assert resp.http_response.status_code == 200
    outcomes = [r["outcome"] for r in _attempts(sidecar.db, key)]
    assert outcomes[0] == "completed" and outcomes[-1] == "completed"
    assert "rejected" in outcomes
    assert waited >= 1.0, "the SDK waited for Retry-After"


def test_balance_refusal_message_when_some_is_left(sidecar):
    """Part of a balance spent, the next request needs more than is left: the SDK's message
    gives the cap, what is used and reserved, and what this request needs."""
    key = "part-" + uuid.uuid4().hex[:6]
    _budget(sidecar.db, key, 100, "balance")
    with _openai(sidecar, key, max_retries=0) as client:

        def call():
            return client.chat.completions.create(
                model="sim-chat",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=30,
                extra_headers={"x-sim-tokens": "30"},
            )

        call()
        with pytest.raises(openai.RateLimitError) as refused:
            call()
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in _attempts(sidecar.db, key)
               if r["outcome"] == "completed")  # fmt: skip
    message = refused.value.body["message"]
    assert 0 < used < 100
    assert f"balance of 100 tokens: used {used}, reserved 0" in message, message
    assert f"{100 - used} left; this request needs up to" in message, message
    assert "has used its balance" not in message


def _metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_reports_keep_refusals_apart(sidecar):
    """One served request and one refused: report says refused 1, errors 0, no_usage 0;
    requests --outcome refused finds it; the chart counts it; the metrics keep it out of
    usage_source (the SpendtapUsageMissing alert) and in rejections_total."""
    key = "rep-" + uuid.uuid4().hex[:6]
    _budget(sidecar.db, key, 100, "balance")
    with _openai(sidecar, key) as client:  # default retries: the refusal is one attempt
        for _ in range(2):
            with contextlib.suppress(openai.RateLimitError):
                client.chat.completions.create(
                    model="sim-chat",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=30,
                    extra_headers={"x-sim-tokens": "30"},
                )
    assert [r["outcome"] for r in _attempts(sidecar.db, key)] == ["completed", "rejected"]
    (report,) = json.loads(spendtap("report", "--by", "key", "--key", key, "-f", "json",
                                    db=sidecar.db))  # fmt: skip
    assert (report["requests"], report["errors"], report["refused"]) == (2, 0, 1)
    assert report["usage_missing"] == 0
    table = spendtap("report", "--by", "key", "--key", key, db=sidecar.db)
    assert "refused" in table.splitlines()[0]
    refused = json.loads(spendtap("requests", "--key", key, "--outcome", "refused", "-f", "json",
                                  db=sidecar.db))  # fmt: skip
    assert [r["status"] for r in refused] == [429]
    chart = spendtap("report", "--chart", "--ascii", "--by", "key", "--key", key, db=sidecar.db)
    assert "(1 refused)" in chart
    rows = read_rows(sidecar.db)
    metrics = sidecar.metrics()
    served = sum(r["outcome"] != "rejected" for r in rows)
    assert _metric_sum(metrics, "cortex_usage_source_total") == served
    assert _metric_sum(metrics, "cortex_rejections_total") == len(rows) - served
