"""A sidecar in a fleet: the shipper thread, the lease, and the view of who has a budget.

With ``--central`` each sidecar keeps writing its rows to its local SQLite
ledger first (the durable-before-delivery guarantee stays local and fast), and
``Fleet`` runs three background threads beside the proxy:

- the **shipper** copies committed local rows to PostgreSQL in batches, in
  insertion (rowid) order, with ``CentralStore.ship`` (idempotent by row id;
  settles each row's central reservation in the same transaction, and moves
  the node's cursor). After a restart it ships the whole backlog first and only
  then releases the reservations its previous life left open (ship-then-release).
- the **lease** renews this node's lease, and sweeps the reservations of nodes
  whose lease expired (any live node does; a cut-off node's rows still ship
  when it is back, so nothing it served is lost).
- the **budget view** re-reads the set of budgeted principals every second,
  so the request path knows without asking PostgreSQL that a principal has no
  budget; a budget set anywhere takes effect fleet-wide within about a second.

Failure policy: while PostgreSQL is unreachable, rows wait in the local ledger
(nothing is lost; the backlog and lag are exported), the budget view keeps its
last answer, and errors are counted and logged once per episode. Nothing here
runs on the event loop.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from spendtap.store.budgets import process_owner
from spendtap.store.central import CentralKeys, CentralStore, node_identity
from spendtap.store.ledger import Ledger
from spendtap.timeparse import parse_datetime

__all__ = ["BUDGET_VIEW_S", "Fleet", "Shipper"]

_default_logger = logging.getLogger("spendtap.store.fleet")

BUDGET_VIEW_S = 1.0  # how often the set of budgeted principals is re-read


class Shipper:
    """Copies one node's committed local rows to the central store, exactly once.

    A pass ships what is committed; the next comes ``interval_s`` later, or, with
    ``idle_s`` longer than that, once ``wake`` says rows were committed (at most
    ``idle_s`` later: an idle sidecar's shipper then sleeps instead of ticking). A tick
    finding nothing committed since the last pass costs one pragma.
    """

    def __init__(
        self,
        local_db: str,
        store: CentralStore,
        *,
        node_id: str,
        owner: str,
        batch_size: int = 500,
        interval_s: float = 0.2,
        idle_s: float | None = None,
        stuck_after_s: float = 60.0,
        logger: logging.Logger | None = None,
    ):
        self.local_db = local_db
        self.store = store
        self.node_id = node_id
        self.owner = owner
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.idle_s = interval_s if idle_s is None else max(idle_s, interval_s)
        self.stuck_after_s = stuck_after_s
        self.log = logger or _default_logger
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._cursor: int | None = None  # None: read it from PostgreSQL before shipping
        self._known_cursor = 0  # the last cursor seen, for measuring while PostgreSQL is away
        self._mark: str | None = None
        self.backlog_rows = 0
        self.oldest_unshipped_at: float | None = None
        self.rows_shipped = 0  # rows new to the central store (duplicates excluded)
        self.batches_shipped = 0
        self.ship_errors = 0
        self.released_previous_life: int | None = None
        self.last_ship_at: float | None = None
        self._failing_since: float | None = None
        self._passes = 0  # completed ship_once calls (close waits for a fresh one)
        self._seen_version: int | None = None  # the local ledger's data_version last shipped

    # -- figures ----------------------------------------------------------------

    @property
    def lag_seconds(self) -> float:
        """Age of the oldest committed row not yet in PostgreSQL (0 when none waits), from
        the end of its request (when it was written)."""
        if not self.backlog_rows or self.oldest_unshipped_at is None:
            return 0.0
        return max(0.0, time.time() - self.oldest_unshipped_at)

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    @property
    def stuck(self) -> bool:
        """True when a committed row has waited longer than ``stuck_after_s`` to ship."""
        return self.backlog_rows > 0 and self.lag_seconds > self.stuck_after_s

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Shipper already started")
        self._thread = threading.Thread(
            target=self._run, name="spendtap-central-shipper", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Ship now rather than at the next tick (cheap; any thread): rows were committed."""
        self._wake.set()

    def close(self, timeout: float = 10.0) -> bool:
        """Ship what is committed (for at most ``timeout`` s), then stop. True if none waits."""
        deadline = time.monotonic() + timeout
        start = self._passes
        while time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            # A pass that began after this call saw every row committed before it.
            if self._passes > start + 1 and not self.backlog_rows:
                break
            self._wake.set()
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(1.0, deadline - time.monotonic() + self.store.timeout_s + 1))
        return self.backlog_rows == 0

    # -- the thread -----------------------------------------------------------------

    def _run(self) -> None:
        ledger: Ledger | None = None
        backoff = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if ledger is None:
                        ledger = Ledger.open_existing(self.local_db)
                    more = self._ship_if_changed(ledger)
                    self._recovered()
                    backoff = 0.0
                    if more:
                        continue
                    # At most one pass an interval (under load the rows gather meanwhile),
                    # then until a commit wakes it, or ``idle_s`` at most.
                    if self.idle_s > self.interval_s and self._stop.wait(self.interval_s):
                        break
                    wait = self.idle_s
                except Exception as e:
                    self._failed(e)
                    # Re-read the cursor from PostgreSQL, where it commits with the rows: a
                    # server that crashed may have lost a commit this process saw succeed.
                    self._cursor = None
                    self._seen_version = None  # (a version is its connection's): a full pass next
                    if ledger is not None and not isinstance(e, _CENTRAL_ERRORS):
                        with contextlib.suppress(Exception):
                            ledger.close()
                        ledger = None
                    backoff = min(2.0, backoff * 2) if backoff else 0.1
                    wait = backoff
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            if ledger is not None:
                with contextlib.suppress(Exception):
                    ledger.close()

    def _ship_if_changed(self, ledger: Ledger) -> bool:
        """``ship_once``, unless nothing was committed locally since a pass that left
        nothing to ship: a tick over an idle ledger then costs one pragma, not a pass's
        ledger reads."""
        version = ledger.data_version()
        if (
            version == self._seen_version
            and not self.backlog_rows
            and self.released_previous_life is not None
        ):
            self._passes += 1
            return False
        more = self.ship_once(ledger)
        self._seen_version = version  # read before the pass: a commit during it shows next
        return more

    def measure(self, ledger: Ledger, *, head: bool = True) -> int:
        """Backlog and lag from the local ledger alone (against the last known cursor);
        returns the last rowid. ``head=False`` leaves the lag to a caller that reads the
        first waiting row anyway."""
        if self._mark is None:
            first = next(ledger.requests(after_rowid=0, order="asc", limit=1), None)
            self._mark = first["id"] if first else None
            self._cursor = None  # (re)read where this ledger's shipping stopped
        base = self._cursor if self._cursor is not None else self._known_cursor
        last = ledger.last_rowid()
        self.backlog_rows = max(0, last - base)
        if not self.backlog_rows:
            self.oldest_unshipped_at = None
        elif head:
            self.oldest_unshipped_at = _written_at(
                next(ledger.requests(after_rowid=base, order="asc", limit=1), None)
            )
        return last

    def ship_once(self, ledger: Ledger) -> bool:
        """Ship one batch; True when more rows are waiting."""
        # With the cursor known, the batch read below starts at the first waiting row.
        last = self.measure(ledger, head=self._cursor is None)
        if self._cursor is None:
            self._cursor = self.store.shipped_rowid(self.node_id, self._mark)
            self._known_cursor = self._cursor
        rows = list(
            ledger.requests(
                after_rowid=self._cursor, order="asc", limit=self.batch_size, include_rowid=True
            )
        )
        if rows:
            self.oldest_unshipped_at = _written_at(rows[0])
            batch = [(r.pop("rowid"), r) for r in rows]
            self.rows_shipped += self.store.ship(self.node_id, batch, self._mark)
            self.batches_shipped += 1
            self.last_ship_at = time.time()
            self._cursor = self._known_cursor = batch[-1][0]
        # What is left of the rows this pass saw (one committed since shows at the next).
        self.backlog_rows = max(0, last - self._cursor)
        if not self.backlog_rows:
            self.oldest_unshipped_at = None
        elif rows:
            self.measure(ledger)  # a full batch: the lag of the next waiting row
        if not self.backlog_rows and self.released_previous_life is None:
            # Ship-then-release: every row that could settle them is in PostgreSQL now.
            self.released_previous_life = self.store.release_previous_life(self.node_id, self.owner)
            if self.released_previous_life:
                self.log.warning(
                    "spendtap central: released %d reservations left open by this node's "
                    "previous process",
                    self.released_previous_life,
                )
        self._passes += 1
        return self.backlog_rows > 0 and len(rows) == self.batch_size

    def _failed(self, e: Exception) -> None:
        self.ship_errors += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            self.log.warning(
                "spendtap central: cannot ship to %s (%s); rows wait in the local ledger",
                self.store.where,
                e,
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            self.log.warning(
                "spendtap central: shipping to %s recovered after %.1f s",
                self.store.where,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None


def _epoch_of(ts: str) -> float | None:
    try:
        return parse_datetime(ts).timestamp()
    except ValueError:
        return None


def _written_at(row: dict | None) -> float | None:
    """When a row was written: its request's start plus its duration."""
    start = _epoch_of(row["ts"]) if row else None
    return None if start is None else start + (row.get("duration_s") or 0.0)


def _central_errors() -> tuple[type[BaseException], ...]:
    from spendtap.store.central import CentralError

    return (CentralError,)


_CENTRAL_ERRORS = _central_errors()


class Fleet:
    """A sidecar's part of the fleet: the central store, its shipper, lease and budget view.

    Threads: the shipper; the lease (renews this node's lease every third of it,
    and every ``sweep_every_s`` releases reservations of expired leases and,
    with ``reservation_max_age_s``, too old ones); the budget view (re-reads the
    budgeted principals every ``BUDGET_VIEW_S``). None of them waits on another,
    so a stuck shipment never lets the lease expire.
    """

    def __init__(
        self,
        dsn: str,
        local_db: str,
        *,
        timeout_s: float = 2.0,
        lease_s: int = 30,
        reservation_max_age_s: float | None = None,
        sweep_every_s: float = 5.0,
        pool_size: int = 8,
        ship_idle_s: float | None = None,
        logger: logging.Logger | None = None,
    ):
        self.log = logger or _default_logger
        self.store = CentralStore(dsn, pool_size=pool_size, timeout_s=timeout_s, open_now=False)
        self._keys = CentralKeys.over(self.store)
        self.node_id = node_identity(local_db)
        self.owner = process_owner()
        self.lease_s = lease_s
        self.reservation_max_age_s = reservation_max_age_s
        self.sweep_every_s = sweep_every_s
        self.shipper = Shipper(
            local_db, self.store, node_id=self.node_id, owner=self.owner,
            idle_s=ship_idle_s, logger=self.log,
        )  # fmt: skip
        self._budgeted: frozenset[tuple[str, str]] | None = None
        self.view_errors = 0
        self.lease_errors = 0
        self.swept = 0
        self.last_heartbeat_at: float | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._view_forever, name="spendtap-central-budgets",
                             daemon=True),
            threading.Thread(target=self._lease_forever, name="spendtap-central-lease",
                             daemon=True),
        ]  # fmt: skip

    @property
    def where(self) -> str:
        return self.store.where

    def rows_committed(self) -> None:
        """The local ledger committed rows: the shipper takes them at its next pass."""
        self.shipper.wake()

    def budgeted(self) -> frozenset[tuple[str, str]] | None:
        """The budgeted (scope, principal) pairs as last read; None if never read yet."""
        return self._budgeted

    def start(self) -> None:
        self._refresh()
        self._heartbeat()
        for thread in self._threads:
            thread.start()
        self.shipper.start()

    def _refresh(self) -> bool:
        try:
            self._budgeted = frozenset((b.scope, b.principal) for b in self.store.list())
            return True
        except Exception:
            self.view_errors += 1
            return False

    def _view_forever(self) -> None:
        while not self._stop.wait(BUDGET_VIEW_S):
            self._refresh()

    def _heartbeat(self) -> None:
        try:
            self.store.heartbeat(self.node_id, self.owner, self.lease_s)
            self.last_heartbeat_at = time.time()
        except Exception:
            self.lease_errors += 1

    def _lease_forever(self) -> None:
        next_sweep = time.monotonic() + self.sweep_every_s
        while not self._stop.wait(max(0.5, self.lease_s / 3)):
            self._heartbeat()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.sweep_every_s
                try:
                    swept = self.store.sweep(None, self.reservation_max_age_s)
                except Exception:
                    self.lease_errors += 1
                    continue
                if swept:
                    self.swept += swept
                    self.log.warning(
                        "spendtap central: released %d reservations of expired leases", swept
                    )

    def resolve_key(self, secret: str) -> tuple[str, str] | None:
        """(account, key id) of a bearer key registered in the central store, or None."""
        return self._keys.resolve(secret)

    def reserve(self, reservation_id, account, key, tokens, owner) -> Any:
        return self.store.reserve(reservation_id, account, key, tokens, owner, node_id=self.node_id)

    def reserve_many(self, items, owner) -> list:
        """``(reservation_id, account, key, tokens)`` items in one round trip (see
        ``CentralStore.reserve_many``): a Decision or an exception for each."""
        return self.store.reserve_many(items, owner, node_id=self.node_id)

    def close(self, timeout: float = 10.0) -> bool:
        """Ship what is committed (bounded), stop the threads, close the pool."""
        shipped = self.shipper.close(timeout)
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(self.store.timeout_s + 2)
        self.store.close()
        return shipped
