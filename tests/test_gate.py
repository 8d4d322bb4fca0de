"""Gate.admit in process: unbudgeted traffic costs no body walk; budgeted traffic
reserves off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from spendtap.metering.request import parse_request
from spendtap.proxy import gate as gate_module
from spendtap.proxy.gate import Gate
from spendtap.store.budgets import Budgets


def _admit(g: Gate, body: bytes, account: str, key: str):
    info = parse_request("/v1/chat/completions", {}, body)
    return asyncio.run(g.admit("flow-" + account, body, info, account, key))


@pytest.fixture
def gate(tmp_path):
    path = str(tmp_path / "ledger.db")
    g = Gate(path)
    with Budgets(path) as budgets:
        budgets.set("key", "capped", 100, None)
    yield g
    g.close()


def test_unbudgeted_requests_never_walk_the_body(gate, monkeypatch):
    walked = []
    real = gate_module.reservation_split

    def counting(*args, **kwargs):
        walked.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(gate_module, "reservation_split", counting)
    message = {"role": "user", "content": "x" * 100_000}
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [message]}).encode()
    admission = _admit(gate, body, "acme", "free-key")
    assert admission.refusal is None and admission.reservation_id is None
    assert walked == []
    # A budgeted key: the walk happens, on the budgets worker thread, and is refused.
    admission = _admit(gate, body, "acme", "capped")
    assert admission.refusal is not None and admission.reason == "balance"
    assert walked and all(name.startswith("spendtap-budgets") for name in walked)
    small = json.dumps({"model": "m", "max_tokens": 5,
                        "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
    admission = _admit(gate, small, "acme", "capped")
    assert admission.refusal is None and admission.reservation_id == "flow-acme"
