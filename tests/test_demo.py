"""`spendtap demo`, the README's first command: runs end to end, leaves nothing running,
and its ledger holds a priced row for every request it sent."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import SPENDTAP_SCRIPT

pytestmark = pytest.mark.e2e


def test_demo_runs_and_prices_every_row(tmp_path):
    db = tmp_path / "ledger.db"
    proc = subprocess.run(
        [str(SPENDTAP_SCRIPT), "demo", "--db", str(db), "--requests", "16", "--ttft-ms", "10",
         "--tps", "2000"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "nothing left running" in proc.stdout
    listed = subprocess.run(
        [str(SPENDTAP_SCRIPT), "requests", "--db", str(db), "-f", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = json.loads(listed.stdout)
    assert len(rows) == 16
    with_usage = [r for r in rows if r["prompt_tokens"] is not None]
    assert with_usage
    for row in with_usage:
        assert row["price_source"] and row["price_source"] != "none", row
        assert row["cost_usd"] is not None
