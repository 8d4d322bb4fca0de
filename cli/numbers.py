"""Ranges for every numeric option, checked where click parses them.

A value that is not a number, or out of range, is one ``Error:`` line naming
the option and the range, exit 1, like every other error of this CLI; never a
traceback from SQLite or the OS further down (``OverflowError: Python int too
large to convert to SQLite INTEGER``).
"""

from __future__ import annotations

import math
from typing import Any

import click

# Token and row counts: exact in a JSON number and in a float, and far below
# SQLite's INTEGER limit even when a cap, its spend and reservations add up.
MAX_COUNT = 2**53 - 1
MAX_SECONDS = 366 * 86400.0


class Count(click.IntRange):
    """A whole number in a range."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            raise click.ClickException(e.format_message()) from None


class Number(click.FloatRange):
    """A finite number in a range; nan and inf are refused."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = super().convert(value, param, ctx)
            if not math.isfinite(number):
                self.fail(f"{value!r} is not a finite number.", param, ctx)
            return number
        except click.BadParameter as e:
            raise click.ClickException(e.format_message()) from None


def count(lo: int = 0, hi: int = MAX_COUNT) -> Count:
    return Count(min=lo, max=hi)


def seconds(lo: float = 0.0, hi: float = MAX_SECONDS, lo_open: bool = False) -> Number:
    return Number(min=lo, max=hi, min_open=lo_open)
