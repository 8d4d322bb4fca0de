"""Ranges for every numeric option, checked by click's own types where click parses them.

A value that is not a number, or out of range, is click's usage error: the usage,
then one ``Error: Invalid value for '--opt': ...`` line naming the option and the
range, exit 2; never a traceback from SQLite or the OS further down
(``OverflowError: Python int too large to convert to SQLite INTEGER``).
"""

from __future__ import annotations

import math
from typing import Any

import click

# Token and row counts: exact in a JSON number and in a float, and far below
# SQLite's INTEGER limit even when a cap, its spend and reservations add up.
MAX_COUNT = 2**53 - 1
MAX_SECONDS = 366 * 86400.0


class FiniteRange(click.FloatRange):
    """A ``click.FloatRange`` that also refuses nan (which every range comparison passes)
    and inf."""

    name = "number"  # the help's metavar: NUMBER, as before ranges were click's

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def count(lo: int = 0, hi: int = MAX_COUNT) -> click.IntRange:
    """A whole number from ``lo`` to ``hi``."""
    whole = click.IntRange(min=lo, max=hi)
    whole.name = "integer"  # the help's metavar: INTEGER, not INTEGER RANGE
    return whole


def seconds(lo: float = 0.0, hi: float = MAX_SECONDS, lo_open: bool = False) -> FiniteRange:
    """A finite number of seconds from ``lo`` (excluded with ``lo_open``) to ``hi``."""
    return FiniteRange(min=lo, max=hi, min_open=lo_open)


def bad_value(name: str, message: str) -> click.BadParameter:
    """Click's usage error (exit 2) for the option ``name`` of the running command, for a
    value its body checks (one parsed against a shared ``now``, a money amount): the same
    ``Invalid value for '--opt': ...`` line a click type gives."""
    ctx = click.get_current_context()
    param = next(p for p in ctx.command.params if p.name == name)
    return click.BadParameter(message, ctx=ctx, param=param)
