"""The responses spendtap answers with itself, instead of dispatching a request.

Pure builders: each returns ``(status, headers, body)``, which the hook layer
turns into ``http.Response.make(status, body, headers)``. The body is the
error envelope the client's SDK already understands:

- OpenAI-compatible APIs: ``{"error": {"message", "type", "param": null, "code"}}``
- Anthropic Messages (``api == "anthropic-messages"``):
  ``{"type": "error", "error": {"type", "message"}}``
- Gemini: ``{"error": {"code", "message", "status"}}`` (``RESOURCE_EXHAUSTED``,
  ``UNAUTHENTICATED``, ``UNAVAILABLE``); Ollama: ``{"error": "message"}``;
  Cohere: ``{"message": "..."}``

Statuses:

- 429 for a budget: ``insufficient_quota`` for a spent balance (retrying will
  not help; never 402, which SDKs do not handle), ``rate_limit_exceeded`` with
  ``Retry-After`` (whole seconds, rounded up) for a rolling window;
  Anthropic ``rate_limit_error`` for both.
- 403 ``model_not_priced`` (Anthropic ``permission_error``) when a money cap
  applies and the model has no known price: it cannot be charged, so it is not
  served for free.
- 401 ``invalid_api_key`` (Anthropic ``authentication_error``) for an unknown
  or missing bearer key when authentication is required.
- 503 ``service_unavailable`` with ``Retry-After`` when the ledger cannot
  reserve (Anthropic ``api_error``).
- 503 ``spendtap_misconfigured`` when spendtap was started with a setting it
  cannot honour: it refuses every request rather than proxy unmetered.
- 502 ``upstream_unavailable`` (504 ``upstream_timeout``) when the inference
  server cannot be reached, fails TLS, times out or closes the connection
  before its response head (Anthropic ``api_error``). These replace
  mitmproxy's HTML error page; the message never names the upstream's address.

Refusals no wait can cure (a spent balance, a request larger than the whole
cap, an unknown key) carry ``x-should-retry: false``, which the official
openai and anthropic SDKs obey: one attempt, not three. Window refusals carry
``Retry-After`` instead, which they wait for.

Messages name the scope, principal and cap; never a secret or a header value.
Every refusal carries ``x-spendtap-refusal`` with a short machine-readable reason.
"""

from __future__ import annotations

import json
import math

from spendtap.metering.usage import (
    ANTHROPIC_MESSAGES,
    COHERE_CHAT,
    COHERE_EMBED,
    GEMINI,
    OLLAMA_CHAT,
    OLLAMA_EMBED,
    OLLAMA_GENERATE,
    RERANK,
)
from spendtap.store.budgets import Decision, format_amount, format_window

__all__ = [
    "REFUSAL_HEADER",
    "SHOULD_RETRY_HEADER",
    "budget_refusal",
    "invalid_api_key",
    "misconfigured",
    "retry_after_header",
    "service_unavailable",
    "upstream_failure",
]

REFUSAL_HEADER = "x-spendtap-refusal"
SHOULD_RETRY_HEADER = "x-should-retry"  # the openai and anthropic SDKs' retry override

