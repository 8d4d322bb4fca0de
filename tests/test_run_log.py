"""`spendtap run`'s log: start-up, warnings and errors; every flow only with -v.

A new user counted 45 log lines for 12 requests (client connect, server
connect, "Streaming response from ..." for every connection) though the README
said there was no per-flow output. These run the real command in front of the
simulator and read what it printed.
"""

from __future__ import annotations

import signal

import httpx
import pytest

from spendtap.address import free_port, wait_for_port
from tests.helpers import SPENDTAP_MODULE
from tests.proc import Proc

pytestmark = pytest.mark.e2e

PER_FLOW = ("client connect", "server connect", "Streaming response", "client disconnect")


def _run(tmp_path, upstream: str, *extra: str) -> tuple[str, int, list[int]]:
    port, metrics = free_port(), free_port()
    proc = Proc(
        [*SPENDTAP_MODULE, "run", "--upstream", upstream,
         "--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics}",
         "--db", str(tmp_path / f"ledger-{port}.db"), *extra],
        tmp_path / f"run-{port}.log",
    )  # fmt: skip
    try:
        wait_for_port(port, proc.proc)
        wait_for_port(metrics, proc.proc)
        statuses = []
        for i in range(12):
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            if i % 2:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            # A fresh connection each: the per-connection lines would show every time.
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10)
            statuses.append(r.status_code)
    finally:
        code = proc.stop(signal.SIGTERM)
    return proc.log_path.read_text(errors="replace"), code, statuses


def test_default_log_is_start_up_warnings_and_errors(sim, tmp_path):
    """12 requests, default: no per-flow or per-connection line at all."""
    out, code, statuses = _run(tmp_path, sim.url)
    assert statuses == [200] * 12
    assert code == 0, out
    assert not [line for line in out.splitlines() if any(p in line for p in PER_FLOW)], out
    assert "listening at" in out and "metering to ledger" in out
    assert len(out.splitlines()) <= 8, out


def test_verbose_logs_every_flow(sim, tmp_path):
    """-v: the connection lines and the flows are back."""
    out, code, _ = _run(tmp_path, sim.url, "-v")
    assert code == 0, out
    assert sum("client connect" in line for line in out.splitlines()) >= 12, out
    assert "Streaming response" in out and "/v1/chat/completions" in out


def test_upstream_down_is_one_warning(tmp_path):
    """An unreachable upstream: one warning line for 12 failures, not one per request."""
    out, _code, statuses = _run(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert statuses == [502] * 12
    warnings = [line for line in out.splitlines() if "failed before answering" in line]
    assert len(warnings) == 1, out
    assert not [line for line in out.splitlines() if any(p in line for p in PER_FLOW)], out
