"""The metering addon: mitmproxy's flow hooks, thin, calling into the core.

It turns flows into primitives for the pure core (``request``, ``meter``,
``scanner``) and hands finished rows to the recording addon (the ledger writer)
and the monitoring addon (the metrics); who pays and whether they may comes from
the gatekeeper addon (see ``spendtap.proxy.addons`` for the list).

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
- ``done``: finalize what is still in flight (before the recording addon, later in
  the list, drains the writer).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, http

from spendtap.metering.inject import InjectedUsageFilter, wants_usage_injection, with_include_usage
from spendtap.metering.meter import FlowMeter, outcome_for_error
from spendtap.metering.request import detect_api, parse_request
from spendtap.proxy import coalesce
from spendtap.proxy.dispatch import cache_hooks, uncache_hooks
from spendtap.proxy.errorpage import install as install_error_answers
from spendtap.proxy.eventloop import loop_name
from spendtap.proxy.failclosed import SpendtapAddon
from spendtap.proxy.gate import Admission, Principal
from spendtap.proxy.refusals import misconfigured, service_unavailable, upstream_failure
from spendtap.proxy.trust import GATEWAY_SECRET_HEADER
from spendtap.store.commits import CommitWaiters, hold_cap
from spendtap.store.ledger import CLIENT_DISCONNECTED, COMPLETED, REJECTED, UPSTREAM_ERROR

logger = logging.getLogger("spendtap")

META_KEY = "spendtap"
CONNECTION_LOGGER = "mitmproxy.proxy.server"
UPSTREAM_WARN_EVERY_S = 60.0


class Metering(SpendtapAddon):
    name = "spendtap-metering"
    OPTIONS = (
        "spendtap_node",
        "spendtap_commit_wait_ms",
        "spendtap_inject_usage",
        "spendtap_buffer_bytes",
        "spendtap_connection_log",
        "spendtap_join_chunks",
        "spendtap_cache_hooks",
    )

    def __init__(self, fail_closed, guard, recording, gatekeeper, monitoring) -> None:
        super().__init__(fail_closed)
        # Read through at every flow: each of them rebuilds what it owns on a change.
        self.guard = guard
        self.recording = recording
        self.gatekeeper = gatekeeper
        self.monitoring = monitoring
        self.in_flight: dict[str, FlowMeter] = {}
        self._commit_waiters: CommitWaiters | None = None
        self._warned_peers: set[str | None] = set()
        # node -> (when its failures were last logged, failures since)
        self._upstream_warned: dict[str, tuple[float, int]] = {}

    def load(self, loader) -> None:
        if not install_error_answers():
            logger.warning(
                "spendtap: this mitmproxy version cannot answer upstream failures with the "
                "API's error envelope; clients get mitmproxy's HTML 502 page"
            )
        if not coalesce.install():
            logger.warning(
                "spendtap: this mitmproxy version cannot join the chunks of a chunked body; "
                "each is passed on by itself (spendtap_join_chunks has no effect)"
            )
        super().load(loader)

    def configure(self, updated: set[str]) -> None:
        if "spendtap_connection_log" in updated:
            # mitmproxy logs every connection ("client connect", "server connect",
            # "Streaming response from ...") at info on this logger; a sidecar's log is
            # start-up, warnings and errors unless asked. Even when misconfigured: the
            # one line that says why must not drown.
            on = bool(getattr(ctx.options, "spendtap_connection_log", False))
            logging.getLogger(CONNECTION_LOGGER).setLevel(logging.NOTSET if on else logging.WARNING)
        if "spendtap_join_chunks" in updated:
            coalesce.set_joining(bool(getattr(ctx.options, "spendtap_join_chunks", True)))
        if "spendtap_cache_hooks" in updated and self.fail_closed.is_running:
            self._dispatch()
        super().configure(updated)

    def running(self) -> None:
        # Once every addon is loaded (the lists are rebuilt on any change anyway).
        self._dispatch()
        logger.info(f"spendtap: event loop {loop_name(asyncio.get_running_loop())}")

    def _dispatch(self) -> None:
        if getattr(ctx.options, "spendtap_cache_hooks", True):
            cache_hooks(ctx.master.addons)
        else:
            uncache_hooks(ctx.master.addons)

    @property
    def metrics(self):
        return self.monitoring.metrics

    def _count_error(self, kind: str, message: str) -> None:
        self.monitoring.count_error(kind, message)

    # -- flow hooks ----------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return  # answered by another addon already
        problem = self.fail_closed.misconfiguration
        if problem is not None:
            # Never proxy unmetered: a setting could not be honoured.
            api = detect_api(flow.request.path)
            status, headers, body = misconfigured(api, problem)
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
            who = await self.gatekeeper.gate.principal(req.headers, info.api, peer)
        except Exception:
            # Who pays cannot be told (the key store failed): refuse rather than
            # forward a request nobody vouched for.
            self._count_error("principal", "could not name the principal")
            who = Principal(refusal=service_unavailable(info.api))
        try:
            # The gate is read again after each await: a run-time change may have rebuilt it.
            self._guard_headers(req.headers, who, peer, self.gatekeeper.gate)
            credential = self.guard.credential
            if who.swap_credential and credential is not None:
                credential.apply(req.headers, info.api)
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
            admission = await self.gatekeeper.gate.admit(
                flow.id, body, info, account, key, node=meter.node
            )
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

    def _guard_headers(self, headers, who, peer: str | None, gate) -> None:
        """The gateway secret never goes upstream; nor does a principal nobody vouched for."""
        if GATEWAY_SECRET_HEADER in headers:
            del headers[GATEWAY_SECRET_HEADER]
        if not who.untrusted_claim:
            return
        for name in (gate.account_header, gate.key_header):
            if name in headers:
                del headers[name]
        self.metrics.untrusted_principal_headers.inc()
        if peer not in self._warned_peers and len(self._warned_peers) < 10_000:
            self._warned_peers.add(peer)
            logger.warning(
                f"spendtap: principal headers from untrusted peer {peer} ignored and removed "
                f"(trusted: {self.guard.policy.describe()}); further ones from it are only counted"
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
            headers = resp.headers
            # Each look-up walks every header field (mitmproxy lower-cases them all):
            # once each.
            raw_type = headers.get("content-type")
            raw_encoding = headers.get("content-encoding")
            meter.start_response(resp.status_code, raw_type, raw_encoding)
        except Exception:
            self._count_error("response", "could not start scanning the response")
            return
        content_type = (raw_type or "").lower()
        is_sse = "text/event-stream" in content_type
        length = _content_length(headers)
        if not is_sse and length is not None and length <= ctx.options.spendtap_buffer_bytes:
            # Small non-streaming body: let mitmproxy hold it, so nothing reaches the
            # client before the row commits (see ``response``).
            return
        # Stream every other body: SSE must never be buffered, and a large body must
        # not sit whole in memory. The callable returns the bytes unchanged.
        if meter.usage_filter is not None:
            encoding = (raw_encoding or "identity").strip().lower()
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
            gate = self.gatekeeper.gate
            if meter.reservation_id is not None and gate is not None:
                gate.release(meter.reservation_id)  # no row will settle it
            return None
        if meter.chunk_errors:
            self._count_error("scan", f"{meter.chunk_errors} chunks could not be scanned")
        try:
            self.metrics.observe(row)
        except Exception:
            self._count_error("metrics", "could not record metrics")
        try:
            self.recording.log_access(row)
        except Exception:
            self._count_error("access_log", "could not write the access log")
        return row

    def _submit(self, row: dict, on_commit=None) -> None:
        if not self.recording.submit(row, on_commit):
            self._count_error("ledger", "no ledger writer")

    async def _submit_and_wait(self, row: dict) -> None:
        wait_s = ctx.options.spendtap_commit_wait_ms / 1000
        writer = self.recording.writer
        if wait_s <= 0 or writer is None or writer.failing:
            self._submit(row)
            return
        if self._commit_waiters is None:
            self._commit_waiters = CommitWaiters(asyncio.get_running_loop())
        # The row's duration is the response's time so far: its start to its end.
        committed, on_commit = self._commit_waiters.new(hold_cap(row["duration_s"], wait_s))
        started = time.perf_counter()
        self._submit(row, on_commit)
        try:
            async with asyncio.timeout(wait_s):
                await committed
            self.metrics.commit_wait.observe(time.perf_counter() - started)
        except TimeoutError:
            self._count_error("ledger_slow", "ledger commit took longer than the wait; moving on")


def _content_length(headers) -> int | None:
    value = headers.get("content-length")
    if value is None or "transfer-encoding" in headers:
        return None
    try:
        return int(value)
    except ValueError:
        return None
