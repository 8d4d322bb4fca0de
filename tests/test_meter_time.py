"""``iso_utc``: the ledger's timestamp text, formatted once a second and exact."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from spendtap.metering.meter import iso_utc


def _reference(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# Fractions where rounding to microseconds decides the millisecond or the second.
_EDGES = [0.0, 0.5, 0.0009995, 0.0009994999, 0.9994999, 0.9995, 0.9999995, 0.99999949]


@given(
    st.one_of(
        st.floats(min_value=0, max_value=4e9, allow_nan=False),
        st.builds(lambda s, f: s + f, st.integers(0, 4_000_000_000), st.sampled_from(_EDGES)),
    )
)
def test_the_text_datetime_would_give(ts):
    assert iso_utc(ts) == _reference(ts)


def test_seconds_in_any_order_each_formatted_right():
    """The cached second is replaced, never reused for another second."""
    for ts in (1_800_000_000.25, 1_700_000_000.5, 1_800_000_000.75, 1_800_000_001.0):
        assert iso_utc(ts) == _reference(ts)
    assert iso_utc(1_800_000_000.9999996) == "2027-01-15T08:00:01.000Z"
