"""An idle sidecar under ``mitmdump -s`` sleeps, and its entry script is loaded once.

mitmdump's script watcher stats the script every second and reloads spendtap's addons
when the file changes (with flows in flight); spendtap cancels it once the proxy runs
(``spendtap.proxy.noreload``). The writer process and the metrics thread have their own
idle tests (``test_writer_process``, ``test_metrics_server``).
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from tests.helpers import principal, voluntary_switches
from tests.proc import ADDON

pytestmark = pytest.mark.e2e


def test_the_event_loop_sleeps_and_a_changed_script_is_not_reloaded(start_sidecar, sim):
    proxy = start_sidecar(sim.url, quiet=False)
    time.sleep(0.5)
    before = voluntary_switches(proxy.pid)
    time.sleep(2.5)
    assert voluntary_switches(proxy.pid) == before  # nothing woke the loop in 2.5 s
    stat = os.stat(ADDON)
    try:
        os.utime(ADDON, (stat.st_atime, stat.st_mtime + 60))
        time.sleep(2.5)
    finally:
        os.utime(ADDON, (stat.st_atime, stat.st_mtime))
    output = proxy.output()
    assert output.count("Loading script") == 1, output[-2000:]
    assert "the entry script is loaded once" in output
    account, headers = principal()
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)
    assert resp.status_code == 200
    assert proxy.row_for(account)["outcome"] == "completed"
