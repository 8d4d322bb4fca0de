"""`spendtap doctor`: one ok/FAIL line per check, exit 1 when any check fails."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from prometheus_client import CollectorRegistry

from spendtap.address import free_port
from spendtap.metrics.series import Metrics
from spendtap.metrics.server import MetricsServer
from spendtap.store.ledger import MIGRATIONS_TABLE, Ledger
from tests.helpers import invoke, usage_error
from tests.proc import Sidecar, Simulator

# Every test here reads settings from SPENDTAP_* variables: none may come from the shell.
pytestmark = pytest.mark.usefixtures("clean_env")


def doctor(*args: str, env: dict | None = None):
    result = invoke("doctor", "--timeout", "2", *args, env=env or {})
    lines = {}
    for line in result.output.splitlines():
        status, name, *rest = line.split(None, 2)
        lines[name] = (status, rest[0] if rest else "")
    return result.exit_code, lines, result.output


def metrics_server(healthy: bool = True) -> MetricsServer:
    m = Metrics(CollectorRegistry())
    detail = "ok" if healthy else "ledger writer stuck (5 rows queued)"
    return MetricsServer("127.0.0.1", 0, m.registry, lambda: (healthy, detail))


@pytest.fixture
def ledger(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(path)
    return path


@pytest.mark.e2e
def test_healthy_setup(tmp_path):
    """Against a real sidecar and simulator after one request, every check is ok, exit 0."""
    sim = Simulator(tmp_path)
    sidecar = Sidecar(tmp_path, sim.url)
    try:
        r = httpx.post(
            sidecar.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert r.status_code == 200
        sidecar.rows(expect=1)
        code, lines, out = doctor(
            "--db",
            str(sidecar.db),
            "--metrics",
            sidecar.metrics_url,
            "--upstream",
            sim.url,
        )
    finally:
        sidecar.stop()
        sim.stop()
    assert code == 0, out
    assert lines["ledger"][0] == "ok" and "writable, migrated" in lines["ledger"][1]
    assert lines["last-row"][0] == "info" and ", 1 rows" in lines["last-row"][1]
    assert lines["metrics"][0] == "ok" and "metric families" in lines["metrics"][1]
    assert lines["healthz"] == ("ok", f"{sidecar.metrics_url}/healthz: ok")
    assert lines["upstream"][0] == "ok" and "HTTP " in lines["upstream"][1]
    if "reservations" in lines:
        assert lines["reservations"] == ("info", "0 open")


def test_everything_down(tmp_path):
    """No ledger, nothing on the metrics port, an unreachable upstream: three FAILs, exit 1."""
    dead = f"http://127.0.0.1:{free_port()}"
    code, lines, out = doctor(
        "--db", str(tmp_path / "none.db"), "--metrics", dead, "--upstream", dead
    )
    assert code == 1, out
    assert lines["ledger"] == (
        "FAIL",
        f"{tmp_path / 'none.db'}: no such file (spendtap run creates it)",
    )
    assert lines["metrics"][0] == "FAIL" and "refused" in lines["metrics"][1].lower()
    assert lines["healthz"][0] == "FAIL"
    assert lines["upstream"][0] == "FAIL" and "refused" in lines["upstream"][1].lower()
    assert not (tmp_path / "none.db").exists(), "doctor must never create a ledger"


def test_stuck_writer_fails_healthz(ledger):
    """/healthz answering 503 (ledger writer stuck) is a FAIL carrying the server's reason."""
    server = metrics_server(healthy=False)
    try:
        url = f"http://127.0.0.1:{server.port}"
        code, lines, out = doctor("--db", str(ledger), "--metrics", url)
    finally:
        server.close()
    assert code == 1, out
    assert lines["metrics"][0] == "ok"
    assert lines["healthz"] == (
        "FAIL",
        f"{url}/healthz: HTTP 503 ledger writer stuck (5 rows queued)",
    )
    assert lines["upstream"][0] == "skip"


def test_not_a_ledger(tmp_path):
    """Someone else's SQLite file, or not SQLite at all, is a FAIL and is left untouched."""
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("create table t (x)")
    con.commit()
    con.close()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    for path, message in ((other, "not a spendtap ledger"), (junk, "not an SQLite database")):
        code, lines, out = doctor("--db", str(path), "--metrics", "none")
        assert code == 1, out
        assert lines["ledger"][0] == "FAIL" and message in lines["ledger"][1], out
    assert junk.read_bytes() == b"not a database" * 100


