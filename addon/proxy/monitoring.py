"""The monitoring addon: the Prometheus metrics, their port, ``/healthz``, and error counts.

It owns the ``Metrics`` (``spendtap.metrics.series``), the figures read from the
ledger writer and the fleet at scrape time, the budget gauges
(``spendtap.metrics.budgets``) and the metrics server. The writer, the ledger path
and the fleet are read through the recording and gatekeeper addons at every scrape,
so the figures follow them when ``spendtap_db`` or the fleet settings change at run
time. It is last in the addon list: the metrics port opens once everything before it
is set up, and closes last.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions

from spendtap.address import parse_listen
from spendtap.metrics.budgets import BudgetCollector
from spendtap.metrics.series import CallbackMetrics, Metrics
from spendtap.metrics.server import MetricsServer
from spendtap.proxy.failclosed import SpendtapAddon

logger = logging.getLogger("spendtap")


class Monitoring(SpendtapAddon):
    name = "spendtap-monitoring"
    OPTIONS = (
        "spendtap_metrics",
        "spendtap_metrics_prefix",
        "spendtap_max_model_series",
        "spendtap_max_principal_series",
    )

    def __init__(self, fail_closed) -> None:
        super().__init__(fail_closed)
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.budget_gauges: BudgetCollector | None = None
        # What the figures are read from; see ``watch``.
        self.recording = None
        self.gatekeeper = None

    def watch(self, recording, gatekeeper) -> None:
        """The addons whose writer, ledger and fleet the metrics read at scrape time.

        Given after construction: the recording addon reports its committed rows' costs
        to these metrics, so each refers to the other.
        """
        self.recording = recording
        self.gatekeeper = gatekeeper

    def reconfigure(self, updated: set[str]) -> None:
        if updated & set(self.OPTIONS) or self.metrics is None:
            self._configure_metrics()

    def _writer(self):
        return self.recording.writer if self.recording is not None else None

    def _writer_figure(self, name: str):
        """A scrape-time reader of one of the ledger writer's figures (0 without a writer)."""
        return lambda: getattr(w, name) if (w := self._writer()) else 0

    def _fleet(self):
        return self.gatekeeper.fleet if self.gatekeeper is not None else None

    def _ledger_path(self) -> str | None:
        return self.recording.db_path if self.recording is not None else None

    def _configure_metrics(self) -> None:
        opts = ctx.options
        listen = None
        if opts.spendtap_metrics:
            try:
                listen = parse_listen(opts.spendtap_metrics)
            except ValueError as e:
                raise exceptions.OptionsError(f"spendtap_metrics: {e}") from e
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        self.metrics = Metrics(
            prefix=opts.spendtap_metrics_prefix,
            max_model_series=opts.spendtap_max_model_series,
            max_principal_series=opts.spendtap_max_principal_series,
        )
        self.metrics.add_collector(
            CallbackMetrics(
                opts.spendtap_metrics_prefix,
                gauges=[
                    (
                        "ledger_queue_depth",
                        "Rows waiting for the ledger writer.",
                        self._writer_figure("queue_depth"),
                    ),
                    # The fleet's figures exist only with spendtap_central (else not exported).
                    (
                        "central_backlog_rows",
                        "Rows committed locally and not yet shipped to the central store.",
                        lambda: self._fleet().shipper.backlog_rows,
                    ),
                    (
                        "central_lag_seconds",
                        "Age of the oldest row not yet shipped to the central store (0: none).",
                        lambda: self._fleet().shipper.lag_seconds,
                    ),
                ],
                counters=[
                    (
                        "ledger_rows_written",
                        "Rows committed to the ledger since start.",
                        self._writer_figure("rows_written"),
                    ),
                    (
                        "ledger_write_errors",
                        "Failed ledger write attempts since start.",
                        self._writer_figure("write_errors"),
                    ),
                    (
                        "ledger_dropped_rows",
                        "Rows dropped because the ledger stayed unwritable.",
                        self._writer_figure("dropped_rows"),
                    ),
                    # The fleet's figures exist only with spendtap_central (else not exported).
                    (
                        "central_rows_shipped",
                        "Rows this sidecar shipped to the central store since start.",
                        lambda: self._fleet().shipper.rows_shipped,
                    ),
                    (
                        "central_ship_errors",
                        "Failed shipping attempts (central store unreachable or failing).",
                        lambda: self._fleet().shipper.ship_errors,
                    ),
                    (
                        "central_reservations_swept",
                        "Reservations of expired node leases or too old, released by this node.",
                        lambda: self._fleet().swept,
                    ),
                    (
                        "central_lease_errors",
                        "Failed lease renewals or sweeps (central store unreachable or failing).",
                        lambda: self._fleet().lease_errors,
                    ),
                    (
                        "central_budget_view_errors",
                        "Failed reads of the set of budgeted principals from the central store.",
                        lambda: self._fleet().view_errors,
                    ),
                ],
            )
        )
        # Budget figures live in the ledger: read at scrape time, never stale. The path is
        # the recording addon's at each scrape, so a new spendtap_db is followed.
        self.budget_gauges = BudgetCollector(
            self._ledger_path,
            opts.spendtap_metrics_prefix,
            central=lambda: f.store if (f := self._fleet()) is not None else None,
        )
        self.metrics.add_collector(self.budget_gauges)
        if listen is not None:
            try:
                self.metrics_server = MetricsServer(*listen, self.metrics.registry, self.health)
            except OSError as e:
                raise exceptions.OptionsError(
                    f"spendtap_metrics: cannot listen on {opts.spendtap_metrics}: {e}"
                ) from e

    def health(self) -> tuple[bool, str]:
        """What ``/healthz`` answers: whether the sidecar can meter, and why not."""
        writer, fleet = self._writer(), self._fleet()
        if writer is None:
            return False, "ledger writer not started"
        if writer.stuck:
            return False, f"ledger writer stuck ({writer.queue_depth} rows queued)"
        if fleet is not None and fleet.shipper.stuck:
            shipper = fleet.shipper
            return False, (
                f"central shipping stuck ({shipper.backlog_rows} rows waiting, "
                f"oldest {shipper.lag_seconds:.0f}s)"
            )
        return True, "ok"

    def count_error(self, kind: str, message: str) -> None:
        """Count and log a failure to meter; expected operational ones without a traceback."""
        if self.metrics is not None:
            self.metrics.metering_errors.labels(kind).inc()
        quiet = kind in ("ledger_slow", "scan", "inject_unfiltered")
        logger.warning(f"spendtap: {message}", exc_info=not quiet)

    def done(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
