"""Keeping what was metered: the SQLite ledger and its writer thread, budgets, keys, and the
fleet's PostgreSQL store (pure: no mitmproxy, no click)."""
