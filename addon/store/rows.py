"""A ledger row: its columns, the words it may hold, how one is checked, how it is read.

Both stores keep these rows (``ledger``, SQLite, where they are written; ``central``,
PostgreSQL, where a fleet ships them) and ``queries`` reads them back from either; so
the row's vocabulary lives here, below all three. ``spendtap.store.ledger`` re-exports
every name.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from spendtap.timeparse import normalize_ts

COMPLETED = "completed"
CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_ERROR = "upstream_error"
REJECTED = "rejected"
OUTCOMES = (COMPLETED, CLIENT_DISCONNECTED, UPSTREAM_ERROR, REJECTED)
USAGE_SOURCES = ("reported", "estimated", "none")
REPORT_BY = (
    "account", "key", "model", "node", "api", "path", "outcome", "price_source", "day", "hour",
)  # fmt: skip
REPORT_SORT = ("tokens", "cost", "requests")

TEXT_COLUMNS = ("account", "key", "model", "node", "api", "method", "path")
TOKEN_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
)
REAL_COLUMNS = ("ttft_s", "duration_s", "tokens_per_s")
# The server's own timing of the request, when it reports one (Ollama's nanosecond
# durations, llama.cpp's ``timings``): prompt evaluation and decoding, in seconds.
SERVER_TIMING_COLUMNS = ("server_prompt_s", "server_decode_s")

# Every column of ``requests``, in table order: the keys of a row dict.
COLUMNS = (
    "id",
    "ts",
    *TEXT_COLUMNS,
    "streamed",
    "status",
    "outcome",
    *TOKEN_COLUMNS,
    "usage_source",
    *REAL_COLUMNS,
    "error",
    "response_bytes",
    "cost_nusd",
    "price_source",
    *SERVER_TIMING_COLUMNS,
)
# What readers see of a row: the cost in dollars (a Decimal, exact) instead of the
# stored integer nano-dollars.
ROW_FIELDS = tuple("cost_usd" if c == "cost_nusd" else c for c in COLUMNS)

MAX_ERROR_LEN = 200
MAX_TEXT_LEN = 512


def _text(name: str, value: Any, limit: int = MAX_TEXT_LEN) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be text or None, not {type(value).__name__}")
    return value[:limit]


def _int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer or None, not {type(value).__name__}")
    return value


def _real(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number or None, not {type(value).__name__}")
    value = float(value)
    return value if math.isfinite(value) else None


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one request row and return it with exactly ``COLUMNS`` as keys.

    Missing columns are NULL (``id`` and ``ts`` are required). ``ts`` may be
    ledger text, any ISO 8601 text, a ``datetime`` or a Unix time. ``error`` is
    cut to its first line and 200 characters. Raises ``ValueError`` or
    ``TypeError`` on an unknown column or a value of the wrong type.
    """
    unknown = set(row) - set(COLUMNS) - {"cost_usd"}  # cost_usd: derived, as read
    if unknown:
        raise ValueError(f"unknown ledger column(s): {', '.join(sorted(unknown))}")
    rid = row.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError("a ledger row needs a non-empty text id")
    if row.get("ts") is None:
        raise ValueError("a ledger row needs a ts")
    out: dict[str, Any] = {"id": rid[:MAX_TEXT_LEN], "ts": normalize_ts(row["ts"])}
    for name in TEXT_COLUMNS:
        out[name] = _text(name, row.get(name))
    streamed = row.get("streamed")
    if streamed is not None and not isinstance(streamed, bool | int):
        raise TypeError(f"streamed must be a bool or None, not {type(streamed).__name__}")
    out["streamed"] = None if streamed is None else int(bool(streamed))
    out["status"] = _int("status", row.get("status"))
    out["outcome"] = _choice("outcome", row.get("outcome"), OUTCOMES)
    for name in TOKEN_COLUMNS:
        out[name] = _int(name, row.get(name))
    out["usage_source"] = _choice("usage_source", row.get("usage_source"), USAGE_SOURCES)
    for name in REAL_COLUMNS:
        out[name] = _real(name, row.get(name))
    error = _text("error", row.get("error"), limit=10 * MAX_ERROR_LEN)
    if error is not None:
        lines = error.strip().splitlines()
        error = lines[0][:MAX_ERROR_LEN] if lines else ""
    out["error"] = error
    out["response_bytes"] = _int("response_bytes", row.get("response_bytes"))
    cost = _int("cost_nusd", row.get("cost_nusd"))
    if cost is not None and cost < 0:
        raise ValueError(f"cost_nusd must be zero or more, not {cost}")
    out["cost_nusd"] = cost
    out["price_source"] = _text("price_source", row.get("price_source"))
    for name in SERVER_TIMING_COLUMNS:
        out[name] = _real(name, row.get(name))
    return out


NANO = Decimal("1e-9")


def usd(nusd: int | float | None) -> Decimal | None:
    """Stored nano-dollars as exact dollars (9 decimal places; an average rounds half-even)."""
    if nusd is None:
        return None
    return (Decimal(nusd) / 10**9).quantize(NANO, rounding=ROUND_HALF_EVEN)


def _row_out(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("streamed") is not None:
        row["streamed"] = bool(row["streamed"])
    if "cost_nusd" in row:
        row["cost_usd"] = usd(row["cost_nusd"])
    return row
