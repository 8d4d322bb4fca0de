"""Refusal responses: exact statuses, envelopes and headers for OpenAI and Anthropic clients."""

from __future__ import annotations

import json

import pytest

from spendtap.proxy.refusals import (
    budget_refusal,
    invalid_api_key,
    retry_after_header,
    service_unavailable,
)
from spendtap.store.budgets import Decision

BALANCE = Decision(
    allowed=False, reason="balance", scope="key", principal="k1", cap=1000, spent=990,
    reserved=0, tokens=50,
)  # fmt: skip
WINDOW = Decision(
    allowed=False, reason="window", scope="account", principal="acme", cap=5000,
    window_s=3600, spent=4900, reserved=50, tokens=200, retry_after_s=12.2,
)  # fmt: skip


def test_balance_openai():
    """A spent balance is 429 insufficient_quota, with no Retry-After (waiting will not help)."""
    status, headers, body = budget_refusal("openai-chat", BALANCE)
    assert status == 429
    assert headers == {
        "content-type": "application/json",
        "x-spendtap-refusal": "balance",
        "x-should-retry": "false",
    }
    assert json.loads(body) == {
        "error": {
            "message": "You exceeded your current quota: key 'k1' has a balance of 1000 "
            "tokens: used 990, reserved 0 by requests in flight, 10 left; this request "
            "needs up to 50 tokens.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }


def test_balance_with_some_left_says_what_is_left():
    """204 of 300 spent, about 100 needed: the message gives cap, used, reserved, need."""
    d = Decision(
        allowed=False, reason="balance", scope="key", principal="k", cap=300, spent=204,
        reserved=20, tokens=100,
    )  # fmt: skip
    message = json.loads(budget_refusal("openai-chat", d)[2])["error"]["message"]
    assert "has used its balance" not in message
    for part in ("balance of 300 tokens", "used 204", "reserved 20", "76 left", "needs up to 100"):
        assert part in message, message


def test_window_openai():
    """A window is 429 rate_limit_exceeded with Retry-After in whole seconds, rounded up."""
    status, headers, body = budget_refusal("openai-responses", WINDOW)
    assert status == 429
    assert headers == {
        "content-type": "application/json",
        "x-spendtap-refusal": "window",
        "retry-after": "13",
    }  # a window refusal may be retried: no x-should-retry
    assert json.loads(body) == {
        "error": {
            "message": "Rate limit reached for account 'acme': limit 5000 tokens per 1h, "
            "used 4900, reserved 50, requested 200. Please try again in 13s.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


@pytest.mark.parametrize("decision", [BALANCE, WINDOW])
def test_anthropic_shape_never_402(decision):
    """On /v1/messages both budget refusals are 429 rate_limit_error in Anthropic's envelope."""
    status, headers, body = budget_refusal("anthropic-messages", decision)
    doc = json.loads(body)
    assert status == 429
    assert doc["type"] == "error"
    assert set(doc["error"]) == {"type", "message"}
    assert doc["error"]["type"] == "rate_limit_error"
    assert ("retry-after" in headers) == (decision.reason == "window")
    assert ("x-should-retry" in headers) == (decision.reason == "balance")


def test_balance_too_large_is_final():
    """A request larger than the whole balance is never retried, and says so."""
    d = Decision(
        allowed=False, reason="balance", scope="key", principal="k1", cap=100, spent=0,
        reserved=0, tokens=500, too_large=True,
    )  # fmt: skip
    _status, headers, _body = budget_refusal("openai-chat", d)
    assert headers["x-should-retry"] == "false" and "retry-after" not in headers
    assert headers["x-spendtap-refusal"] == "balance_too_large"


def test_service_unavailable_may_be_retried():
    """A ledger that cannot reserve now may later: Retry-After, no x-should-retry."""
    _status, headers, _body = service_unavailable("openai-chat")
    assert "x-should-retry" not in headers and headers["retry-after"] == "1"


def test_window_too_large_has_no_retry_after():
    """A request larger than a window's cap is refused without Retry-After."""
    d = Decision(
        allowed=False, reason="window", scope="key", principal="k1", cap=100, window_s=60,
        spent=0, reserved=0, tokens=500, too_large=True,
    )  # fmt: skip
    status, headers, body = budget_refusal("openai-chat", d)
    assert status == 429 and "retry-after" not in headers
    assert headers["x-should-retry"] == "false"
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert "more than the limit of 100 tokens per 1m" in json.loads(body)["error"]["message"]


def test_allowed_decision_is_not_a_refusal():
    """Building a refusal from an allowed decision is a programming error."""
    with pytest.raises(ValueError):
        budget_refusal("openai-chat", Decision(allowed=True))


def test_invalid_api_key_both_shapes():
    """An unknown key is 401 invalid_api_key (OpenAI) or authentication_error (Anthropic)."""
    status, headers, body = invalid_api_key("openai-chat")
    assert status == 401
    assert headers == {
        "content-type": "application/json",
        "x-spendtap-refusal": "invalid_api_key",
        "x-should-retry": "false",
    }
    assert json.loads(body) == {
        "error": {
            "message": "Incorrect API key provided: it is missing, unknown or revoked.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    status, _headers, body = invalid_api_key("anthropic-messages")
    assert status == 401
    assert json.loads(body) == {
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": "Incorrect API key provided: it is missing, unknown or revoked.",
        },
    }


def test_service_unavailable():
    """A ledger that cannot reserve gives 503 service_unavailable with Retry-After."""
    status, headers, body = service_unavailable("openai-chat", 2.5)
    assert status == 503 and headers["retry-after"] == "3"
    assert json.loads(body)["error"]["code"] == "service_unavailable"
    status, _h, body = service_unavailable("anthropic-messages")
    assert status == 503 and json.loads(body)["error"]["type"] == "api_error"


@pytest.mark.parametrize(("seconds", "text"), [(0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2")])
def test_retry_after_rounds_up(seconds, text):
    """Retry-After is whole seconds, rounded up, at least 1."""
    assert retry_after_header(seconds) == text
