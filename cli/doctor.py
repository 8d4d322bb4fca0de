"""``spendtap doctor``: check a running setup, one ok/FAIL line per check.

Checks, in order:

- ledger: the file exists, is an SQLite ledger, every migration is applied,
  and this user can write it (and its directory, for the journal);
- last-row: when the newest request row was written (informational);
- reservations: how many budget reservations are open, and the oldest
  (informational; only when the ledger has a ``reservations`` table);
- metrics: ``/metrics`` answers 200 with Prometheus text, ``/healthz`` answers 200;
- upstream: the inference server answers HTTP at all (any status counts);
- trust: whose principal headers the configured sidecar honours (trusted peers,
  gateway secret file), and FAIL when that configuration would be refused at start
  or a credential file cannot be read. Secrets are never printed, only file paths;
- prices: the price file the sidecar loads (FAIL when it is invalid) and the
  catalogue version;
- central (with ``--central``, ``SPENDTAP_CENTRAL`` or the config's ``central``, or
  ``--db postgresql://...``): PostgreSQL is reachable and is spendtap's, every
  migration is applied; this node's lease is fresh; its backlog (rows committed
  locally, not yet shipped) is empty or young; the fleet's nodes and open
  reservations (informational). The URL is shown with its password hidden.

The ledger is only read: doctor never creates or migrates one. Exit status is 0
when every check passed, 1 when any failed.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click

from spendtap.address import parse_listen
from spendtap.cli.config import DEFAULTS, ConfigError, load_env, load_file
from spendtap.cli.numbers import bad_value, seconds
from spendtap.cli.paths import config_option, db_option
from spendtap.options import DEFAULT_METRICS, OptionError, check_settings
from spendtap.pricing import PriceFile, PriceFileError, catalogue_version
from spendtap.proxy.trust import TrustPolicy, read_secret_file, unguarded_start
from spendtap.store.central import is_central_url
from spendtap.store.ledger import (
    MIGRATIONS,
    MIGRATIONS_TABLE,
    LedgerCorrupt,
    LedgerError,
    LedgerProbe,
    NotALedger,
    readonly_reason,
)

OK, FAIL, SKIP, INFO = "ok", "FAIL", "skip", "info"


class Report:
    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.failed = 0

    def line(self, status: str, name: str, detail: str) -> None:
        if status == FAIL:
            self.failed += 1
        self.echo(f"{status:<5} {name:<13} {detail}")


def _ago(ts: str) -> str:
    try:
        then = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return ts
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{ts} ({seconds // size}{unit} ago)"
    return f"{ts} ({seconds}s ago)"


def check_ledger(report: Report, path: Path) -> None:
    if not path.exists():
        report.line(FAIL, "ledger", f"{path}: no such file (spendtap run creates it)")
        return
    if path.is_dir():
        report.line(FAIL, "ledger", f"{path}: is a directory")
        return
    try:
        # Read-only, with the WAL where the directory can hold its -shm, else a snapshot:
        # doctor reads a ledger on a read-only mount as well as a live one.
        probe = LedgerProbe(path, busy_timeout_s=5)
    except NotALedger as e:
        report.line(FAIL, "ledger", f"{path}: not an SQLite database: {e}")
        return
    except LedgerError as e:
        report.line(FAIL, "ledger", f"{path}: cannot open: {e}")
        return
    if probe.note:
        report.line(INFO, "ledger", probe.note)
    try:
        try:
            tables = probe.tables()
        except LedgerCorrupt as e:
            report.line(FAIL, "ledger", f"{path}: not an SQLite database: {e}")
            return
        except LedgerError as e:
            report.line(FAIL, "ledger", f"{path}: cannot read: {e}")
            return
        if MIGRATIONS_TABLE not in tables:
            report.line(FAIL, "ledger", f"{path}: not a spendtap ledger (no {MIGRATIONS_TABLE})")
            return
        applied = probe.applied_migrations()
        pending = [m.__name__ for m in MIGRATIONS if m.__name__ not in applied]
        problems = []
        if pending:
            problems.append(
                f"{len(pending)} migration(s) pending: {', '.join(pending)} "
                "(spendtap run applies them at start)"
            )
        readonly = readonly_reason(path)
        if readonly is not None:
            problems.append(f"not writable: {readonly} (spendtap run needs to write it; "
                            "the reading commands work)")  # fmt: skip
        elif not os.access(path.parent, os.W_OK | os.X_OK):
            problems.append(f"directory {path.parent} not writable (needed for the journal)")
        if problems:
            report.line(FAIL, "ledger", f"{path}: " + "; ".join(problems))
        else:
            report.line(
                OK, "ledger", f"{path}: writable, migrated ({len(applied)} migrations applied)"
            )
        if "requests" in tables:
            last, rows = probe.last_row()
            if last is None:
                report.line(INFO, "last-row", "no rows yet")
            else:
                report.line(INFO, "last-row", f"{_ago(last)}, {rows} rows")
        if "reservations" in tables:
            count, oldest = probe.open_reservations()
            detail = f"{count} open"
            if oldest:
                detail += f", oldest {_ago(oldest)}"
            report.line(INFO, "reservations", detail)
    except LedgerError as e:
        report.line(FAIL, "ledger", f"{path}: {e}")
    finally:
        probe.close()


def _get(url: str, timeout: float) -> tuple[int, str]:
    """Status and body of a GET; HTTP error statuses are answers, not exceptions."""
    req = urllib.request.Request(url, headers={"User-Agent": "spendtap-doctor"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(1 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(4096).decode("utf-8", "replace")


def _reason(e: Exception) -> str:
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, Exception) else e
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def check_metrics(report: Report, base: str, timeout: float) -> None:
    base = base.rstrip("/")
    try:
        status, body = _get(base + "/metrics", timeout)
    except Exception as e:
        report.line(FAIL, "metrics", f"{base}/metrics: {_reason(e)}")
    else:
        if status == 200 and "# TYPE" in body:
            families = sum(1 for line in body.splitlines() if line.startswith("# TYPE"))
            report.line(OK, "metrics", f"{base}/metrics: {families} metric families")
        else:
            report.line(FAIL, "metrics", f"{base}/metrics: HTTP {status}, not Prometheus text")
    try:
        status, body = _get(base + "/healthz", timeout)
    except Exception as e:
        report.line(FAIL, "healthz", f"{base}/healthz: {_reason(e)}")
        return
    if not _is_health_answer(body):
        # Anything else answering 200 (the metrics page, a proxy's index) is no health check.
        report.line(
            FAIL, "healthz", f"{base}/healthz: HTTP {status}, not a health answer (one line)"
        )
        return
    detail = body.strip().splitlines()[0] if body.strip() else ""
    if status == 200:
        report.line(OK, "healthz", f"{base}/healthz: {detail or 'ok'}")
    else:
        report.line(FAIL, "healthz", f"{base}/healthz: HTTP {status} {detail}".rstrip())


def _is_health_answer(body: str) -> bool:
    """spendtap's /healthz answers one short line ("ok", or what is wrong)."""
    text = body.strip()
    return (
        0 < len(text) <= 500
        and len(text.splitlines()) == 1
        and not text.startswith("#")
        and "<" not in text[:1]
    )


