"""The metrics port's server: it answers, sleeps while nobody asks, and stops at once."""

from __future__ import annotations

import os
import socket
import time

import httpx
from prometheus_client import CollectorRegistry, Counter

from spendtap.metrics.server import MetricsServer
from tests.helpers import voluntary_switches


def test_it_answers_sleeps_while_idle_and_stops_at_once():
    registry = CollectorRegistry()
    Counter("spendtap_test_total", "a test counter", registry=registry).inc(3)
    server = MetricsServer("127.0.0.1", 0, registry, lambda: (False, "ledger stuck"))
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert "spendtap_test_total 3.0" in httpx.get(base + "/metrics", timeout=5).text
        health = httpx.get(base + "/healthz", timeout=5)
        assert (health.status_code, health.text) == (503, "ledger stuck\n")
        # Idle: the serving thread waits for a connection without waking (Python's
        # serve_forever polls for a shutdown request twice a second).
        tid = server._thread.native_id
        time.sleep(0.2)
        before = voluntary_switches(os.getpid(), tid)
        time.sleep(1.5)
        assert voluntary_switches(os.getpid(), tid) == before
        assert httpx.get(base + "/healthz", timeout=5).status_code == 503  # still serving
    finally:
        started = time.monotonic()
        server.close()
    assert time.monotonic() - started < 1.0
    assert not server._thread.is_alive()
    # The port is free again.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
