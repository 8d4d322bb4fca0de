"""Keeping what was metered: the SQLite ledger and its writer (a process or a thread),
budgets, keys, and the fleet's PostgreSQL store (pure: no mitmproxy, no click)."""
