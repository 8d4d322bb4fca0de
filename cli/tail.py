"""``spendtap tail``: follow new ledger rows live, like ``tail -f``.

Polls the ledger by rowid (``Ledger.requests(after_rowid=...)``), so each poll
reads only the rows inserted since the last one, whatever the ledger's size.
json, jsonl and csv stream a row per line; the table prints its header once
and pads each row to fixed column widths (a long value widens only its row).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from spendtap.cli.numbers import count, seconds
from spendtap.cli.output import format_cell, output_options, write_rows
from spendtap.cli.paths import db_option, open_ledger
from spendtap.cli.query import REQUESTS_TABLE, filter_options
from spendtap.store.ledger import ROW_FIELDS, Ledger, LedgerError

# Table widths: wide enough for typical values, so most rows line up.
_WIDTHS = {
    "ts": 24,
    "account": 12,
    "key": 12,
    "model": 20,
    "node": 16,
    "status": 6,
    "outcome": 9,
    "prompt_tokens": 7,
    "completion_tokens": 10,
    "cached_tokens": 6,
    "reasoning_tokens": 9,
    "usage_source": 8,
    "ttft_s": 7,
    "duration_s": 10,
    "tokens_per_s": 8,
}
_NUMERIC = {
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "ttft_s",
    "duration_s",
    "tokens_per_s",
}


def _table_line(cells: list[tuple[str, str]]) -> str:
    parts = []
    for key, text in cells:
        width = max(_WIDTHS.get(key, 8), len(text))
        parts.append(text.rjust(width) if key in _NUMERIC else text.ljust(width))
    return "  ".join(parts).rstrip()


def follow(
    ledger: Ledger,
    filters: dict[str, Any],
    *,
    lines: int,
    interval_s: float,
    once: bool,
    max_rows: int | None,
    timeout_s: float | None,
    sleep=time.sleep,
    clock=time.monotonic,
) -> Iterator[dict[str, Any]]:
    """Yield the last ``lines`` matching rows, then every new one as it lands.

    Stops after one poll with ``once``, after ``max_rows`` rows, after
    ``timeout_s`` seconds, or on Ctrl-C (cleanly, so a JSON array is closed).
    """
    deadline = None if timeout_s is None else clock() + timeout_s
    emitted = 0

    def budget_left() -> bool:
        return max_rows is None or emitted < max_rows

    try:
        # SQLite: one snapshot for both reads (the central store has none).
        snapshot = getattr(ledger, "snapshot", contextlib.nullcontext)
        with snapshot():
            cursor = ledger.last_rowid()
            initial = []
            if lines > 0:
                initial = [
                    row
                    for row in ledger.requests(
                        after_rowid=0, order="desc", limit=lines, include_rowid=True, **filters
                    )
                    # Without a snapshot (the central store) a row may land in between.
                    if row["rowid"] <= cursor
                ]
        for row in reversed(initial):
            if not budget_left():
                return
            emitted += 1
            yield row
        while budget_left():
            if deadline is not None and clock() >= deadline:
                return
            # Read before the poll: rows that do not match the filters still move
            # the cursor, and a row landing during the poll is above this bound.
            bound = ledger.last_rowid()
            batch = ledger.requests(after_rowid=cursor, order="asc", include_rowid=True, **filters)
            for row in batch:
                cursor = max(cursor, row["rowid"])
                if not budget_left():
                    return
                emitted += 1
                yield row
            cursor = max(cursor, bound)
            if once:
                return
            wait = interval_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - clock()))
            sleep(wait)
    except KeyboardInterrupt:
        return


@click.command(name="tail")
@filter_options(outcome=True)
@click.option(
    "-n",
    "--lines",
    type=count(),
    default=10,
    show_default=True,
    help="Show this many of the latest rows first; 0 shows only new ones.",
)
@click.option(
    "--interval",
    type=seconds(0.01, 3600),
    default=0.5,
    show_default=True,
    help="Seconds between polls of the ledger.",
)
@click.option("--once", is_flag=True, help="Poll once, print what is there, and exit.")
@click.option("--max-rows", type=count(), help="Exit after printing this many rows.")
@click.option("--timeout", type=seconds(), help="Exit after this many seconds.")
@db_option
@output_options
def tail_command(
    filters: dict[str, str],
    lines: int,
    interval: float,
    once: bool,
    max_rows: int | None,
    timeout: float | None,
    db_path: Path,
    fmt: str,
) -> None:
    """Follow metered requests live, oldest first, like tail -f.

    Prints the latest rows, then each new row as it lands in the ledger, until
    Ctrl-C (or --once, --max-rows, --timeout). Filters and formats are those of
    `spendtap requests`; json is closed properly on exit.

    \b
    Examples:
        spendtap tail
        spendtap tail --account acme -n 0
        spendtap tail -f jsonl --outcome upstream_error | jq .
    """
    ledger = open_ledger(db_path)
    try:
        rows = follow(
            ledger,
            filters,
            lines=lines,
            interval_s=interval,
            once=once,
            max_rows=max_rows,
            timeout_s=timeout,
        )
        if fmt == "table":
            click.echo(_table_line([(k, h) for k, h in REQUESTS_TABLE]))
            for row in rows:
                click.echo(_table_line([(k, format_cell(row.get(k))) for k, _ in REQUESTS_TABLE]))
        else:
            write_rows(rows, fmt, ROW_FIELDS)
    except LedgerError as e:
        raise click.ClickException(f"cannot read the ledger: {e}") from None
    finally:
        ledger.close()