def check_upstream(report: Report, url: str, timeout: float) -> None:
    started = time.monotonic()
    try:
        status, _ = _get(url, timeout)
    except Exception as e:
        report.line(FAIL, "upstream", f"{url}: {_reason(e)}")
        return
    ms = (time.monotonic() - started) * 1000
    report.line(OK, "upstream", f"{url}: HTTP {status} in {ms:.0f} ms")


def check_central(report: Report, dsn: str, local_db: Path | None, timeout: float) -> None:
    """The fleet's central store, and this node's lease and backlog in it."""
    from spendtap.store.central import MIGRATIONS as CENTRAL_MIGRATIONS
    from spendtap.store.central import CentralError, CentralStore, node_identity
    from spendtap.store.ledger import Ledger, LedgerError

    try:
        store = CentralStore(dsn, create=False, timeout_s=timeout)
    except CentralError as e:
        report.line(FAIL, "central", str(e))
        return
    try:
        applied = set(store.migrations())
        pending = [name for name, _ in CENTRAL_MIGRATIONS if name not in applied]
        if pending:
            report.line(FAIL, "central", f"{store.where}: migrations pending: {', '.join(pending)}")
        else:
            report.line(
                OK, "central", f"{store.where}: reachable, migrated ({len(applied)} migrations)"
            )
        nodes = store.nodes()
        expired = sum(1 for n in nodes if n["expired"])
        report.line(
            INFO,
            "fleet",
            f"{len(nodes)} nodes ({expired} with an expired lease), "
            f"{store.open_reservation_count()} open reservations, {store.count_rows()} rows",
        )
        if local_db is None:
            return
        node_id = node_identity(local_db)
        mine = next((n for n in nodes if n["node_id"] == node_id), None)
        if mine is None:
            report.line(FAIL, "lease", f"no lease for node {node_id} (is its sidecar running?)")
        elif mine["expired"]:
            report.line(
                FAIL,
                "lease",
                f"node {node_id}: last heartbeat {mine['heartbeat_age_s']:.0f}s ago "
                f"(lease {mine['lease_s']}s): expired",
            )
        else:
            report.line(
                OK,
                "lease",
                f"node {node_id}: heartbeat {mine['heartbeat_age_s']:.1f}s ago "
                f"(lease {mine['lease_s']}s)",
            )
        if local_db.exists():
            try:
                with Ledger.open_existing(local_db) as ledger:
                    first = next(ledger.requests(after_rowid=0, order="asc", limit=1), None)
                    shipped = store.shipped_rowid(node_id, first["id"] if first else None)
                    waiting = max(0, ledger.last_rowid() - shipped)
                    head = next(ledger.requests(after_rowid=shipped, order="asc", limit=1), None)
            except LedgerError as e:
                report.line(FAIL, "backlog", f"{local_db}: {e}")
                return
            if not waiting:
                report.line(OK, "backlog", "every local row is in the central store")
            else:
                oldest, age = "?", 0.0
                if head:
                    oldest = _ago(head["ts"])
                    then = datetime.fromisoformat(head["ts"].replace("Z", "+00:00"))
                    age = time.time() - then.timestamp()
                status = FAIL if age > 60 else OK
                report.line(status, "backlog", f"{waiting} rows not shipped yet, oldest {oldest}")
    except CentralError as e:
        report.line(FAIL, "central", str(e))
    finally:
        store.close()


