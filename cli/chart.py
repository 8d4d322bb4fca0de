"""Spend over time per principal, drawn as terminal sparklines (``report --chart``).

Pure rendering: ``render_chart`` takes the per-group, per-bucket token sums of
``Ledger.spend_series`` and returns text lines. One line per group (the
heaviest first, the rest folded into ``(other)``), one character per time
bucket, all on one scale so groups compare at a glance; any spend at all shows
at least the lowest mark, and no spend is a blank. Unicode block elements by
default, plain ASCII when the terminal cannot draw them.

``draw_report_chart`` is the ``report --chart`` command's body: it reads the
series from the ledger, picks the bucket size and prints.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from spendtap.cli.paths import open_ledger
from spendtap.store.budgets import format_window
from spendtap.store.ledger import LedgerError
from spendtap.timeparse import parse_datetime, ts_from_epoch

BLOCKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
ASCII_LEVELS = ".:-=+*#@"
BUCKETS_S = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)
MAX_BUCKETS = 60


def choose_bucket(span_s: float, max_buckets: int = MAX_BUCKETS) -> int:
    """The smallest bucket size from ``BUCKETS_S`` that draws ``span_s`` in ``max_buckets``."""
    for size in BUCKETS_S:
        if math.ceil(max(span_s, 1) / size) <= max_buckets:
            return size
    return BUCKETS_S[-1]


def can_draw_unicode(encoding: str | None) -> bool:
    """Whether text in ``encoding`` can carry the block characters."""
    try:
        BLOCKS.encode(encoding or "ascii")
    except (LookupError, UnicodeEncodeError):
        return False
    return True


def _mark(value: int, peak: int, levels: str) -> str:
    if value <= 0 or peak <= 0:
        return " "
    index = math.ceil(value / peak * len(levels)) - 1
    return levels[max(0, min(len(levels) - 1, index))]


def _fmt_tokens(n: int) -> str:
    return f"{n:,}"


def _fmt_usd(nusd: int) -> str:
    # Whole nano-dollars, shown to the cent above a dollar, to six places below.
    dollars = nusd / 10**9
    return f"${dollars:,.2f}" if dollars >= 1 else f"${dollars:.6f}"


def render_chart(
    series: Iterable[Mapping[str, Any]],
    by: str,
    start: float,
    end: float,
    bucket_s: int,
    *,
    ascii_only: bool = False,
    top: int = 10,
    null_label: str = "(anonymous)",
    metric: str = "tokens",
) -> list[str]:
    """Text lines of a spend chart.

    ``series`` rows have the group under ``by``, ``bucket`` (Unix start of the
    bucket), ``value`` (tokens, or nano-dollars with ``metric="cost"``) and
    optionally ``refused`` (requests spendtap refused: they spend nothing, so
    they are counted beside the line, never drawn as spend). The chart spans
    buckets from ``start`` to ``end``.
    """
    fmt_value = _fmt_usd if metric == "cost" else _fmt_tokens
    levels = ASCII_LEVELS if ascii_only else BLOCKS
    first = int(start) // bucket_s * bucket_s
    count = max(1, math.ceil((end - first) / bucket_s))
    groups: dict[str, list[int]] = {}
    refused: dict[str, int] = {}
    for row in series:
        label = row[by] if row[by] is not None else null_label
        index = (int(row["bucket"]) - first) // bucket_s
        if 0 <= index < count:
            groups.setdefault(label, [0] * count)[index] += int(row["value"])
            refused[label] = refused.get(label, 0) + int(row.get("refused") or 0)
    totals = sorted(groups.items(), key=lambda item: (-sum(item[1]), item[0]))
    shown = totals[:top]
    if len(totals) > top:
        other = [0] * count
        for _label, values in totals[top:]:
            other = [a + b for a, b in zip(other, values, strict=True)]
        other_label = f"(other {len(totals) - top})"
        refused[other_label] = sum(refused.get(label, 0) for label, _v in totals[top:])
        shown.append((other_label, other))
    title = (
        f"{'spend in dollars' if metric == 'cost' else 'tokens'} per {by}, "
        f"one mark per {format_window(bucket_s)}, "
        f"{ts_from_epoch(first)[:16]}Z to {ts_from_epoch(first + count * bucket_s)[:16]}Z"
    )
    if not shown:
        return [title, "(no spend in this range)"]
    peak = max(max(values) for _label, values in shown)
    width = min(24, max(len(label) for label, _values in shown))
    lines = [title]
    for label, values in shown:
        name = label if len(label) <= width else label[: width - 1] + "~"
        spark = "".join(_mark(v, peak, levels) for v in values)
        line = f"{name.ljust(width)}  |{spark}|  {fmt_value(sum(values))}"
        if refused.get(label):
            line += f"  ({refused[label]:,} refused)"
        lines.append(line)
    unit = "" if metric == "cost" else " tokens"
    lines.append(f"{'':{width}}   scale: full mark = {fmt_value(peak)}{unit}")
    return lines


def draw_report_chart(
    db_path: Path,
    by: str,
    fmt: str,
    since: str | None,
    until: str | None,
    filters: Mapping[str, str | None],
    *,
    ascii_only: bool = False,
    metric: str = "tokens",
) -> None:
    """Print the spend chart of ``report --chart``; a usage error on bad options."""
    if fmt != "table":
        raise click.UsageError("--chart draws on the terminal; it does not take --format")
    if by not in ("account", "key", "model", "node"):
        raise click.UsageError("--chart draws per account, key, model or node, not per " + by)
    if not ascii_only:
        ascii_only = not can_draw_unicode(sys.stdout.encoding)
    chosen = filters  # only those given (query.filter_options)
    ledger = open_ledger(db_path)
    try:
        if since is not None:
            start = parse_datetime(since).timestamp()
            end = parse_datetime(until).timestamp() if until is not None else time.time()
        else:
            span = ledger.time_span(until=until, **chosen)
            if span is None:
                click.echo("(no requests in this range)")
                return
            start = parse_datetime(span[0]).timestamp()
            end = (
                parse_datetime(until).timestamp()
                if until is not None
                else parse_datetime(span[1]).timestamp() + 0.001
            )
        bucket_s = choose_bucket(end - start)
        series = ledger.spend_series(
            by, bucket_s, since=since, until=until, metric=metric, **chosen
        )
    except LedgerError as e:
        raise click.ClickException(f"cannot read the ledger: {e}") from None
    finally:
        ledger.close()
    lines = render_chart(series, by, start, end, bucket_s, ascii_only=ascii_only, metric=metric)
    for line in lines:
        click.echo(line)
