"""deploy/prometheus: promtool accepts the config and rules, and each alert provably fires."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.helpers import metric_names
from tests.proc import REPO

PROM = REPO / "deploy" / "prometheus"
yaml = YAML(typ="safe")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (scripts/ci-deps.sh installs Debian's prometheus)")
    return found


def run(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def alert_names() -> list[str]:
    rules = yaml.load(PROM / "alerts.yml")
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_check_config():
    """``promtool check config`` accepts prometheus.yml and its rule file, without warnings."""
    proc = run("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_check_rules():
    """``promtool check rules`` accepts alerts.yml."""
    proc = run("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_fire_on_sample_series():
    """``promtool test rules``: every alert fires on its sample series (and not on healthy ones)."""
    proc = run("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_test():
    """Each alert in alerts.yml appears in alerts_test.yml with a non-empty exp_alerts."""
    tests = yaml.load(PROM / "alerts_test.yml")
    fired = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alert_names()) == fired
    assert set(alert_names()) >= {
        "SpendtapSidecarDown",
        "SpendtapBudgetNearlyExhausted",
        "SpendtapLedgerWriteErrors",
        "SpendtapUsageMissing",
        "SpendtapTimeToFirstTokenHigh",
        "SpendtapCentralShippingLag",
    }


@pytest.mark.parametrize("alert", alert_names())
def test_rule_tests_fail_when_an_alert_is_broken(tmp_path, alert):
    """The rule tests have teeth: an alert whose expression never matches makes them fail."""
    rules = yaml.load(PROM / "alerts.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) == 0"
    out = io.StringIO()
    YAML().dump(rules, out)
    (tmp_path / "alerts.yml").write_text(out.getvalue())
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    proc = run("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert alert in proc.stdout + proc.stderr


def test_metric_names_use_the_exported_families():
    """Alert expressions name only families spendtap exports (cortex_) or Prometheus' up."""
    names = set()
    for group in yaml.load(PROM / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            names |= metric_names(rule["expr"])
    assert names == {
        "up",
        "cortex_budget_remaining_tokens",
        "cortex_budget_cap_tokens",
        "cortex_ledger_write_errors_total",
        "cortex_metering_errors_total",
        "cortex_usage_source_total",
        "cortex_time_to_first_token_seconds_bucket",
        "cortex_central_lag_seconds",
        "cortex_spend_usd_total",
        "cortex_budget_cap_usd",
        "cortex_budget_usd_window_seconds",
    }


def test_kubernetes_scrape_job_structure():
    """kubernetes-scrape.yml keeps exactly the port "metrics" of containers named "spendtap",
    as the sidecar manifest has (Debian's promtool lacks Kubernetes discovery: no promtool)."""
    doc = yaml.load(PROM / "kubernetes-scrape.yml")
    (job,) = doc["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep == [
        {
            "source_labels": [
                "__meta_kubernetes_pod_container_name",
                "__meta_kubernetes_pod_container_port_name",
            ],
            "regex": "spendtap;metrics",
            "action": "keep",
        }
    ]
    manifest = list(yaml.load_all(REPO / "deploy" / "kubernetes" / "spendtap-sidecar.yaml"))
    (deploy,) = [d for d in manifest if d["kind"] == "Deployment"]
    (sidecar,) = [
        c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "spendtap"
    ]
    assert "metrics" in {p["name"] for p in sidecar["ports"]}