def check_trust(report: Report, configured: dict) -> None:
    """The trust choice of the sidecar this configuration starts (never a secret)."""
    sets = dict(configured.get("set") or {})
    try:
        options = check_settings(sets)
    except OptionError as e:
        report.line(FAIL, "trust", f"invalid setting: {e}")
        return
    source = options.get("spendtap_principal_source", "headers")
    peers = configured.get("trusted_peers") or options.get("spendtap_trusted_peers", "")
    secret_file = options.get("spendtap_gateway_secret_file", "")
    try:
        secret = options.get("spendtap_gateway_secret")
        if secret_file:
            secret = read_secret_file(secret_file, "spendtap_gateway_secret_file")
        policy = TrustPolicy.from_settings(peers, secret)
    except ValueError as e:
        report.line(FAIL, "trust", str(e))
        return
    listen = configured.get("listen", DEFAULTS["listen"])
    host = listen.rpartition(":")[0].strip("[]")
    problem = unguarded_start(
        listen_hosts=[host],
        transparent=configured.get("mode") == "transparent",
        principal_source=source,
        policy=policy,
    )
    if problem is not None:
        report.line(FAIL, "trust", problem)
        return
    if source == "bearer":
        detail = "principal source bearer: principal headers are never honoured"
    else:
        detail = f"principal source {source}; headers honoured from {policy.describe()}"
        if secret_file:
            detail += f" (secret in {secret_file})"
        if not policy.stated:
            detail += " (the default: nothing stated)"
    swap = options.get("spendtap_upstream_key_file")
    if swap:
        try:
            read_secret_file(swap, "spendtap_upstream_key_file")
        except ValueError as e:
            report.line(FAIL, "trust", str(e))
            return
        detail += f"; upstream key swapped from {swap}"
    report.line(OK, "trust", detail)


def check_prices(report: Report, configured: dict) -> None:
    """The price file the sidecar will load (if any), and the catalogue's version."""
    path = configured.get("prices") or (configured.get("set") or {}).get("spendtap_prices")
    catalogue = f"genai-prices {catalogue_version()} catalogue"
    if not path:
        report.line(INFO, "prices", f"{catalogue} only (no price file)")
        return
    try:
        prices = PriceFile.load(path)
    except PriceFileError as e:
        report.line(FAIL, "prices", str(e))
        return
    entries = len(prices.exact) + len(prices.globs)
    report.line(OK, "prices", f"{path}: {entries} entries, then the {catalogue}")


