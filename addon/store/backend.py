"""The storage seam: one place that picks the backend for a ``--db``/``--central`` value.

spendtap keeps three things in a store: the request ledger (rows), budgets with
their reservations, and bearer keys. Each has one interface and two backends:

============  ===============================  ==================================
what          SQLite (one node, embedded)      PostgreSQL (the fleet, ``central``)
============  ===============================  ==================================
ledger rows   ``spendtap.store.ledger.Ledger``        ``spendtap.store.central.CentralStore``
budgets       ``spendtap.store.budgets.Budgets``      ``spendtap.store.central.CentralStore``
keys          ``spendtap.store.keys.Keys``            ``spendtap.store.central.CentralKeys``
============  ===============================  ==================================

A value starting with ``postgresql://`` (or ``postgres://``) names PostgreSQL;
anything else is the path of an SQLite file. Callers (the CLI, the addon) open
stores only through these functions, so a third backend is a new module and a
new branch here, not edits across the code. No SQL lives outside the backend
modules.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from spendtap.store.central import is_central_url

__all__ = [
    "BudgetStore",
    "is_central_url",
    "open_budget_store",
    "open_key_store",
    "open_ledger_reader",
]


class BudgetStore(Protocol):
    """What the gate and the CLI need of a budget store (both backends provide it)."""

    def set(self, scope: str, principal: str, cap: int, window_s: int | None, **kw: Any): ...
    def remove(self, scope: str, principal: str) -> bool: ...
    def list(self) -> list: ...
    def status(self, scope: str, principal: str, now: Any = None): ...
    def statuses(self, now: Any = None) -> list: ...
    def reserve(self, reservation_id: str, account, key, tokens: int, owner: str, now=None): ...
    def release(self, reservation_id: str) -> bool: ...
    def reservations(self) -> list[dict[str, Any]]: ...
    def sweep(self, owner_alive=None, older_than_s=None, now=None) -> int: ...
    def close(self) -> None: ...


def open_ledger_reader(db: str | os.PathLike[str]):
    """The ledger's rows for reading: an existing SQLite ledger, or the central store."""
    if is_central_url(db):
        from spendtap.store.central import CentralStore

        return CentralStore(str(db), create=False)
    from spendtap.store.ledger import Ledger

    return Ledger.open_existing(db)


def open_budget_store(
    db: str | os.PathLike[str], *, create: bool = False, readonly: bool = False
) -> BudgetStore:
    """Budgets and reservations in an SQLite ledger or the central store (``readonly``
    opens an SQLite ledger read-only; PostgreSQL's permissions answer for themselves)."""
    if is_central_url(db):
        from spendtap.store.central import CentralStore

        return CentralStore(str(db), create=create and not readonly)
    from spendtap.store.budgets import Budgets

    return Budgets(db, readonly=True) if readonly else Budgets(db, create=create)


def open_key_store(db: str | os.PathLike[str], *, create: bool = False, readonly: bool = False):
    """Bearer keys in an SQLite ledger or the central store."""
    if is_central_url(db):
        from spendtap.store.central import CentralKeys

        return CentralKeys(str(db), create=create and not readonly)
    from spendtap.store.keys import Keys

    return Keys(db, readonly=True) if readonly else Keys(db, create=create)
