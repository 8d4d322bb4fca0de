"""``spendtap run`` and ``spendtap addon-path``: start the sidecar (mitmdump with the addon)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import click
from click.core import ParameterSource

from spendtap.address import parse_listen
from spendtap.cli.config import MODES, ConfigError, resolve
from spendtap.cli.paths import config_option, db_option, refuse_readonly
from spendtap.options import DEFAULT_METRICS, ENV_CENTRAL, redact, redact_url
from spendtap.paths import default_db_path
from spendtap.pricing import PriceFile, PriceFileError
from spendtap.proxy.eventloop import DEFAULT_EVENT_LOOP, EVENT_LOOPS, unavailable
from spendtap.proxy.trust import read_secret_file
from spendtap.store.ledger import Ledger, LedgerError, StorageError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def addon_path() -> str:
    """The installed entry script for ``mitmdump -s``."""
    import spendtap

    return str(Path(spendtap.__file__).with_name("spendtap.py"))


def _mitmdump_command() -> list[str]:
    beside = Path(sys.executable).with_name("mitmdump")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mitmdump")
    if found:
        return [found]
    # Same interpreter, same mitmproxy: works wherever the package is importable.
    return [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]


RUNNERS = ("mitmdump", "lean")


def _runner_command(runner: str, event_loop: str = DEFAULT_EVENT_LOOP) -> list[str]:
    """The program that runs the sidecar: mitmdump loading the entry script with ``-s``,
    or the lean runner (``spendtap.proxy.runner``: mitmproxy's master with only the
    addons a sidecar needs, the same entry script's addons loaded directly), on
    ``event_loop`` (``spendtap.proxy.eventloop``: mitmdump itself on asyncio's loop,
    this interpreter's mitmdump started on uvloop's)."""
    if event_loop not in EVENT_LOOPS:
        raise click.UsageError(
            f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, not {event_loop!r}"
        )
    if runner == "lean":
        command = [sys.executable, "-m", "spendtap.proxy.runner"]
        return command if event_loop == "asyncio" else [*command, "--event-loop", event_loop]
    if runner != "mitmdump":
        raise click.UsageError(f"--runner must be one of {', '.join(RUNNERS)}, not {runner!r}")
    if event_loop == "asyncio":
        return [*_mitmdump_command(), "-s", addon_path()]
    return [sys.executable, "-m", "spendtap.proxy.eventloop", event_loop, "-s", addon_path()]


def _check_upstream(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise click.BadParameter(
            f"expected http(s)://HOST[:PORT], got {url!r}", param_hint="--upstream"
        )
    return url


def build_mitmdump_args(
    *,
    mode: str,
    upstream: str | None,
    listen: str,
    db: str,
    metrics: str,
    node: str | None = None,
    metrics_prefix: str | None = None,
    access_log: str | None = None,
    prices: str | None = None,
    trusted_peers: str | None = None,
    extra_set: tuple[str, ...] = (),
    verbose: bool = False,
    runner: str = "mitmdump",
    event_loop: str = DEFAULT_EVENT_LOOP,
) -> list[str]:
    """The mitmdump command line ``spendtap run`` executes (pure, for tests and --dry-run).

    ``runner="lean"``: the same options for ``python -m spendtap.proxy.runner``;
    ``event_loop="uvloop"``: either on uvloop's event loop."""
    host, port = parse_listen(listen)
    if mode in ("reverse", "upstream"):
        if not upstream:
            raise click.UsageError(f"--upstream is required in {mode} mode")
        mode_arg = f"{mode}:{_check_upstream(upstream)}"
    else:
        if upstream:
            raise click.UsageError(f"--upstream makes no sense in {mode} mode")
        mode_arg = mode
    command = _runner_command(runner, event_loop)
    script = command[-2:] if command[-2] == "-s" else []
    args = [
        *command[: len(command) - len(script)],
        "--mode",
        mode_arg,
        "--listen-host",
        host,
        "--listen-port",
        str(port),
        *script,
        "--set",
        f"spendtap_db={db}",
        "--set",
        f"spendtap_metrics={metrics}",
        # lazy: an unreachable upstream still yields a flow (metered) and a clean 502.
        "--set",
        "connection_strategy=lazy",
        # Generations can pause for minutes between bytes (long prefills, tool calls).
        "--set",
        "tcp_timeout=1800",
        # Printing every flow costs CPU on the hot path; spendtap logs what matters:
        # start-up, warnings and errors. -v adds every flow and connection.
        "--set",
        "flow_detail=0" if not verbose else "flow_detail=1",
    ]
    if verbose:
        args += ["--set", "spendtap_connection_log=true"]
    if host not in LOOPBACK:
        # Listening beyond loopback is the point of a sidecar; mitmproxy would
        # otherwise refuse clients from public addresses.
        args += ["--set", "block_global=false"]
    if node:
        args += ["--set", f"spendtap_node={node}"]
    if metrics_prefix:
        args += ["--set", f"spendtap_metrics_prefix={metrics_prefix}"]
    if access_log:
        args += ["--set", f"spendtap_access_log={access_log}"]
    if prices:
        args += ["--set", f"spendtap_prices={prices}"]
    if trusted_peers:
        args += ["--set", f"spendtap_trusted_peers={trusted_peers}"]
    for item in extra_set:
        args += ["--set", item]
    return args


@click.command()
@config_option(
    "TOML file with the settings below (keys: upstream, listen, db, metrics, mode, "
    "node, metrics_prefix, access_log, trusted_peers, prices, and a [set] table)."
)
@click.option(
    "--upstream",
    metavar="URL",
    help="Inference server to front (reverse/upstream modes). [env: SPENDTAP_UPSTREAM]",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Where clients connect. [default: 127.0.0.1:8080; env: SPENDTAP_LISTEN]",
)
@db_option
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    help="Prometheus /metrics and /healthz address; empty string disables. "
    f"[default: {DEFAULT_METRICS}; env: SPENDTAP_METRICS]",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="mitmproxy mode. [default: reverse; env: SPENDTAP_MODE]",
)
@click.option(
    "--node",
    help="Node label for metrics and rows (default: upstream host:port). [env: SPENDTAP_NODE]",
)
@click.option(
    "--metrics-prefix",
    help="Metric name prefix (default: cortex). [env: SPENDTAP_METRICS_PREFIX]",
)
@click.option(
    "--access-log",
    type=click.Path(dir_okay=False),
    help="Write a JSONL access log here. [env: SPENDTAP_ACCESS_LOG]",
)
@click.option(
    "--prices",
    type=click.Path(dir_okay=False),
    help="TOML price file (per-model or glob rates, dollars per million tokens); it "
    "overrides the genai-prices catalogue. An invalid file fails here. [env: SPENDTAP_PRICES]",
)
@click.option(
    "--trusted-peers",
    metavar="CIDRS",
    help="Clients whose principal headers count: addresses and CIDRs, comma-separated, "
    "or 'any'. Others' principal headers are removed and ignored. Required when listening "
    "beyond loopback with principal headers (unless a gateway secret is set). "
    "[default: loopback; env: SPENDTAP_TRUSTED_PEERS]",
)
@click.option(
    "--set",
    "extra_set",
    multiple=True,
    metavar="OPTION=VALUE",
    help="Any other mitmproxy or spendtap option (repeatable). "
    "[env: SPENDTAP_SET, whitespace-separated]",
)
@click.option(
    "--central",
    metavar="URL",
    help="PostgreSQL URL (postgresql://USER@HOST:PORT/DB) of the fleet's central store: "
    "budgets shared by every sidecar, rows shipped from the local ledger. Prefer PGPASSWORD "
    "or a password file to a password in the URL; it is passed to mitmdump in its "
    "environment, never on its command line, and never shown. [env: SPENDTAP_CENTRAL]",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Log every flow and connection (default: start-up, warnings and errors only).",
)
@click.option(
    "--runner",
    type=click.Choice(RUNNERS),
    default="mitmdump",
    show_default=True,
    help="mitmdump: mitmproxy's mitmdump with every default addon, loading the addon "
    "script; lean: mitmproxy's master with only the addons a sidecar needs "
    "(spendtap.proxy.runner; less CPU per request). [env: SPENDTAP_RUNNER]",
    envvar="SPENDTAP_RUNNER",
)
@click.option(
    "--event-loop",
    type=click.Choice(EVENT_LOOPS),
    default=DEFAULT_EVENT_LOOP,
    show_default=True,
    help="The proxy's event loop: uvloop (libuv's, in C: less CPU a request) or asyncio "
    "(the standard library's, mitmdump's own). [env: SPENDTAP_EVENT_LOOP]",
    envvar="SPENDTAP_EVENT_LOOP",
)
@click.option("--dry-run", is_flag=True, help="Print the mitmdump command instead of running it.")
@click.pass_context
def run(
    ctx,
    config_path,
    upstream,
    listen,
    db_path,
    metrics,
    mode,
    node,
    metrics_prefix,
    access_log,
    prices,
    trusted_peers,
    central,
    extra_set,
    verbose,
    runner,
    event_loop,
    dry_run,
):
    """Run the sidecar: mitmdump with the spendtap addon.

    The process becomes mitmdump (exec), so SIGTERM and SIGINT reach it
    directly and no child is left behind. It runs on uvloop's event loop
    unless --event-loop asyncio.

    Settings come from the command line, else SPENDTAP_* environment
    variables, else the --config file, else the defaults. An invalid setting
    (including any spendtap_* option given with --set, checked against the
    addon's own option table) fails here, in one line, with exit status 1.

    Principal headers count only from trusted peers (--trusted-peers; loopback
    when nothing is stated). Listening beyond loopback with principal headers
    and no trust stated is refused.

    \b
    Examples:
        spendtap run --upstream http://127.0.0.1:8000 --listen 0.0.0.0:8080 \\
            --db /var/lib/spendtap/ledger.db --metrics 127.0.0.1:9464
        SPENDTAP_UPSTREAM=http://127.0.0.1:8000 spendtap run
        spendtap run --config /etc/spendtap/spendtap.toml
    """
    given = {
        "upstream": upstream,
        "listen": listen,
        "metrics": metrics,
        "mode": mode,
        "node": node,
        "metrics_prefix": metrics_prefix,
        "access_log": access_log,
        "prices": prices,
        "trusted_peers": trusted_peers,
        "central": central,
    }
    cli_values = {k: v for k, v in given.items() if v is not None}
    if ctx.get_parameter_source("db_path") == ParameterSource.COMMANDLINE:
        cli_values["db"] = str(db_path)
    if extra_set:
        cli_values["set"] = extra_set
    try:
        settings = resolve(cli_values, os.environ, config_path)
    except ConfigError as e:
        raise click.ClickException(f"invalid setting: {e}") from None
    db = settings.db or str(default_db_path())
    if not dry_run:
        problem = unavailable(event_loop)
        if problem:
            raise click.ClickException(problem)
        refuse_readonly(Path(db))  # the sidecar writes every request to it
        db_dir = os.path.dirname(os.path.abspath(db))
        try:
            os.makedirs(db_dir, exist_ok=True)
        except OSError as e:
            raise click.ClickException(
                f"spendtap_db {db}: cannot create {db_dir}: {e.strerror}"
            ) from None
        # Open (create, migrate) the ledger here, so a corrupt or foreign file is one
        # clear line rather than a traceback from inside mitmdump.
        try:
            Ledger(db).close()
        except (OSError, StorageError) as e:  # the system's own words: say where
            raise click.ClickException(f"cannot use the ledger {db}: {e}") from None
        except LedgerError as e:
            raise click.ClickException(str(e)) from None
        if settings.prices:
            try:
                PriceFile.load(settings.prices)
            except PriceFileError as e:
                raise click.ClickException(f"spendtap_prices: {e}") from None
        # Credential files the addon reads at start: unreadable is one line here.
        for name in ("spendtap_gateway_secret_file", "spendtap_upstream_key_file"):
            if settings.set.get(name):
                try:
                    read_secret_file(settings.set[name], name)
                except ValueError as e:
                    raise click.ClickException(str(e)) from None
    args = build_mitmdump_args(
        mode=settings.mode,
        upstream=settings.upstream,
        listen=settings.listen,
        db=db,
        metrics=settings.metrics,
        node=settings.node,
        metrics_prefix=settings.metrics_prefix,
        access_log=settings.access_log,
        prices=settings.prices,
        trusted_peers=settings.trusted_peers,
        extra_set=settings.set_items(),
        verbose=verbose,
        runner=runner,
        event_loop=event_loop,
    )
    if dry_run:
        env_prefix = ""
        if settings.central:
            env_prefix = f"{ENV_CENTRAL}={_quote(redact_url(settings.central))} "
        click.echo(env_prefix + " ".join(_quote(a) for a in redact(args)))
        return
    if settings.central:
        _check_central(settings.central)
        # In mitmdump's environment, not its arguments: other users can read argv.
        os.environ[ENV_CENTRAL] = settings.central
    else:
        os.environ.pop(ENV_CENTRAL, None)  # the addon would otherwise read it
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(args[0], args)


def _check_central(dsn: str) -> None:
    """Someone else's database or a refused login fails here; unreachable only warns
    (rows wait in the local ledger, budgeted requests get 503 until it is back)."""
    from spendtap.store.central import CentralError, CentralStore, NotCentral

    try:
        CentralStore(dsn, timeout_s=3).close()
    except NotCentral as e:
        raise click.ClickException(str(e)) from None
    except CentralError as e:
        if "authentication failed" in str(e) or "does not exist" in str(e):
            raise click.ClickException(str(e)) from None
        click.echo(f"warning: {e}; starting anyway", err=True)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@click.command("addon-path")
def addon_path_command():
    """Print the path of the addon script, for ``mitmdump -s``.

    \b
    Examples:
        mitmdump -s "$(spendtap addon-path)" --mode reverse:http://127.0.0.1:8000
    """
    click.echo(addon_path())
