"""Durations and ISO 8601 times as --since/--until take them, and the ledger's ts text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendtap.timeparse import (
    format_ts,
    normalize_ts,
    parse_datetime,
    parse_duration,
    parse_when,
    ts_from_epoch,
)

NOW = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("0m", timedelta(0)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d12h", timedelta(days=1, hours=12)),
        (" 5m ", timedelta(minutes=5)),
    ],
)
def test_parse_duration(text, expected):
    """Each unit, and units combined largest first, parse to the right timedelta."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("7x", "invalid duration '7x': unknown unit 'x'"),
        ("7", "invalid duration '7': expected an integer and a unit"),
        ("m", "invalid duration 'm': expected an integer and a unit"),
        ("1.5h", "invalid duration '1.5h': expected an integer and a unit"),
        ("-5m", "invalid duration '-5m': expected an integer and a unit"),
        ("30m1h", "invalid duration '30m1h': hours repeated or out of order"),
        ("5m5m", "invalid duration '5m5m': minutes repeated or out of order"),
        ("99999999999w", "invalid duration '99999999999w': too large"),
    ],
)
def test_parse_duration_errors(text, message):
    """A bad duration is a ValueError that quotes it and says what is wrong."""
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-31", datetime(2025, 1, 31, tzinfo=UTC)),
        ("2025-01-31T12:30", datetime(2025, 1, 31, 12, 30, tzinfo=UTC)),
        ("2025-01-31 12:30:15", datetime(2025, 1, 31, 12, 30, 15, tzinfo=UTC)),
        ("2025-01-31T12:30:15Z", datetime(2025, 1, 31, 12, 30, 15, tzinfo=UTC)),
        ("2025-01-31T12:30:15.250Z", datetime(2025, 1, 31, 12, 30, 15, 250000, tzinfo=UTC)),
        ("2025-01-31T14:30:15+02:00", datetime(2025, 1, 31, 12, 30, 15, tzinfo=UTC)),
        ("2025-01-31T07:30:15-05:00", datetime(2025, 1, 31, 12, 30, 15, tzinfo=UTC)),
    ],
)
def test_parse_datetime(text, expected):
    """ISO 8601 with or without time or offset parses to aware UTC; no offset means UTC."""
    got = parse_datetime(text)
    assert got == expected
    assert got.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2025-13-01", "invalid ISO 8601 date/time '2025-13-01': month must be in 1..12"),
        ("2025-01-31T25:00", "invalid ISO 8601 date/time '2025-01-31T25:00': "),
        ("yesterday", "invalid time 'yesterday': expected a duration such as 30s, 15m"),
        ("", "invalid time '': expected a duration"),
    ],
)
def test_parse_datetime_errors(text, message):
    """A bad date/time is a ValueError that quotes it and says what is wrong."""
    with pytest.raises(ValueError) as e:
        parse_datetime(text)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", NOW - timedelta(minutes=15)),
        ("7d", NOW - timedelta(days=7)),
        ("2025-01-01", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01T00:00:00+01:00", datetime(2024, 12, 31, 23, tzinfo=UTC)),
    ],
)
def test_parse_when(text, expected):
    """A duration counts back from now; an ISO time stands as given."""
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid time '': empty"),
        ("   ", "invalid time '   ': empty"),
        ("3 days", "invalid time '3 days': expected a duration such as 30s, 15m, 24h, 7d or 2w"),
        ("7x", "invalid duration '7x': unknown unit 'x'"),
        ("now", "invalid time 'now': expected"),
        ("999999999w", "invalid duration '999999999w': too large"),
        ("500000w", "invalid duration '500000w': too far back"),
    ],
)
def test_parse_when_errors(text, message):
    """What is neither a duration nor an ISO time is a precise ValueError."""
    with pytest.raises(ValueError) as e:
        parse_when(text, NOW)
    assert str(e.value).startswith(message)


def test_parse_when_defaults_to_now():
    """Without a given now, a duration counts back from the current time."""
    before = datetime.now(UTC)
    got = parse_when("1h")
    after = datetime.now(UTC)
    assert before - timedelta(hours=1) <= got <= after - timedelta(hours=1)


@pytest.mark.parametrize(
    ("dt", "expected"),
    [
        (datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC), "2025-01-31T12:00:00.000Z"),
        (datetime(2025, 1, 31, 12, 0, 0, 999999, tzinfo=UTC), "2025-01-31T12:00:00.999Z"),
        (datetime(2025, 1, 31, 12, 0, 0), "2025-01-31T12:00:00.000Z"),
        (
            datetime(2025, 1, 31, 13, 0, 0, tzinfo=timezone(timedelta(hours=1))),
            "2025-01-31T12:00:00.000Z",
        ),
        (datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC), "0005-01-02T03:04:05.000Z"),
    ],
)
def test_format_ts(dt, expected):
    """The ledger's ts text is fixed-width UTC with truncated milliseconds."""
    assert format_ts(dt) == expected


def test_ts_from_epoch():
    """A Unix time becomes ledger ts text."""
    assert ts_from_epoch(0) == "1970-01-01T00:00:00.000Z"
    assert ts_from_epoch(1738324800.25) == "2025-01-31T12:00:00.250Z"


def test_normalize_ts_refuses_bad_values():
    """A bool, another type or an impossible date is refused."""
    with pytest.raises(TypeError):
        normalize_ts(True)
    with pytest.raises(TypeError):
        normalize_ts([2025])
    with pytest.raises(ValueError):
        normalize_ts("2025-13-45T00:00:00.000Z")


@given(st.datetimes(timezones=st.just(UTC)), st.datetimes(timezones=st.just(UTC)))
def test_ts_text_sorts_as_time(a, b):
    """Ledger ts text compares as the (millisecond-truncated) times compare."""
    ta, tb = format_ts(a), format_ts(b)
    assert len(ta) == len(tb) == 24
    ma = a.replace(microsecond=a.microsecond // 1000 * 1000)
    mb = b.replace(microsecond=b.microsecond // 1000 * 1000)
    assert (ta < tb) == (ma < mb)
    assert parse_datetime(ta) == ma