def metrics_url(address: str) -> str:
    """The base URL of a metrics server, from anything ``spendtap run --metrics`` takes
    (``HOST:PORT``, ``[V6]:PORT``, ``:PORT``, ``PORT``) or a URL.

    A URL may name a page (``http://host:9464/metrics`` or ``/healthz``): the base is
    what is left, so ``/metrics`` and ``/healthz`` are checked beside each other. A
    wildcard listen address becomes loopback. ``ValueError`` on anything else.
    """
    address = address.strip()
    if "://" in address:
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected HOST:PORT or an http(s) URL, got {address!r}")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ValueError(f"bad port in {address!r}") from None
        path = parts.path.rstrip("/")
        for page in ("/metrics", "/healthz", "/health"):
            if path.endswith(page):
                path = path[: -len(page)]
                break
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    host, port = parse_listen(address)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


@click.command()
@db_option
@click.option(
    "--metrics",
    "metrics",
    metavar="ADDRESS",
    help="The metrics port: HOST:PORT as spendtap run --metrics takes it, or a URL "
    "(http://host:9464, or .../metrics) [default: from SPENDTAP_METRICS or the config "
    f"file, else {DEFAULT_METRICS}]. 'none' skips the check.",
)
@click.option(
    "--upstream",
    metavar="URL",
    help="Inference server to reach [default: from SPENDTAP_UPSTREAM or the config "
    "file; skipped when unknown].",
)
@config_option("The TOML file spendtap run uses, to find the metrics and upstream addresses.")
@click.option(
    "--central",
    metavar="URL",
    help="The fleet's central store, postgresql://USER@HOST:PORT/DB [default: from "
    "SPENDTAP_CENTRAL or the config file; skipped when unknown]. Never shown with its password.",
)
@click.option(
    "--timeout",
    type=seconds(0, 3600, lo_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for each HTTP check.",
)
def doctor(db_path, metrics, upstream, config_path, central, timeout):
    """Check a running setup: ledger, metrics, health, upstream, reservations, trust, central.

    Prints one line per check (ok, FAIL, skip or info) and exits 1 if any
    check failed. Reads the same SPENDTAP_* variables and --config file as
    spendtap run, so on a systemd host this checks what the unit runs.

    \b
    Examples:
        spendtap doctor
        spendtap doctor --db /var/lib/spendtap/ledger.db \\
            --metrics 127.0.0.1:9464 --upstream http://127.0.0.1:8000
        spendtap doctor --metrics http://10.0.0.5:9464/metrics
    """
    try:
        configured = load_file(config_path) if config_path else {}
        from_env = load_env(os.environ)
        # [set] merges by option name, the environment winning (as in spendtap run).
        from_env["set"] = {**configured.get("set", {}), **from_env.get("set", {})}
        configured.update(from_env)
    except ConfigError as e:
        raise click.ClickException(f"invalid setting: {e}") from None
    # Check the addresses before anything runs: a bad one is one line, not a half report.
    from_option = metrics is not None
    if metrics is None:
        metrics = configured.get("metrics", DEFAULTS["metrics"]) or "none"
    base = None
    if metrics != "none":
        try:
            base = metrics_url(metrics)
        except ValueError as e:
            if from_option:
                raise bad_value("metrics", str(e)) from None
            # Not an option: the config file's value is an error of the setting (exit 1).
            raise click.ClickException(
                f"Invalid value for the configured metrics address: {e}"
            ) from None
    report = Report(click.echo)
    db = db_path
    if click.get_current_context().get_parameter_source(
        "db_path"
    ).name == "DEFAULT" and configured.get("db"):
        db = Path(configured["db"])
    central = (
        central
        or configured.get("central")
        or (configured.get("set") or {}).get("spendtap_central")
        or None
    )
    local_db: Path | None = None
    if is_central_url(db):
        central = central or str(db)
    else:
        local_db = Path(db)
        check_ledger(report, local_db)

    if base is None:
        report.line(SKIP, "metrics", "disabled")
    else:
        check_metrics(report, base, timeout)

    upstream = upstream or configured.get("upstream")
    if upstream:
        check_upstream(report, upstream, timeout)
    else:
        report.line(SKIP, "upstream", "unknown (pass --upstream or set SPENDTAP_UPSTREAM)")

    check_trust(report, configured)
    check_prices(report, configured)
    if central:
        check_central(report, central, local_db, timeout)

    if report.failed:
        raise SystemExit(1)
