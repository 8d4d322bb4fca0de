"""``spendtap export``: stream a time range of ledger rows for a warehouse."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from spendtap.cli.output import write_rows
from spendtap.cli.paths import db_option, open_ledger
from spendtap.cli.query import filter_options, time_options
from spendtap.store.ledger import ROW_FIELDS, LedgerError

# Below this many rows an export is quick: no progress bar.
PROGRESS_MIN_ROWS = 10_000
_PROGRESS_STEP = 1000


def _with_progress(rows: Iterator[dict[str, Any]], total: int) -> Iterator[dict[str, Any]]:
    """Pass rows through, drawing a progress bar on stderr."""
    with click.progressbar(length=total, label="exporting", file=sys.stderr, show_pos=True) as bar:
        pending = 0
        for row in rows:
            yield row
            pending += 1
            if pending == _PROGRESS_STEP:
                bar.update(pending)
                pending = 0
        bar.update(pending)


@click.command(name="export")
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(("jsonl", "csv")),
    default="jsonl",
    show_default=True,
    help="JSON lines or CSV with a header line; every column of every row.",
)
@time_options
@filter_options(outcome=True)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Draw a progress bar on stderr. Default: when stderr is a terminal, stdout is "
    f"not, and there are over {PROGRESS_MIN_ROWS} rows.",
)
@db_option
def export_command(
    fmt: str,
    since: str | None,
    until: str | None,
    filters: dict[str, str],
    progress: bool | None,
    db_path: Path,
) -> None:
    """Stream ledger rows, oldest first, as JSON lines or CSV.

    Rows are read and written one at a time, so any range exports in constant
    memory. Use --since/--until for a time range (since inclusive, until
    exclusive), so consecutive exports neither overlap nor miss a row.

    \b
    Examples:
        spendtap export --since 2025-01-01 --until 2025-02-01 > jan.jsonl
        spendtap export -f csv --since 24h --account acme > acme.csv
    """
    ledger = open_ledger(db_path)
    try:
        rows: Iterator[dict[str, Any]] = ledger.requests(
            since=since, until=until, order="asc", **filters
        )
        if progress is None:
            progress = sys.stderr.isatty() and not sys.stdout.isatty()
            total = ledger.count(since=since, until=until, **filters) if progress else 0
            progress = progress and total > PROGRESS_MIN_ROWS
        elif progress:
            total = ledger.count(since=since, until=until, **filters)
        if progress:
            rows = _with_progress(rows, total)
        write_rows(rows, fmt, ROW_FIELDS)
    except LedgerError as e:
        raise click.ClickException(f"cannot read the ledger: {e}") from None
    finally:
        ledger.close()
