"""``spendtap run`` and ``spendtap addon-path``: start the sidecar (mitmdump with the addon)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import click
from spendtap.address import parse_listen
from spendtap.cli.paths import db_option

MODES = ("reverse", "regular", "upstream", "transparent")
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
    extra_set: tuple[str, ...] = (),
    verbose: bool = False,
) -> list[str]:
    """The mitmdump command line ``spendtap run`` executes (pure, for tests and --dry-run)."""
    host, port = parse_listen(listen)
    if mode in ("reverse", "upstream"):
        if not upstream:
            raise click.UsageError(f"--upstream is required in {mode} mode")
        mode_arg = f"{mode}:{_check_upstream(upstream)}"
    else:
        if upstream:
            raise click.UsageError(f"--upstream makes no sense in {mode} mode")
        mode_arg = mode
    args = [
        *_mitmdump_command(),
        "--mode",
        mode_arg,
        "--listen-host",
        host,
        "--listen-port",
        str(port),
        "-s",
        addon_path(),
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
        # Printing every flow costs CPU on the hot path; spendtap logs what matters.
        "--set",
        "flow_detail=0" if not verbose else "flow_detail=1",
    ]
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
    for item in extra_set:
        args += ["--set", item]
    return args


@click.command()
@click.option(
    "--upstream", metavar="URL", help="Inference server to front (reverse/upstream modes)."
)
@click.option(
    "--listen",
    default="127.0.0.1:8080",
    show_default=True,
    metavar="HOST:PORT",
    help="Where clients connect.",
)
@db_option
@click.option(
    "--metrics",
    default="127.0.0.1:9464",
    show_default=True,
    metavar="HOST:PORT",
    help="Prometheus /metrics and /healthz address; empty string disables.",
)
@click.option(
    "--mode", type=click.Choice(MODES), default="reverse", show_default=True, help="mitmproxy mode."
)
@click.option("--node", help="Node label for metrics and rows (default: upstream host:port).")
@click.option("--metrics-prefix", help="Metric name prefix (default: cortex).")
@click.option(
    "--access-log", type=click.Path(dir_okay=False), help="Write a JSONL access log here."
)
@click.option(
    "--set",
    "extra_set",
    multiple=True,
    metavar="OPTION=VALUE",
    help="Any other mitmproxy or spendtap option (repeatable).",
)
@click.option("-v", "--verbose", is_flag=True, help="Let mitmdump print every flow.")
@click.option("--dry-run", is_flag=True, help="Print the mitmdump command instead of running it.")
def run(
    upstream,
    listen,
    db_path,
    metrics,
    mode,
    node,
    metrics_prefix,
    access_log,
    extra_set,
    verbose,
    dry_run,
):
    """Run the sidecar: mitmdump with the spendtap addon.

    The process becomes mitmdump (exec), so SIGTERM and SIGINT reach it
    directly and no child is left behind.

    \b
    Example:
        spendtap run --upstream http://127.0.0.1:8000 --listen 0.0.0.0:8080 \\
            --db /var/lib/spendtap/ledger.db --metrics 127.0.0.1:9464
    """
    try:
        parse_listen(listen)
        if metrics:
            parse_listen(metrics)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    db = str(db_path)
    db_dir = os.path.dirname(os.path.abspath(db))
    if not dry_run:
        os.makedirs(db_dir, exist_ok=True)
    args = build_mitmdump_args(
        mode=mode,
        upstream=upstream,
        listen=listen,
        db=db,
        metrics=metrics,
        node=node,
        metrics_prefix=metrics_prefix,
        access_log=access_log,
        extra_set=extra_set,
        verbose=verbose,
    )
    if dry_run:
        click.echo(" ".join(_quote(a) for a in args))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(args[0], args)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@click.command("addon-path")
def addon_path_command():
    """Print the path of the addon script, for ``mitmdump -s``.

    \b
    Example:
        mitmdump -s "$(spendtap addon-path)" --mode reverse:http://127.0.0.1:8000
    """
    click.echo(addon_path())
