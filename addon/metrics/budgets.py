"""Budget figures for Prometheus, read from the ledger at scrape time.

``BudgetCollector(path, prefix)`` is a ``prometheus_client`` custom collector:
``path`` is the ledger's path, or a callable returning it at each scrape (so the
gauges follow a ledger that changes at run time). Each scrape opens a short-lived
read-only connection to the ledger, reads every budget's cap, spent, reserved
and remaining tokens and the number of open reservations, and closes it. Nothing
is cached or updated by hand, so the figures agree with ``spendtap budget show``
whichever process changed them.

Series are labelled ``scope`` (key or account) and ``principal``; they are as
many as the budgets an operator set, so bounded. A ledger that does not exist
yet yields zero open reservations and no budget series; a ledger that cannot
be read is counted in ``{prefix}_budget_scrape_errors_total`` (a counter of
failures since start) and never fails the whole scrape.

With a fleet (``central``: a callable returning the ``CentralStore``, or None),
the figures are the fleet's, read from PostgreSQL at scrape time; a scrape
while PostgreSQL is away counts a scrape error and exports no budget series.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spendtap.options import DEFAULT_METRICS_PREFIX
from spendtap.store.budgets import (
    NANOS_PER_USD,
    USD,
    open_readonly,
    open_reservation_count,
    read_statuses,
)
from spendtap.store.ledger import LedgerNotFound

__all__ = ["BudgetCollector"]

logger = logging.getLogger("spendtap")


# figure -> help text; {Unit} is Tokens or Dollars.
_FIGURES = {
    "cap": "The budget's cap, in {unit}.",
    "spent": "{Unit} spent in the budget's window (or since a balance was set).",
    "reserved": "{Unit} held by open reservations of requests in flight.",
    "remaining": "{Unit} left to reserve: cap - spent - reserved, at least 0.",
}


def _figure_families(
    p: str, suffix: str, unit: str, labels: tuple[str, ...]
) -> dict[str, GaugeMetricFamily]:
    """cap/spent/reserved/remaining gauges of token (``_tokens``) or money (``_usd``) caps."""
    return {
        name: GaugeMetricFamily(
            f"{p}budget_{name}_{suffix}",
            doc.format(Unit=unit, unit=unit.lower()),
            labels=labels,
        )
        for name, doc in _FIGURES.items()
    }


class BudgetCollector(Collector):
    """Scrape-time gauges of every budget in the ledger at ``path``."""

    def __init__(
        self,
        path: str | os.PathLike[str] | Callable[[], str | os.PathLike[str] | None],
        prefix: str = DEFAULT_METRICS_PREFIX,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 1.0,
        central: Callable[[], Any] | None = None,
    ):
        if callable(path):
            self._path = path
        else:
            fixed = os.fspath(path)
            self._path = lambda: fixed
        self._p = prefix + "_" if prefix else ""
        self._clock = clock
        self.busy_timeout_s = busy_timeout_s
        self.scrape_errors = 0
        self._central = central

    @property
    def path(self) -> str | None:
        """The ledger this scrape reads (None: no ledger yet)."""
        path = self._path()
        return None if path is None else os.fspath(path)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        p = self._p
        labels = ("scope", "principal")
        families = _figure_families(p, "tokens", "Tokens", labels)
        money = {
            **_figure_families(p, "usd", "Dollars", labels),
            "window": GaugeMetricFamily(
                p + "budget_usd_window_seconds",
                "A money budget's rolling window in seconds (absent for a balance).",
                labels=labels,
            ),
        }
        open_family = GaugeMetricFamily(
            p + "open_reservations", "Budget reservations not yet settled or released."
        )
        store = self._central() if self._central is not None else None
        if store is not None:
            try:
                statuses = store.statuses(self._clock())
                count = store.open_reservation_count()
            except Exception:
                yield from self._failed("the central store")
                return
            yield from self._emit(families, money, open_family, statuses, count)
            return
        path = self.path
        try:
            conn = open_readonly(path, self.busy_timeout_s) if path is not None else None
        except LedgerNotFound:
            conn = None
        except Exception:
            yield from self._failed(path)
            return
        if conn is None:  # no ledger yet: nothing reserved, no budgets
            open_family.add_metric([], 0)
            yield from (*families.values(), *money.values(), open_family, self._errors())
            return
        try:
            conn.execute("BEGIN")  # one snapshot for every figure
            statuses = read_statuses(conn, self._clock())
            count = open_reservation_count(conn)
        except Exception:
            yield from self._failed(path)
            return
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        yield from self._emit(families, money, open_family, statuses, count)

    def _emit(self, families, money, open_family, statuses, count) -> Iterator[GaugeMetricFamily]:
        for s in statuses:
            values = [s.budget.scope, s.budget.principal]
            if s.budget.unit == USD:  # nano-dollars to dollars
                money["cap"].add_metric(values, s.budget.cap / NANOS_PER_USD)
                money["spent"].add_metric(values, s.spent / NANOS_PER_USD)
                money["reserved"].add_metric(values, s.reserved / NANOS_PER_USD)
                money["remaining"].add_metric(values, s.remaining / NANOS_PER_USD)
                if s.budget.window_s is not None:
                    money["window"].add_metric(values, s.budget.window_s)
                continue
            families["cap"].add_metric(values, s.budget.cap)
            families["spent"].add_metric(values, s.spent)
            families["reserved"].add_metric(values, s.reserved)
            families["remaining"].add_metric(values, s.remaining)
        open_family.add_metric([], count)
        yield from (*families.values(), *money.values(), open_family, self._errors())

    def _errors(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            self._p + "budget_scrape_errors",
            "Scrapes whose budget figures could not be read from the ledger, since start.",
        )
        family.add_metric([], self.scrape_errors)
        return family

    def _failed(self, where: str | None) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        self.scrape_errors += 1
        logger.warning("spendtap: could not read budgets from %s", where, exc_info=True)
        yield self._errors()
