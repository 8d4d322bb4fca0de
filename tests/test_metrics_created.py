"""Metrics exported without the `*_created` series no dashboard uses."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_no_created_series(sidecar):
    """After real traffic, /metrics of a real sidecar has counters and histograms with
    samples, and not one `*_created` series (prometheus_client would add one to each)."""
    r = httpx.post(
        sidecar.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-helexa-account-id": "a", "x-helexa-key-id": "k"},
        timeout=10,
    )
    assert r.status_code == 200
    sidecar.row_for("a")
    text = sidecar.metrics()
    names = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines()
             if line and not line.startswith("#")}  # fmt: skip
    assert "cortex_requests_total" in names and "cortex_spend_tokens_total" in names
    assert "cortex_request_duration_seconds_bucket" in names
    created = sorted(n for n in names if n.endswith("_created"))
    assert created == [], created
