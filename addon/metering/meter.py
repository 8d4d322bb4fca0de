"""One request's metering state, from request to ledger row.

Pure: the hook layer hands it primitives (path, headers, timestamps, chunks)
and gets back a ledger row. ``on_chunk`` is the stream callable mitmproxy calls
for every chunk of the response on its event loop, so it is kept minimal: it
passes the bytes through unchanged and feeds the scanner, and it never raises.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from math import modf

from spendtap.metering.dialect_scanner import make_scanner
from spendtap.metering.estimate import estimate_completion_tokens
from spendtap.metering.inject import InjectedUsageFilter
from spendtap.metering.request import RequestInfo
from spendtap.metering.scanner import ResponseScanner
from spendtap.metering.usage import ESTIMATED, INPUT_ONLY_APIS, NONE, OTHER, REPORTED
from spendtap.store.ledger import CLIENT_DISCONNECTED, COMPLETED, UPSTREAM_ERROR

MAX_ERROR_LEN = 200

# Bound once: ``on_chunk`` reads the clock for every chunk of every response.
_now = time.time


# The last second formatted, as one tuple (replaced whole: safe from any thread).
_second: tuple[int, str] = (0, "1970-01-01T00:00:00.")


def iso_utc(ts: float) -> str:
    """Fixed-width ISO 8601 UTC with milliseconds, so ledger timestamps sort as text.

    The same text as ``datetime.fromtimestamp(ts, UTC)`` formatted (its microseconds
    rounded half to even, carried into the second), with the second's part formatted
    once a second: ``strftime`` was most of a ledger row's cost on the event loop.
    """
    frac, whole = modf(ts)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec += 1
        us -= 1_000_000
    elif us < 0:
        sec -= 1
        us += 1_000_000
    global _second
    cached_sec, prefix = _second
    if sec != cached_sec:
        prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second = (sec, prefix)
    return f"{prefix}{us // 1000:03d}Z"


def outcome_for_error(message: str) -> str:
    """Classify mitmproxy's flow error message."""
    return CLIENT_DISCONNECTED if "client disconnected" in message.lower() else UPSTREAM_ERROR


