"""Prometheus metrics for spendtap.

Default names keep the helexa cortex gateway's ``cortex_`` prefix so existing
dashboards work; the prefix is an option. Every metric is registered on the
registry passed in (tests build a fresh ``CollectorRegistry``). Histograms use
explicit buckets sized for LLM traffic: prefill can take minutes, generations
tens of minutes, decode rates run from a few to thousands of tokens/s.

Label values that come from traffic (model, node, account, key) are bounded:
past a cap, new values are folded into ``_other`` so a client sending random
model names or keys cannot explode the series count.

No ``*_created`` series are exported (``disable_created_metrics``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spendtap.metering.request import path_family
from spendtap.options import DEFAULT_METRICS_PREFIX

# No counter or histogram exports its `*_created` series: no dashboard or alert uses
# them, and exporters by convention leave them out (they double the series of every
# counter). Process-wide, before any metric is made.
disable_created_metrics()

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
COMMIT_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
DECODE_RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)

OTHER_LABEL = "_other"
ANONYMOUS_LABEL = "_anonymous"


class LabelCap:
    """Admit at most ``limit`` distinct values; fold the rest into ``_other``."""

    def __init__(self, limit: int):
        self.limit = limit
        self._seen: set = set()
        self._lock = threading.Lock()

    def admit(self, value):
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return None


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "none"


class Metrics:
    """All of spendtap's metric families, on one registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        prefix: str = DEFAULT_METRICS_PREFIX,
        max_model_series: int = 200,
        max_principal_series: int = 1000,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.prefix = prefix
        p = prefix + "_" if prefix else ""
        mn = ("model", "node")
        r = self.registry
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from request start to the first chunk carrying generated content.",
            mn,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.decode_rate = Histogram(
            p + "tokens_per_second",
            "Decode rate: completion tokens over the first-to-last content window.",
            mn,
            buckets=DECODE_RATE_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Time from request start to the end of the response.",
            mn,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            p + "requests",
            "Proxied requests by status class and outcome.",
            ("model", "node", "status_class", "outcome"),
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens",
            "Prompt tokens processed (cache reads and writes included).",
            mn,
            registry=r,
        )
        self.completion_tokens = Counter(
            p + "completion_tokens",
            "Completion tokens generated (reasoning included).",
            mn,
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            p + "cached_prompt_tokens",
            "Prompt tokens read from a prompt cache.",
            mn,
            registry=r,
        )
        self.usage_source = Counter(
            p + "usage_source",
            "Requests by where their usage came from: reported, estimated or none (missing).",
            ("model", "node", "source"),
            registry=r,
        )
        ak = ("account", "key")
        self.spend_tokens = Counter(
            p + "spend_tokens",
            "Tokens charged to a principal (prompt + completion).",
            ak,
            registry=r,
        )
        self.spend_prompt_tokens = Counter(
            p + "spend_prompt_tokens",
            "Prompt tokens charged to a principal.",
            ak,
            registry=r,
        )
        self.spend_completion_tokens = Counter(
            p + "spend_completion_tokens",
            "Completion tokens charged to a principal.",
            ak,
            registry=r,
        )
        self.spend_usd = Counter(
            p + "spend_usd",
            "Dollars charged to a principal (priced requests only; see price_source).",
            ak,
            registry=r,
        )
        self.cost_usd = Counter(
            p + "cost_usd",
            "Dollars of priced requests per model and node.",
            ("model", "node"),
            registry=r,
        )
        self.unpriced = Counter(
            p + "unpriced_requests",
            "Requests with usage whose model has no known price (cost unknown, not 0).",
            ("model", "node"),
            registry=r,
        )
        self.metering_errors = Counter(
            p + "metering_errors",
            "Failures to meter (the traffic itself kept flowing), by kind.",
            ("kind",),
            registry=r,
        )
        self.commit_wait = Histogram(
            p + "ledger_commit_wait_seconds",
            "How long the end of a response waited for its ledger row to commit (and, at "
            "most 2 ms, to keep the spacing of the responses committed with it).",
            buckets=COMMIT_WAIT_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            p + "rejections",
            "Requests spendtap answered itself instead of dispatching, by reason "
            "(balance, window, unavailable, invalid_api_key).",
            ("reason",),
            registry=r,
        )
        self.untrusted_principal_headers = Counter(
            p + "untrusted_principal_headers",
            "Requests whose principal headers came from a peer nobody vouched for "
            "(spendtap_trusted_peers, gateway secret): ignored and removed.",
            registry=r,
        )
        self.unrecognized = Counter(
            p + "unrecognized_api_requests",
            "Requests to a path of no API spendtap recognises (usage only if the answer "
            "carries a known usage object; never estimated), by path family (first "
            "segments, ids replaced by :id).",
            ("path_family",),
            registry=r,
        )
        self.in_flight = Gauge(
            p + "in_flight_requests",
            "Requests currently being proxied.",
            registry=r,
        )
        self._children: dict[tuple, object] = {}
        self._models = LabelCap(max_model_series)
        self._path_families = LabelCap(100)
        self._principals = LabelCap(max_principal_series)

    def model_node(self, model: str | None, node: str | None) -> tuple[str, str]:
        pair = (model or "unknown", node or "unknown")
        return pair if self._models.admit(pair) is not None else (OTHER_LABEL, OTHER_LABEL)

    def principal(self, account: str | None, key: str | None) -> tuple[str, str]:
        pair = (account or ANONYMOUS_LABEL, key or ANONYMOUS_LABEL)
        return pair if self._principals.admit(pair) is not None else (OTHER_LABEL, OTHER_LABEL)

    def observe(self, row: dict) -> None:
        """Record one finished request (a ledger row) in the metric families."""
        child = self._child
        model, node = self.model_node(row.get("model"), row.get("node"))
        mn = (model, node)
        outcome = (model, node, status_class(row.get("status")), row["outcome"])
        child(self.requests, outcome).inc()
        if row.get("ttft_s") is not None:
            child(self.ttft, mn).observe(row["ttft_s"])
        if row.get("tokens_per_s") is not None:
            child(self.decode_rate, mn).observe(row["tokens_per_s"])
        if row.get("duration_s") is not None:
            child(self.duration, mn).observe(row["duration_s"])
        prompt = row.get("prompt_tokens") or 0
        completion = row.get("completion_tokens") or 0
        if prompt:
            child(self.prompt_tokens, mn).inc(prompt)
        if completion:
            child(self.completion_tokens, mn).inc(completion)
        if row.get("cached_tokens"):
            child(self.cached_prompt_tokens, mn).inc(row["cached_tokens"])
        if row["outcome"] != "rejected":
            # A refusal carries no usage by design (it is in rejections_total): counting it
            # as source="none" would hide a real metering gap among deliberate refusals.
            child(self.usage_source, (model, node, row.get("usage_source") or "none")).inc()
        if row.get("api") == "other":
            family = path_family(row.get("path") or "/")
            if self._path_families.admit(family) is None:
                family = OTHER_LABEL
            child(self.unrecognized, (family,)).inc()
        # Anonymous requests are metered per model but never charged.
        if row.get("account") or row.get("key"):
            ak = self.principal(row.get("account"), row.get("key"))
            if prompt or completion:
                child(self.spend_tokens, ak).inc(prompt + completion)
            if prompt:
                child(self.spend_prompt_tokens, ak).inc(prompt)
            if completion:
                child(self.spend_completion_tokens, ak).inc(completion)

    def observe_cost(self, row: Mapping[str, Any]) -> None:
        """Record a committed row's cost (by the ledger writer's after-commit callback: on
        the event loop for the writer process, on its thread for the thread writer)."""
        source = row.get("price_source")
        if source is None:
            return
        mn = self.model_node(row.get("model"), row.get("node"))
        if source == "none":
            self._child(self.unpriced, mn).inc()
            return
        dollars = (row.get("cost_nusd") or 0) / 1e9
        self._child(self.cost_usd, mn).inc(dollars)
        if row.get("account") or row.get("key"):
            ak = self.principal(row.get("account"), row.get("key"))
            self._child(self.spend_usd, ak).inc(dollars)

    def _child(self, metric, labels: tuple):
        """``metric.labels(*labels)``, remembered: label values are bounded by the caps,
        and ``labels()`` takes a lock and builds a key on every call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


class CallbackMetrics(Collector):
    """Gauges and counters whose values are read at scrape time from callables.

    Used for figures that live elsewhere (the ledger writer's queue depth and its
    running totals), so they are never stale and never updated by hand. A figure
    that only goes up is a counter (exported as ``NAME_total``), so ``rate()`` and
    ``increase()`` handle restarts; one that goes up and down is a gauge.
    """

    def __init__(
        self,
        prefix: str,
        gauges: Iterable[tuple[str, str, Callable[[], float]]] = (),
        counters: Iterable[tuple[str, str, Callable[[], float]]] = (),
    ):
        self._prefix = prefix + "_" if prefix else ""
        self._figures = [(GaugeMetricFamily, *g) for g in gauges] + [
            (CounterMetricFamily, *c) for c in counters
        ]

    def collect(self):
        for kind, name, doc, read in self._figures:
            try:
                value = float(read())
            except Exception:  # a broken reader must not break the scrape
                continue
            family = kind(self._prefix + name, doc)
            family.add_metric([], value)
            yield family
