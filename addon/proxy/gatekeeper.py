"""The gatekeeper addon: principals and budgets, the fleet, and the sweeps.

It owns the ``Gate`` (``spendtap.proxy.gate``: who pays, budget admission off the
event loop), the fleet's threads with ``spendtap_central`` (``spendtap.store.fleet``),
the periodic sweep of reservations nobody will settle, and SIGHUP (the guard reads
its credential files again and the gate takes the new trust). The gate is built on
the ledger of the recording addon and the trust of the guard, both earlier in the
addon list, and rebuilt when either changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from mitmproxy import ctx, exceptions

from spendtap.options import BY_NAME, ENV_CENTRAL
from spendtap.proxy.failclosed import SpendtapAddon
from spendtap.proxy.gate import Gate
from spendtap.proxy.guard import Guard
from spendtap.store.fleet import Fleet

logger = logging.getLogger("spendtap")

SWEEP_EVERY_S = 60
# The recording's commits wake the fleet's shipper; it looks on its own this often too.
SHIP_IDLE_S = 5.0


class Gatekeeper(SpendtapAddon):
    name = "spendtap-gatekeeper"
    OPTIONS = (
        "spendtap_account_header",
        "spendtap_key_header",
        "spendtap_enforce_budgets",
        "spendtap_require_auth",
        "spendtap_fallback_max_output",
        "spendtap_fail_open",
        "spendtap_reservation_max_age_s",
        "spendtap_central",
        "spendtap_central_timeout_ms",
        "spendtap_central_lease_s",
    )
    # What the gate is built from: a change to any of these builds a new one. (The sweep
    # reads spendtap_reservation_max_age_s each time it runs.)
    REBUILD = frozenset(
        {
            *(n for n in OPTIONS if n != "spendtap_reservation_max_age_s"),
            "spendtap_db",
            *Guard.OPTIONS,
        }
    )

    def __init__(self, fail_closed, guard, recording, monitoring) -> None:
        super().__init__(fail_closed)
        self.guard = guard
        self.recording = recording
        self.monitoring = monitoring
        self.gate: Gate | None = None
        self.fleet: Fleet | None = None
        self._sweeper: asyncio.Task | None = None
        recording.commit_listeners.append(self._rows_committed)

    def _rows_committed(self) -> None:
        fleet = self.fleet  # (read once: a reconfigure may replace it on the loop)
        if fleet is not None:
            fleet.rows_committed()

    def reconfigure(self, updated: set[str]) -> None:
        if self.gate is None or updated & self.REBUILD:
            self._configure_gate()
        elif "spendtap_prices" in updated:
            # Money caps price each reservation with the prices in force.
            self.gate.pricer = self.recording.pricer

    def _configure_fleet(self) -> Fleet | None:
        """With spendtap_central: the central store, the shipper and the lease (else None)."""
        opts = ctx.options
        if self.fleet is not None:
            self.fleet.close(timeout=10)
            self.fleet = None
        dsn = opts.spendtap_central or os.environ.get(ENV_CENTRAL, "")
        if not dsn:
            return None
        try:
            BY_NAME["spendtap_central"].validate(dsn)
            fleet = Fleet(
                dsn,
                self.recording.db_path,
                timeout_s=opts.spendtap_central_timeout_ms / 1000,
                lease_s=opts.spendtap_central_lease_s,
                reservation_max_age_s=opts.spendtap_reservation_max_age_s,
                ship_idle_s=SHIP_IDLE_S,
                logger=logger,
            )
        except Exception as e:
            raise exceptions.OptionsError(f"spendtap_central: {e}") from None
        fleet.start()
        # Unreachable at start is not fatal: rows wait locally, budgeted requests get 503.
        state = "reachable" if fleet.budgeted() is not None else "NOT reachable yet"
        logger.info(
            f"spendtap: central store {fleet.where} ({state}); node {fleet.node_id}; "
            f"lease {opts.spendtap_central_lease_s}s"
        )
        self.fleet = fleet
        return fleet

    def _configure_gate(self) -> None:
        opts = ctx.options
        if self.gate is not None:
            self.gate.close()
        fleet = self._configure_fleet()
        trust, credential = self.guard.policy, self.guard.credential
        self.gate = Gate(
            self.recording.db_path,
            enforce=opts.spendtap_enforce_budgets,
            principal_source=opts.spendtap_principal_source,
            account_header=opts.spendtap_account_header,
            key_header=opts.spendtap_key_header,
            require_auth=opts.spendtap_require_auth,
            fallback_max_output=opts.spendtap_fallback_max_output,
            fail_open=opts.spendtap_fail_open,
            trust=trust,
            key_swap=credential is not None,
            fleet=fleet,
            pricer=self.recording.pricer,
        )
        logger.info(
            f"spendtap: principal source {opts.spendtap_principal_source}; headers honoured "
            f"from {trust.describe()}" + ("; key swap on" if credential is not None else "")
        )
        # Reservations of sidecar processes that died (a crash, kill -9) never settle.
        swept = self.gate.sweep_now()
        if swept:
            logger.warning(f"spendtap: released {swept} reservations of dead sidecar processes")

    def running(self) -> None:
        if self.fail_closed.misconfiguration is not None:
            return
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_secrets)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def _reload_secrets(self) -> None:
        """SIGHUP: read the upstream credential and the gateway secret files again."""
        try:
            self.guard.reload()
            if self.gate is not None:
                self.gate.trust = self.guard.policy
            logger.info("spendtap: reloaded the credential files (SIGHUP)")
        except exceptions.OptionsError as e:
            logger.error(f"spendtap: SIGHUP: kept the previous credentials: {e}")

    async def _sweep_forever(self) -> None:
        """Release reservations nobody will settle: dead owners, or older than any request."""
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                await self.gate.sweep(ctx.options.spendtap_reservation_max_age_s)
            except Exception:
                self.monitoring.count_error("sweep", "could not sweep stale reservations")

    def done(self) -> None:
        # After the recording addon's done (earlier in the list) drained the writer.
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.gate is not None:
            self.gate.close()
            self.gate = None
        if self.fleet is not None:
            # The writer has drained: ship what it committed (bounded), then stop.
            self.fleet.close(timeout=10)
            self.fleet = None
