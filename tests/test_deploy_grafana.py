"""deploy/grafana: an importable dashboard querying only metrics a running sidecar exports."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import metric_names
from tests.proc import REPO, Sidecar, Simulator

DASHBOARD = REPO / "deploy" / "grafana" / "spendtap-dashboard.json"

# Names the dashboard may use that a sidecar without budgets does not export yet:
# the budget gauges (labels scope, principal) come with the budget work; until a
# budget exists (and that work lands) they are absent from /metrics. `up` is made
# by Prometheus itself, not by the sidecar.
NOT_FROM_SIDECAR = {"cortex_budget_remaining_tokens", "cortex_budget_cap_tokens", "up"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def dashboard_metric_names() -> set[str]:
    names = set()
    for expr in queries(dashboard()):
        # label_values(metric{...}, label) names a metric as its first argument.
        if expr.startswith("label_values("):
            expr = expr[len("label_values(") :].rsplit(",", 1)[0]
        names |= metric_names(expr)
    return names


def exported_names(text: str) -> set[str]:
    """Sample names in a /metrics page, plus the names families with no sample yet would have."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            if kind == "histogram":
                names |= {name + "_bucket", name + "_count", name + "_sum"}
            elif kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def test_importable_structure():
    """A dashboard Grafana imports: unique uid/title, unique panel ids, grid positions,
    a Prometheus datasource variable used by every query, and the panels the issue asks for."""
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in d["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    text = json.dumps(d)
    for needle in (
        "histogram_quantile(0.95, sum by (le, model, node) "
        "(rate(cortex_time_to_first_token_seconds_bucket",
        "sum by (le, model, node) (rate(cortex_tokens_per_second_bucket",
        "cortex_completion_tokens_total",
        "sum by (account, key) (rate(cortex_spend_tokens_total",
        "cortex_budget_remaining_tokens",
        "sum by (source) (rate(cortex_usage_source_total",
        'outcome!~\\"completed|rejected\\"',
        "sum by (reason) (rate(cortex_rejections_total",
    ):
        assert needle in text, needle


@pytest.mark.e2e
def test_queries_use_only_exported_metrics(tmp_path):
    """Start a real sidecar in front of the simulator, send metered traffic (a stream with
    usage, a stream without, a JSON call and an unreachable upstream), scrape /metrics:
    every metric the dashboard queries is there, bar the allowlisted budget gauges."""
    sim = Simulator(tmp_path, "--ttft-ms", "0", "--tps", "0")
    sidecar = Sidecar(tmp_path, sim.url)
    try:
        headers = {"x-helexa-account-id": "acme", "x-helexa-key-id": "k1"}
        body = {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=30) as client:
            for extra in (
                {"stream": True, "stream_options": {"include_usage": True}},
                {"stream": True},
                {},
            ):
                r = client.post(
                    sidecar.url + "/v1/chat/completions", json=body | extra, headers=headers
                )
                assert r.status_code == 200
        sidecar.rows(expect=3)
        page = sidecar.metrics()
    finally:
        sidecar.stop()
        sim.stop()
    exported = exported_names(page)
    used = dashboard_metric_names()
    assert used, "no metric names found in the dashboard"
    missing = used - exported - NOT_FROM_SIDECAR
    assert not missing, f"dashboard queries metrics the sidecar does not export: {missing}"
