"""The mitmproxy addon: the only module that imports mitmproxy.

It turns flows into primitives for the pure core (``request``, ``meter``,
``scanner``) and hands finished rows to the ledger writer and the metrics.

Failure policy: metering never breaks or delays a proxied call beyond its
bounded durability wait. Every failure to meter is counted in
``{prefix}_metering_errors_total{kind}`` and logged; the bytes keep flowing.

Lifecycle of a flow:

- ``request``: parse what the request asks for, name its principal and node.
- ``responseheaders``: attach the stream callable to *every* response, so no
  body is ever buffered whole (SSE would otherwise be held back, and a large
  JSON body would sit in memory).
- ``response`` / ``error``: finalize exactly once (``FlowMeter.finish`` is run
  once). ``response`` waits (bounded) for the row's commit: mitmproxy sends the
  client's final chunk terminator only after this hook returns, so a client
  that saw its response complete has its row on disk.
- ``done``: finalize what is still in flight, drain the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode

from spendtap.address import parse_listen
from spendtap.metering.inject import InjectedUsageFilter, wants_usage_injection, with_include_usage
from spendtap.metering.meter import FlowMeter, outcome_for_error
from spendtap.metering.request import detect_api, parse_request
from spendtap.metrics.budgets import BudgetCollector
from spendtap.metrics.series import CallbackMetrics, Metrics
from spendtap.metrics.server import MetricsServer
from spendtap.options import BY_NAME, ENV_CENTRAL, OPTIONS, OptionError, take_deferred
from spendtap.paths import default_db_path
from spendtap.pricing import PriceFileError, Pricer
from spendtap.proxy.accesslog import AccessLog
from spendtap.proxy.errorpage import install as install_error_answers
from spendtap.proxy.gate import Admission, Gate, Principal
from spendtap.proxy.keyswap import UpstreamCredential
from spendtap.proxy.refusals import misconfigured, service_unavailable, upstream_failure
from spendtap.proxy.trust import (
    GATEWAY_SECRET_HEADER,
    TrustPolicy,
    read_secret_file,
    unguarded_start,
)
from spendtap.store.commits import CommitWaiters
from spendtap.store.fleet import Fleet
from spendtap.store.ledger import (
    CLIENT_DISCONNECTED,
    COMPLETED,
    REJECTED,
    UPSTREAM_ERROR,
    Ledger,
    LedgerError,
    StorageError,
)
from spendtap.store.writer import LedgerWriter

logger = logging.getLogger("spendtap")

META_KEY = "spendtap"
CONNECTION_LOGGER = "mitmproxy.proxy.server"
UPSTREAM_WARN_EVERY_S = 60.0


class SpendTap:
    def __init__(self) -> None:
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.writer: LedgerWriter | None = None
        self.access_log: AccessLog | None = None
        self.in_flight: dict[str, FlowMeter] = {}
        self.gate: Gate | None = None
        self.fleet: Fleet | None = None
        self._db_path: str | None = None
        self._sweeper: asyncio.Task | None = None
        self._commit_waiters: CommitWaiters | None = None
        self._running = False
        # A setting that could not be honoured: every request is refused (503).
        self.misconfiguration: str | None = None
        self.pricer: Pricer | None = None
        self.trust = TrustPolicy.from_settings("", None)
        self.credential: UpstreamCredential | None = None
        self._warned_peers: set[str | None] = set()
        # node -> (when its failures were last logged, failures since)
        self._upstream_warned: dict[str, tuple[float, int]] = {}

    # -- options -----------------------------------------------------------

    def load(self, loader) -> None:
        if not install_error_answers():
            logger.warning(
                "spendtap: this mitmproxy version cannot answer upstream failures with the "
                "API's error envelope; clients get mitmproxy's HTML 502 page"
            )
        # Check the --set values mitmproxy deferred for us before registering the
        # options: a value mitmproxy fails to parse would make it drop this script
        # and keep proxying unmetered (see spendtap.options).
        problems = take_deferred(loader.master.options.deferred)
        for option in OPTIONS:
            loader.add_option(option.name, option.type, option.default, option.help, option.choices)
        if problems:
            self._refuse_to_meter("; ".join(problems))

    def configure(self, updated: set[str]) -> None:
        if "spendtap_connection_log" in updated:
            # mitmproxy logs every connection ("client connect", "server connect",
            # "Streaming response from ...") at info on this logger; a sidecar's log is
            # start-up, warnings and errors unless asked.
            on = bool(getattr(ctx.options, "spendtap_connection_log", False))
            logging.getLogger(CONNECTION_LOGGER).setLevel(logging.NOTSET if on else logging.WARNING)
        try:
            for name in updated:
                if name in BY_NAME:
                    BY_NAME[name].validate(getattr(ctx.options, name))
            self._configure(updated)
        except (OptionError, exceptions.OptionsError) as e:
            if self._running:
                # A change at run time: mitmproxy rolls it back, the old settings stay.
                raise exceptions.OptionsError(str(e)) from None
            self._refuse_to_meter(str(e))

    def _refuse_to_meter(self, problem: str) -> None:
        """A setting spendtap cannot honour: stop mitmdump, and never proxy unmetered.

        An error logged during start-up makes mitmdump exit 1 (its errorcheck addon);
        wherever nothing stops the process, every request gets a 503 naming the
        problem and nothing reaches the upstream.
        """
        self.misconfiguration = problem
        logger.error(f"spendtap: {problem}")
        if not self._running and getattr(ctx.options, "server", False):
            # Not even listen: mitmdump may load scripts while its servers come up, and
            # a client that connects before errorcheck exits would see a reset and a
            # traceback in the log. With no server there is nothing to connect to.
            ctx.options.update(server=False)

    def _configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if self.misconfiguration is not None:
            return
        self._configure_trust()
        # The ledger first: a bad ledger must stop the sidecar before it listens anywhere.
        if "spendtap_prices" in updated or self.pricer is None:
            self._configure_prices()
        if "spendtap_db" in updated or self.writer is None:
            self._configure_ledger()
        if (
            updated
            & {
                "spendtap_metrics_prefix",
                "spendtap_max_model_series",
                "spendtap_max_principal_series",
                "spendtap_metrics",
            }
            or self.metrics is None
        ):
            self._configure_metrics()
        if self.gate is None or updated & {
            "spendtap_db",
            "spendtap_enforce_budgets",
            "spendtap_principal_source",
            "spendtap_require_auth",
            "spendtap_fallback_max_output",
            "spendtap_fail_open",
            "spendtap_account_header",
            "spendtap_key_header",
            "spendtap_trusted_peers",
            "spendtap_gateway_secret",
            "spendtap_gateway_secret_file",
            "spendtap_upstream_key_file",
            "spendtap_central",
            "spendtap_central_timeout_ms",
            "spendtap_central_lease_s",
        }:
            self._configure_gate()
        if "spendtap_access_log" in updated:
            if self.access_log is not None:
                self.access_log.close()
                self.access_log = None
            if opts.spendtap_access_log:
                try:
                    self.access_log = AccessLog(opts.spendtap_access_log)
                except OSError as e:
                    raise exceptions.OptionsError(f"spendtap_access_log: {e}") from e

    def _configure_trust(self) -> None:
        """Who may name a principal, the key swap credential, and the refusal to run
        unguarded beyond loopback."""
        opts = ctx.options
        try:
            secret = opts.spendtap_gateway_secret or None
            if opts.spendtap_gateway_secret_file:
                if secret:
                    raise ValueError(
                        "set spendtap_gateway_secret or spendtap_gateway_secret_file, not both"
                    )
                secret = read_secret_file(
                    opts.spendtap_gateway_secret_file, "spendtap_gateway_secret_file"
                )
            trust = TrustPolicy.from_settings(opts.spendtap_trusted_peers, secret)
            credential = None
            if opts.spendtap_upstream_key_file:
                if opts.spendtap_principal_source == "headers":
                    raise ValueError(
                        "spendtap_upstream_key_file needs spendtap_principal_source bearer or "
                        "both (clients must present spendtap keys)"
                    )
                credential = UpstreamCredential(opts.spendtap_upstream_key_file)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        modes = list(opts.mode) if not isinstance(opts.mode, str) else [opts.mode]
        hosts, transparent = [], False
        for spec in modes:
            try:
                mode = ProxyMode.parse(spec)
            except ValueError:
                continue  # mitmproxy reports its own bad modes
            hosts.append(mode.listen_host(opts.listen_host))
            transparent = transparent or mode.type_name == "transparent"
        problem = unguarded_start(
            listen_hosts=hosts,
            transparent=transparent,
            principal_source=opts.spendtap_principal_source,
            policy=trust,
        )
        if problem is not None:
            raise exceptions.OptionsError(problem)
        self.trust = trust
        self.credential = credential

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
                        lambda: self.writer.queue_depth if self.writer else 0,
                    ),
                    # The fleet's figures exist only with spendtap_central (else not exported).
                    (
                        "central_backlog_rows",
                        "Rows committed locally and not yet shipped to the central store.",
                        lambda: self.fleet.shipper.backlog_rows,
                    ),
                    (
                        "central_lag_seconds",
                        "Age of the oldest row not yet shipped to the central store (0: none).",
                        lambda: self.fleet.shipper.lag_seconds,
                    ),
                ],
                counters=[
                    (
                        "ledger_rows_written",
                        "Rows committed to the ledger since start.",
                        lambda: self.writer.rows_written if self.writer else 0,
                    ),
                    (
                        "ledger_write_errors",
                        "Failed ledger write attempts since start.",
                        lambda: self.writer.write_errors if self.writer else 0,
                    ),
                    (
                        "ledger_dropped_rows",
                        "Rows dropped because the ledger stayed unwritable.",
                        lambda: self.writer.dropped_rows if self.writer else 0,
                    ),
                    # The fleet's figures exist only with spendtap_central (else not exported).
                    (
                        "central_rows_shipped",
                        "Rows this sidecar shipped to the central store since start.",
                        lambda: self.fleet.shipper.rows_shipped,
                    ),
                    (
                        "central_ship_errors",
                        "Failed shipping attempts (central store unreachable or failing).",
                        lambda: self.fleet.shipper.ship_errors,
                    ),
                    (
                        "central_reservations_swept",
                        "Reservations of expired node leases or too old, released by this node.",
                        lambda: self.fleet.swept,
                    ),
                    (
                        "central_lease_errors",
                        "Failed lease renewals or sweeps (central store unreachable or failing).",
                        lambda: self.fleet.lease_errors,
                    ),
                    (
                        "central_budget_view_errors",
                        "Failed reads of the set of budgeted principals from the central store.",
                        lambda: self.fleet.view_errors,
                    ),
                ],
            )
        )
        # Budget figures live in the ledger: read at scrape time, never stale.
        self.metrics.add_collector(
            BudgetCollector(
                self._db_path,
                opts.spendtap_metrics_prefix,
                central=lambda: self.fleet.store if self.fleet is not None else None,
            )
        )
        if listen is not None:
            try:
                self.metrics_server = MetricsServer(*listen, self.metrics.registry, self._health)
            except OSError as e:
                raise exceptions.OptionsError(
                    f"spendtap_metrics: cannot listen on {opts.spendtap_metrics}: {e}"
                ) from e

    def _configure_ledger(self) -> None:
        path = ctx.options.spendtap_db or str(default_db_path())
        if path == self._db_path and self.writer is not None:
            return
        try:
            Ledger(path).close()  # create and migrate now, so a bad path fails at start
        except Exception as e:  # LedgerError (worded), OSError or StorageError (SQLite's words)
            worded = isinstance(e, LedgerError) and not isinstance(e, StorageError)
            message = f"spendtap_db: {e}" if worded else f"spendtap_db: {path}: {e}"
            raise exceptions.OptionsError(message) from e
        if self.writer is not None:
            self.writer.close(timeout=10)
        self.writer = LedgerWriter(
            path, logger=logger, price_row=self._price_row, after_commit=self._observe_costs
        )
        self.writer.start()
        self._db_path = path
        logger.info(f"spendtap: metering to ledger {path}")

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
                self._db_path,
                timeout_s=opts.spendtap_central_timeout_ms / 1000,
                lease_s=opts.spendtap_central_lease_s,
                reservation_max_age_s=opts.spendtap_reservation_max_age_s,
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

    def _configure_prices(self) -> None:
        path = ctx.options.spendtap_prices
        try:
            self.pricer = Pricer.from_path(path or None)
        except PriceFileError as e:
            raise exceptions.OptionsError(f"spendtap_prices: {e}") from e
        if path:
            models = len(self.pricer.price_file.exact) + len(self.pricer.price_file.globs)
            logger.info(f"spendtap: prices from {path} ({models} entries), then the catalogue")

    def _price_row(self, row: dict) -> None:
        # The writer's thread: the pricer in use when the row is written.
        self.pricer.apply(row)

    def _observe_costs(self, rows: list[dict]) -> None:
        metrics = self.metrics
        if metrics is not None:
            for row in rows:
                metrics.observe_cost(row)

    def _configure_gate(self) -> None:
        opts = ctx.options
        if self.gate is not None:
            self.gate.close()
        fleet = self._configure_fleet()
        self.gate = Gate(
            self._db_path,
            enforce=opts.spendtap_enforce_budgets,
            principal_source=opts.spendtap_principal_source,
            account_header=opts.spendtap_account_header,
            key_header=opts.spendtap_key_header,
            require_auth=opts.spendtap_require_auth,
            fallback_max_output=opts.spendtap_fallback_max_output,
            fail_open=opts.spendtap_fail_open,
            trust=self.trust,
            key_swap=self.credential is not None,
            fleet=fleet,
            pricer=self.pricer,
        )
        logger.info(
            f"spendtap: principal source {opts.spendtap_principal_source}; headers honoured "
            f"from {self.trust.describe()}"
            + ("; key swap on" if self.credential is not None else "")
        )
        # Reservations of sidecar processes that died (a crash, kill -9) never settle.
        swept = self.gate.sweep_now()
        if swept:
            logger.warning(f"spendtap: released {swept} reservations of dead sidecar processes")

    def running(self) -> None:
        self._running = True
        if self.misconfiguration is not None:
            return
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_secrets)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def _reload_secrets(self) -> None:
        """SIGHUP: read the upstream credential and the gateway secret files again."""
        try:
            self._configure_trust()
            if self.gate is not None:
                self.gate.trust = self.trust
            logger.info("spendtap: reloaded the credential files (SIGHUP)")
        except exceptions.OptionsError as e:
            logger.error(f"spendtap: SIGHUP: kept the previous credentials: {e}")

    async def _sweep_forever(self) -> None:
        """Release reservations nobody will settle: dead owners, or older than any request."""
        while True:
            await asyncio.sleep(60)
            try:
                await self.gate.sweep(ctx.options.spendtap_reservation_max_age_s)
            except Exception:
                self._count_error("sweep", "could not sweep stale reservations")

    def _health(self) -> tuple[bool, str]:
        if self.writer is None:
            return False, "ledger writer not started"
        if self.writer.stuck:
            return False, f"ledger writer stuck ({self.writer.queue_depth} rows queued)"
        if self.fleet is not None and self.fleet.shipper.stuck:
            shipper = self.fleet.shipper
            return False, (
                f"central shipping stuck ({shipper.backlog_rows} rows waiting, "
                f"oldest {shipper.lag_seconds:.0f}s)"
            )
        return True, "ok"

    # -- flow hooks ----------------------------------------------------------

    def client_connected(self, client) -> None:
        if self.misconfiguration is not None and not self._running:
            # Start-up failed and mitmdump is about to exit: close the connection now,
            # before it is half-way through a request when the process goes.
            client.error = "spendtap is misconfigured"

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return  # answered by another addon already
        if self.misconfiguration is not None:
            # Never proxy unmetered: a setting could not be honoured.
            api = detect_api(flow.request.path)
            status, headers, body = misconfigured(api, self.misconfiguration)
            flow.response = http.Response.make(status, body, headers)
            return
        try:
            req = flow.request
            opts = ctx.options
            body = req.get_content(strict=False)
            info = parse_request(req.path, req.headers, body)
            peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        except Exception:
            self._count_error("request", "could not read the request")
            return
        try:
            who = await self.gate.principal(req.headers, info.api, peer)
        except Exception:
            # Who pays cannot be told (the key store failed): refuse rather than
            # forward a request nobody vouched for.
            self._count_error("principal", "could not name the principal")
            who = Principal(refusal=service_unavailable(info.api))
        try:
            self._guard_headers(req.headers, who, peer)
            if who.swap_credential and self.credential is not None:
                self.credential.apply(req.headers, info.api)
            meter = FlowMeter(
                flow_id=flow.id,
                started_at=req.timestamp_start or time.time(),
                method=req.method,
                path=req.path,
                info=info,
                account=who.account,
                key=who.key,
                node=opts.spendtap_node or f"{req.host}:{req.port}",
            )
        except Exception:
            self._count_error("request", "could not read the request")
            return
        flow.metadata[META_KEY] = meter
        self.in_flight[flow.id] = meter
        self.metrics.in_flight.inc()
        account, key, refusal = who.account, who.key, who.refusal
        if refusal is not None:
            reason = "unavailable" if refusal[0] == 503 else "invalid_api_key"
            self._refuse(flow, meter, refusal, reason)
            return
        try:
            admission = await self.gate.admit(flow.id, body, info, account, key, node=meter.node)
        except Exception:
            self._count_error("budget", "could not check the budget")
            if opts.spendtap_fail_open:
                admission = Admission(reason="fail_open")
            else:
                admission = Admission(service_unavailable(info.api), "unavailable")
        if admission.refusal is not None:
            self._refuse(flow, meter, admission.refusal, admission.reason)
            return
        if admission.reason == "fail_open":
            self._count_error("budget_fail_open", "ledger could not reserve; dispatched anyway")
        meter.reservation_id = admission.reservation_id
        if opts.spendtap_inject_usage and wants_usage_injection(info):
            self._inject_usage(flow, meter, body)

    def _guard_headers(self, headers, who, peer: str | None) -> None:
        """The gateway secret never goes upstream; nor does a principal nobody vouched for."""
        if GATEWAY_SECRET_HEADER in headers:
            del headers[GATEWAY_SECRET_HEADER]
        if not who.untrusted_claim:
            return
        for name in (self.gate.account_header, self.gate.key_header):
            if name in headers:
                del headers[name]
        self.metrics.untrusted_principal_headers.inc()
        if peer not in self._warned_peers and len(self._warned_peers) < 10_000:
            self._warned_peers.add(peer)
            logger.warning(
                f"spendtap: principal headers from untrusted peer {peer} ignored and removed "
                f"(trusted: {self.trust.describe()}); further ones from it are only counted"
            )

    def _refuse(self, flow: http.HTTPFlow, meter: FlowMeter, refusal, reason: str) -> None:
        """Answer locally; the request never reaches the upstream."""
        status, headers, body = refusal
        flow.response = http.Response.make(status, body, headers)
        meter.rejected = True
        self.metrics.rejections.labels(reason).inc()

    def _inject_usage(self, flow: http.HTTPFlow, meter: FlowMeter, body: bytes | None) -> None:
        try:
            body = with_include_usage(body or b"", meter.info)
        except Exception:
            body = None
        if body is None:
            self._count_error("inject", "could not add stream_options.include_usage")
            return
        flow.request.content = body  # re-encodes per Content-Encoding, fixes Content-Length
        meter.usage_filter = InjectedUsageFilter()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meter: FlowMeter | None = flow.metadata.get(META_KEY)
        if meter is None or flow.response is None:
            return
        try:
            resp = flow.response
            meter.start_response(
                resp.status_code,
                resp.headers.get("content-type"),
                resp.headers.get("content-encoding"),
            )
        except Exception:
            self._count_error("response", "could not start scanning the response")
            return
        content_type = (resp.headers.get("content-type") or "").lower()
        is_sse = "text/event-stream" in content_type
        length = _content_length(resp.headers)
        if not is_sse and length is not None and length <= ctx.options.spendtap_buffer_bytes:
            # Small non-streaming body: let mitmproxy hold it, so nothing reaches the
            # client before the row commits (see ``response``).
            return
        # Stream every other body: SSE must never be buffered, and a large body must
        # not sit whole in memory. The callable returns the bytes unchanged.
        if meter.usage_filter is not None:
            encoding = (resp.headers.get("content-encoding") or "identity").strip().lower()
            if is_sse and resp.status_code == 200 and encoding == "identity":
                resp.stream = meter.on_chunk_filtered
                return
            # Compressed, or not a stream: the added usage cannot be cut out without
            # re-encoding, so the client gets the upstream's bytes as they are.
            meter.usage_filter = None
            if resp.status_code == 200:
                self._count_error("inject_unfiltered", "injected usage left in a response")
        resp.stream = meter.on_chunk

    async def response(self, flow: http.HTTPFlow) -> None:
        meter: FlowMeter | None = flow.metadata.get(META_KEY)
        if meter is None or meter.finished:
            return  # finished: the error hook's answer to a failed upstream
        resp = flow.response
        if resp is not None and not resp.stream:
            # A body mitmproxy held whole (small, or set by another addon): scan it now.
            try:
                if meter.scanner is None:
                    meter.start_response(
                        resp.status_code,
                        resp.headers.get("content-type"),
                        resp.headers.get("content-encoding"),
                    )
                meter.feed_whole(resp.raw_content or b"", resp.timestamp_start or time.time())
            except Exception:
                self._count_error("response", "could not scan a held response")
        if meter.rejected:
            outcome, error = REJECTED, f"refused by spendtap ({meter.status})"
        elif flow.error is not None:
            # An exception in the stream callable fires both hooks; error has the truth.
            outcome, error = outcome_for_error(flow.error.msg), flow.error.msg
        else:
            status = meter.status or 0
            outcome = UPSTREAM_ERROR if status >= 500 else COMPLETED
            error = None
        row = self._finish(flow, meter, outcome, error)
        if row is not None:
            await self._submit_and_wait(row)

    def error(self, flow: http.HTTPFlow) -> None:
        meter: FlowMeter | None = flow.metadata.get(META_KEY)
        msg = flow.error.msg if flow.error else "unknown error"
        if flow.response is None and outcome_for_error(msg) == UPSTREAM_ERROR:
            # Nothing reached the client yet: answer in the API's own envelope (see
            # spendtap.proxy.errorpage), never mitmproxy's HTML page with the upstream address.
            api = meter.info.api if meter is not None else detect_api(flow.request.path)
            status, headers, body = upstream_failure(api, msg)
            flow.response = http.Response.make(status, body, headers)
            if meter is not None:
                meter.status = status
            self._warn_upstream(meter.node if meter is not None else flow.request.host, msg)
        if meter is None:
            return
        outcome = outcome_for_error(msg)
        idle = time.time() - meter.last_activity
        if outcome == CLIENT_DISCONNECTED and idle >= ctx.options.tcp_timeout * 0.9:
            # mitmproxy's idle timeout closes the client side too; the client did not
            # leave, the upstream went silent.
            outcome = UPSTREAM_ERROR
            msg = f"upstream sent nothing for {idle:.0f}s (tcp_timeout)"
        if flow.response is None and meter.status is None and outcome == UPSTREAM_ERROR:
            meter.status = 502  # the client saw the connection close: a gateway failure
        row = self._finish(flow, meter, outcome, msg)
        if row is not None:
            self._submit(row)

    def _warn_upstream(self, node: str, msg: str) -> None:
        """An upstream failure is a warning in the log, once a minute per node at most."""
        now = time.monotonic()
        last, since = self._upstream_warned.get(node, (float("-inf"), 0))
        if now - last < UPSTREAM_WARN_EVERY_S:
            self._upstream_warned[node] = (last, since + 1)
            return
        if len(self._upstream_warned) > 1000:
            self._upstream_warned.clear()
        self._upstream_warned[node] = (now, 0)
        more = f" ({since} more since the last warning)" if since else ""
        logger.warning(
            f"spendtap: upstream {node} failed before answering: {msg}{more}; clients get "
            f"a JSON 502/504 (further failures in the next {UPSTREAM_WARN_EVERY_S:.0f}s are "
            "only counted)"
        )

    def done(self) -> None:
        # On shutdown, done fires before in-flight flows' error hooks: finalize them
        # here, or their rows would be lost with the process.
        now = time.time()
        for meter in list(self.in_flight.values()):
            row = self._finish_meter(meter, UPSTREAM_ERROR, "proxy shut down mid-response", now)
            if row is not None:
                self._submit(row)
        if self.writer is not None:
            self.writer.close(timeout=30)
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
        if self.access_log is not None:
            self.access_log.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    # -- internals -------------------------------------------------------------

    def _finish(self, flow, meter: FlowMeter, outcome: str, error: str | None) -> dict | None:
        end = None
        if flow.response is not None:
            end = flow.response.timestamp_end
        return self._finish_meter(meter, outcome, error, end or time.time())

    def _finish_meter(self, meter: FlowMeter, outcome: str, error: str | None, now: float):
        try:
            row = meter.finish(outcome, now, error)
        except Exception:
            self._count_error("finalize", "could not finalize a request")
            row = None
        finally:
            if self.in_flight.pop(meter.flow_id, None) is not None:
                self.metrics.in_flight.dec()
        if row is None:
            if meter.reservation_id is not None and self.gate is not None:
                self.gate.release(meter.reservation_id)  # no row will settle it
            return None
        if meter.chunk_errors:
            self._count_error("scan", f"{meter.chunk_errors} chunks could not be scanned")
        try:
            self.metrics.observe(row)
        except Exception:
            self._count_error("metrics", "could not record metrics")
        if self.access_log is not None:
            try:
                self.access_log.write(row)
            except Exception:
                self._count_error("access_log", "could not write the access log")
        return row

    def _submit(self, row: dict, on_commit=None) -> None:
        if self.writer is None:
            self._count_error("ledger", "no ledger writer")
            return
        self.writer.submit(row, on_commit)

    async def _submit_and_wait(self, row: dict) -> None:
        wait_s = ctx.options.spendtap_commit_wait_ms / 1000
        writer = self.writer
        if wait_s <= 0 or writer is None or writer.failing:
            self._submit(row)
            return
        if self._commit_waiters is None:
            self._commit_waiters = CommitWaiters(asyncio.get_running_loop())
        committed, on_commit = self._commit_waiters.new()
        started = time.perf_counter()
        self._submit(row, on_commit)
        try:
            async with asyncio.timeout(wait_s):
                await committed
            self.metrics.commit_wait.observe(time.perf_counter() - started)
        except TimeoutError:
            self._count_error("ledger_slow", "ledger commit took longer than the wait; moving on")

    def _count_error(self, kind: str, message: str) -> None:
        """Count and log a failure to meter; expected operational ones without a traceback."""
        if self.metrics is not None:
            self.metrics.metering_errors.labels(kind).inc()
        quiet = kind in ("ledger_slow", "scan", "inject_unfiltered")
        logger.warning(f"spendtap: {message}", exc_info=not quiet)


def _content_length(headers) -> int | None:
    value = headers.get("content-length")
    if value is None or "transfer-encoding" in headers:
        return None
    try:
        return int(value)
    except ValueError:
        return None