# google.rpc.Code names of the statuses spendtap answers with, for Gemini's envelope.
_GOOGLE_STATUS = {401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
_OLLAMA = (OLLAMA_CHAT, OLLAMA_GENERATE, OLLAMA_EMBED)
_COHERE = (COHERE_CHAT, COHERE_EMBED, RERANK)

Refusal = tuple[int, dict[str, str], bytes]


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` as whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def _build(
    api: str | None,
    status: int,
    message: str,
    openai_type: str,
    openai_code: str,
    anthropic_type: str,
    reason: str,
    retry_after_s: float | None = None,
    final: bool = False,
) -> Refusal:
    if api == ANTHROPIC_MESSAGES:
        doc: dict = {"type": "error", "error": {"type": anthropic_type, "message": message}}
    elif api == GEMINI:
        doc = {
            "error": {
                "code": status,
                "message": message,
                "status": _GOOGLE_STATUS.get(status, "UNKNOWN"),
            }
        }
    elif api in _OLLAMA:
        doc = {"error": message}
    elif api in _COHERE:
        doc = {"message": message}
    else:
        doc = {
            "error": {"message": message, "type": openai_type, "param": None, "code": openai_code}
        }
    headers = {"content-type": "application/json", REFUSAL_HEADER: reason}
    if retry_after_s is not None:
        headers["retry-after"] = retry_after_header(retry_after_s)
    if final:
        # No wait cures it: the official SDKs obey this header and do not retry.
        headers[SHOULD_RETRY_HEADER] = "false"
    return status, headers, json.dumps(doc).encode()


def budget_refusal(api: str | None, decision: Decision) -> Refusal:
    """The refusal of a reservation (``decision.allowed`` False): 429, or 403 unpriced."""
    if decision.allowed:
        raise ValueError("budget_refusal needs a refused decision")
    who = f"{decision.scope} {decision.principal!r}"

    def amount(n: int | None) -> str:
        return format_amount(decision.unit, n)

    def figure(n: int | None) -> str:  # a bare count for tokens, dollars always marked
        return amount(n) if decision.unit == "usd" else str(n)

    needed = decision.requested if decision.requested is not None else decision.tokens
    if decision.reason == "unpriced":
        cap = amount(decision.cap) + (
            f" per {format_window(decision.window_s)}" if decision.window_s else " balance"
        )
        message = (
            f"Model {decision.model or '(unknown)'!r} has no known price, and {who} has a "
            f"money cap ({cap}): requests it cannot be charged for are refused."
        )
        return _build(
            api, 403, message, "invalid_request_error", "model_not_priced",
            "permission_error", "unpriced", final=True,
        )  # fmt: skip
    if decision.reason == "balance":
        if decision.too_large:
            message = (
                f"This request needs up to {amount(needed)}, more than the "
                f"balance of {amount(decision.cap)} of {who}."
            )
        else:
            used, reserved = decision.spent or 0, decision.reserved or 0
            left = max(0, (decision.cap or 0) - used - reserved)
            message = (
                f"You exceeded your current quota: {who} has a balance of "
                f"{amount(decision.cap)}: used {figure(used)}, reserved {figure(reserved)} by "
                f"requests in flight, {figure(left)} left; this request needs up to "
                f"{amount(needed)}."
            )
        return _build(
            api,
            429,
            message,
            "insufficient_quota",
            "insufficient_quota",
            "rate_limit_error",
            "balance_too_large" if decision.too_large else "balance",
            final=True,
        )
    window = format_window(decision.window_s)
    if decision.too_large:
        message = (
            f"Request too large: it needs up to {amount(needed)}, more than the "
            f"limit of {amount(decision.cap)} per {window} of {who}."
        )
        retry = None
    else:
        retry = decision.retry_after_s
        wait = f" Please try again in {retry_after_header(retry)}s." if retry is not None else ""
        message = (
            f"Rate limit reached for {who}: limit {amount(decision.cap)} per {window}, "
            f"used {figure(decision.spent)}, reserved {figure(decision.reserved)}, "
            f"requested {figure(needed)}.{wait}"
        )
    return _build(
        api,
        429,
        message,
        "tokens" if decision.unit != "usd" else "cost",
        "rate_limit_exceeded",
        "rate_limit_error",
        "window_too_large" if decision.too_large else "window",
        retry,
        final=decision.too_large,
    )


def invalid_api_key(api: str | None) -> Refusal:
    """The 401 for a missing, unknown or revoked API key (the key is never echoed)."""
    return _build(
        api,
        401,
        "Incorrect API key provided: it is missing, unknown or revoked.",
        "invalid_request_error",
        "invalid_api_key",
        "authentication_error",
        "invalid_api_key",
        final=True,
    )


def service_unavailable(api: str | None, retry_after_s: float = 1.0) -> Refusal:
    """The 503 for a request whose budget cannot be reserved now (the ledger is unavailable)."""
    return _build(
        api,
        503,
        "The budget ledger is unavailable; the request was not sent. Please retry.",
        "server_error",
        "service_unavailable",
        "api_error",
        "ledger_unavailable",
        retry_after_s,
    )


def misconfigured(api: str | None, problem: str) -> Refusal:
    """The 503 for every request while spendtap runs with a setting it cannot honour.

    ``problem`` is the one-line option error (it names the option and what is
    accepted; option errors never echo a secret).
    """
    return _build(
        api,
        503,
        "The metering sidecar is misconfigured and refuses to forward requests "
        f"unmetered: {problem}",
        "server_error",
        "spendtap_misconfigured",
        "api_error",
        "misconfigured",
    )


def _upstream_problem(error: str) -> tuple[int, str, str]:
    """Classify mitmproxy's error message: status, code, and what went wrong in plain words.

    The words never include the message itself: it names the upstream's address.
    """
    text = error.lower()
    if "timed out" in text or "timeout" in text or "errno 110]" in text:
        return 504, "upstream_timeout", "did not answer in time"
    if "tls" in text or "ssl" in text or "certificate" in text or "handshake" in text:
        return 502, "upstream_unavailable", "failed the TLS handshake"
    if "refused" in text or "errno 111]" in text:
        return 502, "upstream_unavailable", "refused the connection"
    if "name or service" in text or "getaddrinfo" in text or "resolve" in text:
        return 502, "upstream_unavailable", "could not be resolved"
    if "connect" in text and "disconnect" not in text:
        return 502, "upstream_unavailable", "could not be reached"
    return 502, "upstream_unavailable", "closed the connection before answering"


def upstream_failure(api: str | None, error: str) -> Refusal:
    """The 502/504 for a request whose upstream failed before its response head.

    ``error`` is mitmproxy's flow error (it stays in the ledger row, never in the answer).
    """
    status, code, what = _upstream_problem(error)
    return _build(
        api,
        status,
        f"The inference server is unavailable: it {what}. The request was not "
        "processed; please retry later.",
        "server_error",
        code,
        "api_error",
        code,
    )
