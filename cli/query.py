"""Commands that read the ledger: ``spendtap requests`` and ``spendtap report``."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from spendtap.cli.chart import draw_report_chart
from spendtap.cli.numbers import bad_value, count
from spendtap.cli.output import output_options, write_rows
from spendtap.cli.paths import db_option, open_ledger
from spendtap.store.ledger import OUTCOMES, REPORT_BY, REPORT_SORT, ROW_FIELDS, LedgerError
from spendtap.timeparse import format_ts, parse_when

REPORT_FIGURES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "total_tokens",
    "errors",
    "refused",
    "usage_missing",
    "avg_ttft_s",
    "avg_tokens_per_s",
    "cost_usd",
    "avg_cost_usd",
    "unpriced",
)

# The table shows the figures people scan for; json/jsonl/csv carry every column.
REQUESTS_TABLE = (
    ("ts", "ts"),
    ("account", "account"),
    ("key", "key"),
    ("model", "model"),
    ("node", "node"),
    ("status", "status"),
    ("outcome", "outcome"),
    ("prompt_tokens", "prompt"),
    ("completion_tokens", "completion"),
    ("cached_tokens", "cached"),
    ("reasoning_tokens", "reasoning"),
    ("usage_source", "usage"),
    ("ttft_s", "ttft_s"),
    ("duration_s", "duration_s"),
    ("tokens_per_s", "tok/s"),
)

REPORT_TABLE_HEADERS = {
    "prompt_tokens": "prompt",
    "completion_tokens": "completion",
    "cached_tokens": "cached",
    "cache_creation_tokens": "cache_write",
    "reasoning_tokens": "reasoning",
    "total_tokens": "total",
    "usage_missing": "no_usage",
    "avg_tokens_per_s": "avg_tok/s",
}


def time_options(command):
    """``--since`` and ``--until``, parsed by ``time_range`` against one ``now`` before the
    command runs: it gets them as ledger timestamps (or None)."""

    @functools.wraps(command)
    def parsed(*args: Any, since: str | None, until: str | None, **kwargs: Any) -> Any:
        since, until = time_range(since, until)
        return command(*args, since=since, until=until, **kwargs)

    fn = parsed
    fn = click.option(
        "--until",
        metavar="WHEN",
        help="Only requests that started before this time: 15m, 24h, 7d ago or ISO 8601.",
    )(fn)
    fn = click.option(
        "--since",
        metavar="WHEN",
        help="Only requests that started at or after this time: 15m, 24h, 7d ago or ISO 8601.",
    )(fn)
    return fn


REFUSED = "refused"  # report's column name for the ledger's outcome "rejected"


def _outcome(_ctx, _param, value: str | None) -> str | None:
    return "rejected" if value == REFUSED else value


FILTERS = ("account", "key", "model", "node")


def filter_options(outcome: bool):
    """The row filters every ledger command shares: --account, --key, --model, --node
    (and --outcome where it makes sense), passed to the command as one ``filters`` dict
    of those given, ready for the ledger's ``requests``, ``count`` and ``report``."""
    names = (*FILTERS, "outcome") if outcome else FILTERS

    def decorate(command):
        @functools.wraps(command)
        def collected(*args: Any, **kwargs: Any) -> Any:
            chosen = {n: v for n in names if (v := kwargs.pop(n)) is not None}
            return command(*args, filters=chosen, **kwargs)

        fn = collected
        if outcome:
            fn = click.option(
                "--outcome",
                type=click.Choice((*OUTCOMES, REFUSED)),
                callback=_outcome,
                help="Only requests with this outcome; refused is the same as rejected "
                "(answered by spendtap itself: budget, auth or ledger refusals).",
            )(fn)
        fn = click.option("--node", help="Only this node (upstream).")(fn)
        fn = click.option("--model", help="Only this model.")(fn)
        fn = click.option("--key", help="Only this key.")(fn)
        return click.option("--account", help="Only this account.")(fn)

    return decorate


def time_range(since: str | None, until: str | None) -> tuple[str | None, str | None]:
    """Parse ``--since``/``--until`` against one ``now``; a usage error on bad input."""
    now = datetime.now(UTC)
    bounds: dict[str, str | None] = {}
    for name, text in (("since", since), ("until", until)):
        if text is None:
            bounds[name] = None
            continue
        try:
            bounds[name] = format_ts(parse_when(text, now))
        except ValueError as e:
            raise bad_value(name, str(e)) from None
    start, end = bounds["since"], bounds["until"]
    if start is not None and end is not None and end <= start:
        raise click.UsageError(f"--until ({end}) must be later than --since ({start})")
    return start, end