def test_pending_migration(ledger):
    """A ledger missing a migration (an older spendtap wrote it) is a FAIL that says which."""
    con = sqlite3.connect(ledger)
    last = con.execute(f"select name from {MIGRATIONS_TABLE} order by rowid desc").fetchone()[0]
    con.execute(f"delete from {MIGRATIONS_TABLE} where name = ?", (last,))
    con.commit()
    con.close()
    code, lines, out = doctor("--db", str(ledger), "--metrics", "none")
    assert code == 1, out
    assert lines["ledger"][0] == "FAIL"
    assert f"1 migration(s) pending: {last}" in lines["ledger"][1]


def test_empty_ledger_and_open_reservations(ledger):
    """A fresh ledger is ok with no rows; open reservations are counted with the oldest's age."""
    con = sqlite3.connect(ledger)
    has_reservations = bool(
        con.execute("select 1 from sqlite_master where name = 'reservations'").fetchone()
    )
    if has_reservations:
        con.execute(
            "insert into reservations (id, account, key, tokens, created_at, owner) "
            "values ('r1', 'acme', 'k', 100, '2020-01-01T00:00:00.000Z', 'test')"
        )
        con.commit()
    con.close()
    code, lines, out = doctor("--db", str(ledger), "--metrics", "none")
    assert code == 0, out
    assert lines["ledger"][0] == "ok"
    assert lines["last-row"] == ("info", "no rows yet")
    assert lines["metrics"] == ("skip", "disabled")
    if has_reservations:
        assert lines["reservations"][1].startswith("1 open, oldest 2020-01-01T00:00:00.000Z (")


def test_reads_run_settings_from_env_and_config(ledger, tmp_path):
    """Without flags, doctor checks what `spendtap run` would use: SPENDTAP_* and --config."""
    server = metrics_server()
    try:
        config = tmp_path / "spendtap.toml"
        config.write_text(f'metrics = "127.0.0.1:{server.port}"\ndb = "{ledger}"\n')
        code, lines, out = doctor(
            "--config", str(config), env={"SPENDTAP_UPSTREAM": f"http://127.0.0.1:{server.port}"}
        )
    finally:
        server.close()
    assert code == 0, out
    assert lines["ledger"][1].startswith(f"{ledger}: ")
    assert lines["healthz"][0] == "ok"
    assert lines["upstream"][0] == "ok"


def test_invalid_config_is_one_line(tmp_path):
    """A broken config file is reported like `spendtap run` reports it: one line, exit 1."""
    config = tmp_path / "bad.toml"
    config.write_text("bogus = 1\n")
    result = invoke("doctor", "--config", str(config), env={})
    assert result.exit_code == 1
    assert (
        result.output.strip().splitlines() == [result.output.strip()]
        and "unknown key 'bogus'" in result.output
    )


def test_metrics_address_in_every_form_run_takes(tmp_path):
    """--metrics takes what `spendtap run --metrics` takes (HOST:PORT, :PORT, PORT) and URLs,
    with or without the page's path; each checks /metrics and /healthz of one base."""
    sim = Simulator(tmp_path)
    sidecar = Sidecar(tmp_path, sim.url)
    port = sidecar.metrics_port
    base = f"http://127.0.0.1:{port}"
    try:
        for form in (
            f"127.0.0.1:{port}",
            f":{port}",
            str(port),
            f"0.0.0.0:{port}",
            base,
            base + "/",
            base + "/metrics",
            base + "/healthz",
        ):
            code, lines, out = doctor("--db", str(sidecar.db), "--metrics", form)
            assert code == 0, (form, out)
            assert lines["metrics"] == ("ok", lines["metrics"][1]), (form, out)
            assert lines["metrics"][1].startswith(f"{base}/metrics: "), (form, out)
            assert lines["healthz"] == ("ok", f"{base}/healthz: ok"), (form, out)
        # Under a path prefix nothing serves /healthz but the metrics page answers 200
        # everywhere: that is not a health check, and doctor says so.
        code, lines, out = doctor("--db", str(sidecar.db), "--metrics", base + "/prefix/metrics")
        assert code == 1, out
        assert lines["healthz"][0] == "FAIL" and "not a health answer" in lines["healthz"][1]
    finally:
        sidecar.stop()
        sim.stop()