class FlowMeter:
    __slots__ = (
        "account",
        "chunk_errors",
        "finished",
        "flow_id",
        "info",
        "key",
        "last_activity",
        "method",
        "node",
        "path",
        "rejected",
        "reservation_id",
        "response_bytes",
        "scanner",
        "started_at",
        "status",
        "usage_filter",
    )

    def __init__(
        self,
        flow_id: str,
        started_at: float,
        method: str,
        path: str,
        info: RequestInfo,
        account: str | None,
        key: str | None,
        node: str | None,
    ):
        self.flow_id = flow_id
        self.started_at = started_at
        self.method = method
        # The query string can carry secrets (``?key=...``): never store it.
        self.path = path.split("?", 1)[0][:512]
        self.info = info
        self.account = account
        self.key = key
        self.node = node
        self.scanner: ResponseScanner | None = None
        self.status: int | None = None
        self.response_bytes = 0
        self.chunk_errors = 0
        self.finished = False
        self.last_activity = started_at
        self.rejected = False  # answered by spendtap itself (401/429/503)
        self.reservation_id: str | None = None  # open budget reservation (settled by the row)
        # Set when spendtap asked the upstream for usage the client did not ask for.
        self.usage_filter: InjectedUsageFilter | None = None

    def start_response(
        self, status: int, content_type: str | None, content_encoding: str | None
    ) -> None:
        self.status = status
        self.scanner = make_scanner(self.info.api, content_type, content_encoding)

    def on_chunk(self, data: bytes) -> bytes:
        """mitmproxy's stream callable: pass every byte through, scan on the side."""
        if data:
            self.response_bytes += len(data)
            now = self.last_activity = _now()
            try:
                self.scanner.feed(data, now)
            except Exception:  # the scanner promises not to raise; count it if it ever does
                self.chunk_errors += 1
        return data

    def feed_whole(self, body: bytes, at: float) -> None:
        """Scan a body that arrived whole (held by mitmproxy rather than streamed)."""
        if body:
            self.response_bytes += len(body)
            self.last_activity = at
            self.scanner.feed(body, at)

    def on_chunk_filtered(self, data: bytes) -> bytes | list[bytes]:
        """The stream callable when usage was injected: scan the original, hide the extra.

        A chunk that holds only part of an event is held back: mitmproxy takes an
        empty list as "send nothing yet", whereas b"" would end the response.
        """
        # ``on_chunk`` inlined: one Python call less per chunk on the event loop.
        usage_filter = self.usage_filter
        if data:
            self.response_bytes += len(data)
            now = self.last_activity = _now()
            try:
                self.scanner.feed(data, now)
            except Exception:  # the scanner promises not to raise; count it if it ever does
                self.chunk_errors += 1
            try:
                out = usage_filter.feed(data)
            except Exception:
                self.chunk_errors += 1
                usage_filter.passthrough = True
                return data
            return out if out else []
        try:
            return usage_filter.flush()
        except Exception:
            self.chunk_errors += 1
            usage_filter.passthrough = True
            return data

    def finish(self, outcome: str, now: float, error: str | None = None) -> dict | None:
        """Close the meter and build its ledger row; None if already finished (run once)."""
        if self.finished:
            return None
        self.finished = True
        result = self.scanner.finish(now) if self.scanner is not None else None
        row: dict = {
            "id": self.flow_id,
            "ts": iso_utc(self.started_at),
            "account": self.account,
            "key": self.key,
            "model": self.info.model,
            "node": self.node,
            "api": self.info.api,
            "method": self.method,
            "path": self.path,
            "streamed": bool(self.info.stream),
            "status": self.status,
            "outcome": outcome,
            "prompt_tokens": None,
            "completion_tokens": None,
            "cached_tokens": None,
            "cache_creation_tokens": None,
            "reasoning_tokens": None,
            "usage_source": NONE,
            "ttft_s": None,
            "duration_s": round(max(0.0, now - self.started_at), 6),
            "tokens_per_s": None,
            "error": error[:MAX_ERROR_LEN] if error else None,
            "response_bytes": self.response_bytes,
        }
        if result is None:
            return row
        if row["model"] is None:
            row["model"] = result.response_model
        row["streamed"] = bool(result.streamed_sse or self.info.stream)
        usage = result.usage
        row.update(usage.as_dict())
        row["usage_source"] = REPORTED if usage.reported else NONE
        self._estimate(row, result, outcome)
        if result.error:
            row["error"] = row["error"] or result.error[:MAX_ERROR_LEN]
            if outcome == COMPLETED:
                # An error event inside a 200 stream: the upstream failed mid-answer.
                row["outcome"] = UPSTREAM_ERROR
        first, last = result.first_content_at, result.last_content_at
        if first is not None:
            row["ttft_s"] = round(max(0.0, first - self.started_at), 6)
        completion = row["completion_tokens"]
        timing = result.server_timing
        if timing is not None:
            row["server_prompt_s"] = timing.prompt_s
            row["server_decode_s"] = timing.decode_s
        if timing is not None and timing.decode_tokens_per_s and row["usage_source"] == REPORTED:
            # The server timed its own decoding (Ollama eval_duration, llama.cpp
            # timings): more exact than the proxy's view of chunk arrivals.
            row["tokens_per_s"] = timing.decode_tokens_per_s
        elif completion:
            # Decode rate over the first-to-last content window; a single-chunk body
            # has no window, so fall back to the whole duration (as the seed does).
            if (
                first is not None
                and last is not None
                and last > first
                and result.content_events > 1
            ):
                window = last - first
            else:
                window = now - self.started_at
            if window > 0:
                row["tokens_per_s"] = round(completion / window, 3)
        return row

    def _estimate(self, row: dict, result, outcome: str) -> None:
        """Fill in what the server did not report, never silently leaving a billable 0.

        - nothing reported: estimate prompt from the request and completion from
          the content that streamed (``usage_source = "estimated"``);
        - a stream cut short: the final completion figure never came, so the
          content seen bounds it from below (an Anthropic ``message_start`` only
          carries a placeholder output count).
        """
        if self.status is None or self.status >= 400:
            return  # an error answer generated nothing billable
        if self.info.api == OTHER:
            return  # an API spendtap does not recognise: no guess (counted by path family)
        if result.error and not result.content_events:
            return  # failed before generating anything (e.g. overloaded): not billed
        completion_seen = estimate_completion_tokens(result.output_chars, result.content_events)
        if self.info.api in INPUT_ONLY_APIS:
            completion_seen = None
        if row["usage_source"] == NONE:
            prompt = self.info.prompt_estimate
            if prompt is None and completion_seen is None:
                return
            row["prompt_tokens"] = prompt
            row["completion_tokens"] = completion_seen
            row["usage_source"] = ESTIMATED
        elif (
            outcome != COMPLETED
            and completion_seen is not None
            and (row["completion_tokens"] or 0) < completion_seen
        ):
            row["completion_tokens"] = completion_seen
            row["usage_source"] = ESTIMATED