def _rows_or_fail(rows: Iterator[dict]) -> Iterator[dict]:
    try:
        yield from rows
    except LedgerError as e:
        raise click.ClickException(f"cannot read the ledger: {e}") from None


@click.command(name="requests")
@time_options
@filter_options(outcome=True)
@click.option(
    "--limit",
    type=count(),
    default=100,
    show_default=True,
    help="At most this many rows, newest first; 0 for all.",
)
@db_option
@output_options
def requests_command(
    since: str | None,
    until: str | None,
    filters: dict[str, str],
    limit: int,
    db_path: Path,
    fmt: str,
) -> None:
    """Show metered requests, one row each, newest first.

    The table shows the main figures; json, jsonl and csv carry every column.

    \b
    Examples:
        spendtap requests --since 15m
        spendtap requests --account acme --outcome upstream_error
        spendtap requests --since 1h --outcome refused
        spendtap requests --since 2025-01-01 --until 2025-02-01 --limit 0 -f csv > jan.csv
    """
    ledger = open_ledger(db_path)
    try:
        rows = ledger.requests(since=since, until=until, limit=limit or None, **filters)
        write_rows(_rows_or_fail(rows), fmt, ROW_FIELDS, table_columns=REQUESTS_TABLE)
    except LedgerError as e:
        raise click.ClickException(f"cannot read the ledger: {e}") from None
    finally:
        ledger.close()


@click.command(name="report")
@click.option(
    "--by",
    type=click.Choice(REPORT_BY),
    default="account",
    show_default=True,
    help="Group totals by a row field (account, key, model, node, api, path, outcome, "
    "price_source), UTC day or UTC hour.",
)
@click.option(
    "--sort",
    type=click.Choice(REPORT_SORT),
    default=None,
    help="Order groups by tokens, cost or requests, most first [default: tokens; "
    "days and hours in time order].",
)
@click.option(
    "--metric",
    type=click.Choice(("tokens", "cost")),
    default="tokens",
    show_default=True,
    help="What --chart draws: tokens, or spend in dollars.",
)
@time_options
@filter_options(outcome=False)
@click.option(
    "--chart",
    is_flag=True,
    help="Draw tokens over time per account, key, model or node (--by) as sparklines.",
)
@click.option("--ascii", "ascii_only", is_flag=True, help="Draw the chart in plain ASCII.")
@db_option
@output_options
def report_command(
    by: str,
    sort: str | None,
    metric: str,
    since: str | None,
    until: str | None,
    filters: dict[str, str],
    chart: bool,
    ascii_only: bool,
    db_path: Path,
    fmt: str,
) -> None:
    """Show usage and cost totals per account, key, model, node, day or hour.

    Each group has its requests, token sums, errors (upstream errors and
    client disconnects), refused (requests spendtap answered itself: budget,
    auth and ledger refusals, and an SDK's retries of them), no_usage (served
    requests that carry no usage: a metering gap), average latency, and its
    cost in dollars (cost_usd, the exact sum of its priced requests; unpriced
    counts requests with usage whose model has no known price).
    A token total is empty (null) when no request in the group reported that
    figure; total = prompt + completion. Requests without an account or key
    show as (anonymous). Groups are ordered by total tokens, days and hours
    in time order.

    \b
    Examples:
        spendtap report --by account --since 24h
        spendtap report --by model --since 7d -f json
        spendtap report --by day --since 2025-01-01 --account acme
        spendtap report --chart --by key --since 7d
        spendtap report --by key --sort cost --since 30d
        spendtap report --chart --metric cost --by account --since 7d
    """
    if chart:
        draw_report_chart(
            db_path, by, fmt, since, until, filters, ascii_only=ascii_only, metric=metric
        )
        return
    if metric != "tokens":
        raise click.UsageError("--metric only applies to --chart")
    if ascii_only:
        raise click.UsageError("--ascii only applies to --chart")
    ledger = open_ledger(db_path)
    try:
        rows = ledger.report(by, since=since, until=until, sort=sort, **filters)
    except LedgerError as e:
        raise click.ClickException(f"cannot read the ledger: {e}") from None
    finally:
        ledger.close()
    columns = (by, *REPORT_FIGURES)
    # The table leaves out the average cost (json/jsonl/csv carry every figure).
    table_columns = [(c, REPORT_TABLE_HEADERS.get(c, c)) for c in columns if c != "avg_cost_usd"]
    null = {by: "(anonymous)"} if by in ("account", "key") else None
    write_rows(rows, fmt, columns, table_columns=table_columns, null=null)
