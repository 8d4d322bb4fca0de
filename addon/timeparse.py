"""Times as people type them on the command line, and as the ledger stores them.

The ledger stores every timestamp as fixed-width ISO 8601 UTC with milliseconds
and a ``Z`` (``2025-01-31T12:00:00.000Z``), so that text order is time order.

``--since``/``--until`` accept either:

- a duration back from now: an integer and a unit, ``30s``, ``15m``, ``24h``,
  ``7d``, ``2w``; parts may be combined, largest first: ``1h30m``, ``1d12h``
- an ISO 8601 date or date-time: ``2025-01-31``, ``2025-01-31T12:00``,
  ``2025-01-31 12:00:00``, ``2025-01-31T12:00:00.250Z``, ``2025-01-31T14:00+02:00``.
  A time without an offset is UTC; a date alone is midnight UTC.

Every parse error is a ``ValueError`` whose message names the offending text
and says what would have been accepted. Nothing here imports click.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = [
    "format_ts",
    "normalize_ts",
    "parse_datetime",
    "parse_duration",
    "parse_when",
    "ts_from_epoch",
]

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_UNIT_NAMES = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_ORDER = "wdhms"

_PART = re.compile(r"(\d+)([a-zA-Z]+)")
_DURATION_SHAPE = re.compile(r"(?:\d+[a-zA-Z]+)+")
_CANONICAL = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")

_HINT = (
    "expected a duration such as 30s, 15m, 24h, 7d or 2w, "
    "or an ISO 8601 date/time such as 2025-01-31 or 2025-01-31T12:00:00Z"
)


def parse_duration(text: str) -> timedelta:
    """Parse ``15m``, ``24h``, ``7d``, ``1h30m``... into a ``timedelta``.

    Raises ``ValueError`` naming the problem: an unknown unit, a repeated or
    out-of-order unit, or text that is not a duration at all.
    """
    s = text.strip()
    if not _DURATION_SHAPE.fullmatch(s):
        raise ValueError(
            f"invalid duration {text!r}: expected an integer and a unit (s, m, h, d, w), "
            "such as 15m, 24h or 7d"
        )
    seconds = 0
    last = -1
    for number, unit in _PART.findall(s):
        if unit not in UNITS:
            raise ValueError(
                f"invalid duration {text!r}: unknown unit {unit!r} "
                "(use s for seconds, m minutes, h hours, d days, w weeks)"
            )
        position = _ORDER.index(unit)
        if position <= last:
            raise ValueError(
                f"invalid duration {text!r}: {_UNIT_NAMES[unit]} repeated or out of order "
                "(write the largest unit first, each once, such as 1d12h)"
            )
        last = position
        seconds += int(number) * UNITS[unit]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"invalid duration {text!r}: too large") from None


def parse_datetime(text: str) -> datetime:
    """Parse an ISO 8601 date or date-time into an aware UTC ``datetime``.

    Without an offset the time is taken as UTC; a date alone is midnight UTC.
    """
    s = text.strip()
    if not s or not s[:4].isdigit():
        raise ValueError(f"invalid time {text!r}: {_HINT}")
    try:
        dt = datetime.fromisoformat(s)
    except ValueError as e:
        raise ValueError(f"invalid ISO 8601 date/time {text!r}: {e}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """Parse a ``--since``/``--until`` value: a duration back from ``now`` or an ISO time.

    ``now`` defaults to the current time; pass one ``now`` for several values
    so that ``--since 1h --until 30m`` measure from the same instant.
    """
    s = text.strip()
    if not s:
        raise ValueError(f"invalid time {text!r}: empty; {_HINT}")
    if _DURATION_SHAPE.fullmatch(s):
        if now is None:
            now = datetime.now(UTC)
        try:
            return now.astimezone(UTC) - parse_duration(s)
        except OverflowError:
            raise ValueError(f"invalid duration {text!r}: too far back") from None
    return parse_datetime(s)


def format_ts(dt: datetime) -> str:
    """The ledger's timestamp text: ``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC, fixed width.

    A naive ``datetime`` is taken as UTC. Milliseconds are truncated, not rounded,
    so a timestamp never moves into the next second.
    """
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    dt = dt.astimezone(UTC)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T"
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def ts_from_epoch(seconds: float) -> str:
    """The ledger's timestamp text for a Unix time (such as ``time.time()``)."""
    return format_ts(datetime.fromtimestamp(seconds, UTC))


def normalize_ts(value: str | datetime | float) -> str:
    """Any accepted timestamp (ledger text, ISO 8601, datetime, Unix time) as ledger text."""
    if isinstance(value, datetime):
        return format_ts(value)
    if isinstance(value, bool):
        raise TypeError("a timestamp cannot be a bool")
    if isinstance(value, int | float):
        return ts_from_epoch(value)
    if isinstance(value, str):
        if _CANONICAL.fullmatch(value):
            datetime.fromisoformat(value)  # rejects 2025-13-45T...
            return value
        return format_ts(parse_datetime(value))
    raise TypeError(
        f"a timestamp must be text, a datetime or a Unix time, not {type(value).__name__}"
    )
