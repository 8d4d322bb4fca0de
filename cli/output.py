"""The one output option and writer every listing command uses.

``@output_options`` adds ``-f/--format table|json|jsonl|csv`` (passed as
``fmt``); ``write_rows(rows, fmt, columns, ...)`` prints an iterable of dicts:

- ``table``: aligned columns under a header and a rule; numbers right-aligned,
  floats with three decimals, ``None`` as ``-`` (or a per-column label)
- ``json``: one array, streamed a row per line, ``[]`` when there are no rows
- ``jsonl``: one object per line
- ``csv``: a header line, then one line per row; ``None`` is empty

Only ``table`` waits for every row (to size the columns); the others stream.
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import click

FORMATS = ("table", "json", "jsonl", "csv")


def output_options[F: Callable](fn: F) -> F:
    """Add ``-f/--format`` to a command; the value arrives as ``fmt``."""
    return click.option(
        "-f",
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="Output format: an aligned table, a JSON array, JSON lines or CSV.",
    )(fn)


# A marker no ledger text can guess (random per process), replaced after encoding.
_DECIMAL_MARK = f"decimal-{secrets.token_hex(8)}:"


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _DECIMAL_MARK + format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(obj: Mapping[str, Any]) -> str:
    """One JSON object; a ``Decimal`` (money) is written as an exact JSON number in
    fixed-point notation (``0.010035000``), never through a float."""
    text = json.dumps(obj, default=_json_default)
    if _DECIMAL_MARK not in text:
        return text
    return re.sub(f'"{_DECIMAL_MARK}(-?[0-9.]+)"', r"\1", text)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return value


def format_cell(value: Any, null: str = "-") -> str:
    """One value as table text: ``null`` for None, yes/no, 3 decimals, exact money."""
    if value is None:
        return null
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    null: Mapping[str, str] | None = None,
) -> str:
    """Render rows as aligned text: ``columns`` are (key, header) pairs."""
    null = null or {}
    keys = [k for k, _ in columns]
    headers = [h for _, h in columns]
    numeric = [
        any(_is_number(r.get(k)) for r in rows)
        and all(r.get(k) is None or _is_number(r.get(k)) for r in rows)
        for k in keys
    ]
    body = [[format_cell(r.get(k), null.get(k, "-")) for k in keys] for r in rows]
    widths = [max([len(h), *(len(line[i]) for line in body)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(cells) for cells in body)
    return "\n".join(out)


def write_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: str,
    columns: Sequence[str],
    *,
    table_columns: Sequence[tuple[str, str]] | None = None,
    null: Mapping[str, str] | None = None,
) -> None:
    """Print ``rows`` in ``fmt``, keys ``columns`` in that order.

    ``table_columns`` (key, header) pairs choose and name the table's columns
    (all of ``columns`` by default); ``null`` maps a key to the text a table
    shows for its ``None`` (``-`` by default).
    """
    if fmt == "table":
        cols = table_columns or [(c, c) for c in columns]
        click.echo(format_table(list(rows), cols, null))
    elif fmt == "json":
        first = True
        for row in rows:
            obj = {c: row.get(c) for c in columns}
            click.echo(("[" if first else ",\n ") + to_json(obj), nl=False)
            first = False
        click.echo("[]" if first else "]")
    elif fmt == "jsonl":
        for row in rows:
            click.echo(to_json({c: row.get(c) for c in columns}))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")

        def emit(values: Sequence[Any]) -> None:
            writer.writerow(values)
            click.echo(buffer.getvalue(), nl=False)
            buffer.seek(0)
            buffer.truncate()

        emit(columns)
        for row in rows:
            emit([_csv_value(row.get(c)) for c in columns])
    else:
        raise ValueError(f"unknown output format {fmt!r}")