@pytest.mark.parametrize("bad", ["ftp://host:9464", "host:port", "127.0.0.1:99999", "http://:9464"])
def test_bad_metrics_address_is_one_line(ledger, bad):
    """An address that is neither HOST:PORT nor an http(s) URL: click's usage error, exit 2,
    one Error line."""
    result = invoke("doctor", "--db", str(ledger), "--metrics", bad, env={})
    assert usage_error(result).startswith("Error: Invalid value for '--metrics': ")


def test_reports_the_trust_choice(ledger, tmp_path):
    """doctor says whose principal headers count, never the secret, and fails on a
    configuration spendtap run would refuse."""
    base = {"SPENDTAP_DB": str(ledger)}
    code, lines, _ = doctor("--metrics", "none", env=base)
    assert lines["trust"] == (
        "ok",
        "principal source headers; headers honoured from loopback peers "
        "(the default: nothing stated)",
    )

    env = {**base, "SPENDTAP_LISTEN": "0.0.0.0:8080"}
    code, lines, _ = doctor("--metrics", "none", env=env)
    assert code == 1 and lines["trust"][0] == "FAIL"
    assert "--trusted-peers" in lines["trust"][1]

    env["SPENDTAP_TRUSTED_PEERS"] = "10.0.0.0/8,fd00::/8"
    env["SPENDTAP_SET"] = "spendtap_principal_source=both"
    code, lines, _ = doctor("--metrics", "none", env=env)
    assert lines["trust"] == (
        "ok", "principal source both; headers honoured from peers 10.0.0.0/8, fd00::/8"
    )  # fmt: skip

    secret = "s3cret-gateway-value-0123456789"
    (tmp_path / "secret").write_text(secret + "\n")
    key = tmp_path / "upstream-key"
    key.write_text("sk-operator-key-0123456789\n")
    sets = [f"spendtap_gateway_secret_file={tmp_path / 'secret'}",
            "spendtap_principal_source=both", f"spendtap_upstream_key_file={key}"]  # fmt: skip
    env = {**base, "SPENDTAP_LISTEN": "0.0.0.0:8080", "SPENDTAP_SET": " ".join(sets)}
    code, lines, output = doctor("--metrics", "none", env=env)
    assert lines["trust"][0] == "ok"
    assert "any peer with the gateway secret" in lines["trust"][1]
    assert f"upstream key swapped from {key}" in lines["trust"][1]
    assert secret not in output and "sk-operator-key" not in output

    (tmp_path / "secret").write_text("short\n")
    code, lines, output = doctor("--metrics", "none", env=env)
    assert code == 1 and lines["trust"] == (
        "FAIL", "the gateway secret must be at least 16 characters"
    )  # fmt: skip

    env = {**base, "SPENDTAP_SET": "spendtap_principal_source=bearer"}
    code, lines, _ = doctor("--metrics", "none", env=env)
    assert lines["trust"] == ("ok", "principal source bearer: principal headers are never honoured")


def test_reports_the_price_file(ledger, tmp_path):
    """doctor names the price file and the catalogue, and fails on an invalid file."""
    code, lines, _ = doctor("--metrics", "none", env={"SPENDTAP_DB": str(ledger)})
    assert lines["prices"][0] == "info" and "catalogue only" in lines["prices"][1]
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."qwen3-*"]\ninput = 0.1\noutput = 0.4\n')
    env = {"SPENDTAP_DB": str(ledger), "SPENDTAP_PRICES": str(prices)}
    code, lines, _ = doctor("--metrics", "none", env=env)
    assert lines["prices"][0] == "ok" and f"{prices}: 1 entries" in lines["prices"][1]
    prices.write_text('[models."m"]\ninput = 1\n')
    code, lines, _ = doctor("--metrics", "none", env=env)
    assert code == 1 and lines["prices"][0] == "FAIL"
    assert "output is required" in lines["prices"][1]
