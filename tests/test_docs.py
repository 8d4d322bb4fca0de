"""docs/ says what the code does: every ledger column, metric family and module is
documented, and nothing documented is gone."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from prometheus_client import CollectorRegistry

from spendtap.metrics.budgets import BudgetCollector
from spendtap.metrics.series import CallbackMetrics, Metrics
from spendtap.store.budgets import USD, Budgets
from spendtap.store.ledger import MIGRATIONS_TABLE, Ledger

DOCS = Path(__file__).resolve().parent.parent / "docs"
ADDON = Path(__file__).resolve().parent.parent / "addon"


def _tables(text: str) -> dict[str, set[str]]:
    """Section heading -> the first-column names of its table rows (backticked)."""
    out: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line
        elif line.startswith("| `"):
            out.setdefault(section, set()).add(line.split("`")[1])
    return out


def test_every_ledger_column_is_documented(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    conn = sqlite3.connect(path)
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        if r[0] != MIGRATIONS_TABLE
    ]
    documented = _tables((DOCS / "ledger.md").read_text())
    for table in tables:
        sections = [s for s in documented if f"`{table}`" in s]
        assert sections, f"docs/ledger.md has no section for table {table}"
        columns = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        described = set().union(*(documented[s] for s in sections))
        missing = columns - described
        assert not missing, f"docs/ledger.md lacks {table} columns {sorted(missing)}"
    all_columns = {
        c for t in tables for c in (r[1] for r in conn.execute(f"PRAGMA table_info({t})"))
    }
    stale = set().union(*documented.values()) - all_columns
    assert not stale, f"docs/ledger.md documents columns the ledger lacks: {sorted(stale)}"


def _exported(tmp_path) -> dict[str, str]:
    registry = CollectorRegistry()
    Metrics(registry)
    registry.register(CallbackMetrics("cortex", gauges=[("ledger_queue_depth", "", lambda: 0)],
                                      counters=[(n, "", lambda: 0) for n in (
                                          "ledger_rows_written", "ledger_write_errors",
                                          "ledger_dropped_rows")]))  # fmt: skip
    path = tmp_path / "ledger.db"
    with Budgets(path) as budgets:
        budgets.set("key", "k", 10, 3600)
        budgets.set("key", "k", 10, 3600, unit=USD)
    registry.register(BudgetCollector(path, "cortex"))
    out = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = family.type
    return out


def test_every_metric_family_is_documented(tmp_path):
    exported = _exported(tmp_path)
    rows = {}
    for line in (DOCS / "metrics.md").read_text().splitlines():
        if line.startswith("| `cortex_"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
    assert set(rows) == set(exported), (
        f"undocumented: {sorted(set(exported) - set(rows))}; "
        f"documented but not exported: {sorted(set(rows) - set(exported))}"
    )
    for name, kind in exported.items():
        assert rows[name] == kind, (name, rows[name], kind)


def test_every_core_module_is_placed_on_the_map():
    text = (DOCS / "architecture.md").read_text()
    named = set(re.findall(r"`([a-z_]+)`", text))
    modules = {p.stem for p in ADDON.rglob("*.py") if p.stem not in ("__init__",)}
    missing = modules - named
    assert not missing, f"docs/architecture.md does not place modules {sorted(missing)}"
