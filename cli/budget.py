"""Budget commands: ``spendtap budget set|show|list|rm``, ``reservations`` and ``sweep``."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path

import click

from spendtap.cli.numbers import bad_value, count
from spendtap.cli.output import output_options, write_rows
from spendtap.cli.paths import db_option, open_store
from spendtap.store.backend import open_budget_store
from spendtap.store.budgets import (
    EPOCH_TS,
    MAX_CAP,
    TOKENS,
    USD,
    format_amount,
    owner_alive,
    parse_window,
)
from spendtap.timeparse import parse_datetime, parse_duration

STATUS_COLUMNS = (
    "scope",
    "principal",
    "unit",
    "cap",
    "window",
    "spent",
    "reserved",
    "remaining",
    "resets_at",
    "since",
    "updated_at",
)
STATUS_TABLE = (
    ("scope", "scope"),
    ("principal", "principal"),
    ("unit", "unit"),
    ("cap", "cap"),
    ("window", "window"),
    ("spent", "spent"),
    ("reserved", "reserved"),
    ("remaining", "remaining"),
    ("resets_at", "resets_at"),
)
RESERVATION_COLUMNS = ("id", "account", "key", "tokens", "usd", "created_at", "age_s", "owner")


def parse_usd(text: str) -> int:
    """``--cap-usd 50`` / ``0.25``: dollars to whole nano-dollars, or a one-line error."""
    try:
        dollars = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError(f"expected an amount in dollars, got {text!r}") from None
    if not dollars.is_finite() or dollars < 0:
        raise ValueError(f"expected an amount in dollars >= 0, got {text!r}")
    nusd = dollars.scaleb(9)
    if nusd != nusd.to_integral_value():
        raise ValueError(f"at most 9 decimal places (a nano-dollar), got {text!r}")
    if nusd > MAX_CAP:
        raise ValueError(f"at most {Decimal(MAX_CAP).scaleb(-9)} dollars, got {text!r}")
    return int(nusd)


def open_budgets(path: Path, *, create: bool = False, readonly: bool = False):
    """Budgets over the ledger at ``path``; any ledger error is one line and exit 1.

    ``readonly`` for commands that only read (they work on a read-only ledger).
    """
    return open_store(
        open_budget_store, path, create=create, readonly=readonly, user_errors=(ValueError,)
    )


def principal_options[F: Callable](fn: F) -> F:
    """``--key K`` / ``--account A`` (exactly one), passed as ``key`` and ``account``."""
    fn = click.option("--account", metavar="ACCOUNT", help="The account's budget.")(fn)
    fn = click.option("--key", metavar="KEY", help="The key's budget.")(fn)
    return fn


def which(key: str | None, account: str | None) -> tuple[str, str]:
    """(scope, principal) from ``--key``/``--account``; exactly one must be given."""
    if (key is None) == (account is None):
        raise click.UsageError("give exactly one of --key and --account")
    if key is not None:
        if not key:
            raise click.UsageError("--key must not be empty")
        return "key", key
    assert account is not None
    if not account:
        raise click.UsageError("--account must not be empty")
    return "account", account


@click.group(name="budget")
def budget_group() -> None:
    """Set, show, list and remove token and money budgets of keys and accounts.

    A budget caps the tokens (prompt + completion) a key or an account may
    spend (--cap), or what they cost in dollars (--cap-usd): a balance that
    never resets, or a rolling window. A principal may have one of each; a key
    is bound by its own budgets and its account's; the tightest wins. A
    request that would pass a cap is refused with HTTP 429 before it reaches
    the upstream; under a money cap, a model with no known price gets 403.

    \b
    Examples:
        spendtap budget set --key k-acme-1 --cap 100000 --window 1h
        spendtap budget set --key k-acme-1 --cap-usd 50 --window 1d
        spendtap budget set --account acme --cap 5000000 --window balance
        spendtap budget show --key k-acme-1
        spendtap budget list -f json
    """


@budget_group.command(name="set")
@principal_options
@click.option("--cap", type=count(0, MAX_CAP), metavar="TOKENS", help="The cap, in tokens.")
@click.option(
    "--cap-usd",
    metavar="DOLLARS",
    help="A money cap instead, in dollars (such as 50 or 0.25), on what requests cost.",
)
@click.option(
    "--window",
    required=True,
    metavar="WINDOW",
    help="balance (never resets) or a rolling window: 15m, 1h, 1d, 30d.",
)
@click.option(
    "--reset",
    is_flag=True,
    help="Start counting spend afresh from now (by default a change keeps what was spent).",
)
@db_option
def budget_set(
    key: str | None,
    account: str | None,
    cap: int | None,
    cap_usd: str | None,
    window: str,
    reset: bool,
    db_path: Path,
) -> None:
    """Create or change the budget of a key or an account.

    Changing a cap or window keeps the spend counted so far; --reset starts
    over. A new balance counts spend from now; a new rolling window counts
    the spend already in its window. Creates the ledger if there is none.

    \b
    Examples:
        spendtap budget set --key k-acme-1 --cap 100000 --window 1h
        spendtap budget set --account acme --cap 5000000 --window balance
        spendtap budget set --account acme --cap 5000000 --window balance --reset
        spendtap budget set --account acme --cap-usd 500 --window 30d
    """
    scope, principal = which(key, account)
    if (cap is None) == (cap_usd is None):
        raise click.UsageError("give exactly one of --cap (tokens) and --cap-usd (dollars)")
    if cap_usd is not None:
        try:
            amount, unit = parse_usd(cap_usd), USD
        except ValueError as e:
            raise bad_value("cap_usd", str(e)) from None
    else:
        assert cap is not None  # range-checked by its type (count)
        amount, unit = cap, TOKENS
    try:
        window_s = parse_window(window)
    except ValueError as e:
        raise bad_value("window", str(e)) from None
    with open_budgets(db_path, create=True) as budgets:
        budget = budgets.set(scope, principal, amount, window_s, reset=reset, unit=unit)
    if window_s is None:
        counting = f"balance, counting spend since {budget.since}"
    elif budget.since == EPOCH_TS:
        counting = f"per rolling {budget.window}"
    else:
        counting = f"per rolling {budget.window}, counting spend since {budget.since}"
    click.echo(f"{scope} {principal}: cap {format_amount(unit, amount)}, {counting}")


@budget_group.command(name="show")
@principal_options
@db_option
@output_options
def budget_show(key: str | None, account: str | None, db_path: Path, fmt: str) -> None:
    """Show the budgets of a key or account: cap, spent, reserved, remaining, resets.

    One line per budget (tokens, then dollars when it has a money cap too). For a
    rolling window, resets_at is when its oldest spend ages out.

    \b
    Examples:
        spendtap budget show --key k-acme-1
        spendtap budget show --account acme -f json
    """
    scope, principal = which(key, account)
    with open_budgets(db_path, readonly=True) as budgets:
        found = [budgets.status(scope, principal, unit=unit) for unit in (TOKENS, USD)]
    statuses = [s for s in found if s is not None]
    if not statuses:
        raise click.ClickException(f"no budget for {scope} {principal}")
    write_rows([s.as_dict() for s in statuses], fmt, STATUS_COLUMNS, table_columns=STATUS_TABLE)


@budget_group.command(name="list")
@db_option
@output_options
def budget_list(db_path: Path, fmt: str) -> None:
    """List every budget with its spent, reserved and remaining tokens.

    \b
    Examples:
        spendtap budget list
        spendtap budget list -f csv
    """
    with open_budgets(db_path, readonly=True) as budgets:
        rows = [s.as_dict() for s in budgets.statuses()]
    write_rows(rows, fmt, STATUS_COLUMNS, table_columns=STATUS_TABLE, null={"resets_at": "-"})


@budget_group.command(name="rm")
@principal_options
@click.option("--usd", is_flag=True, help="Remove the money cap (default: the token cap).")
@db_option
def budget_rm(key: str | None, account: str | None, usd: bool, db_path: Path) -> None:
    """Remove the budget of a key or an account (its spend history stays in the ledger).

    \b
    Examples:
        spendtap budget rm --key k-acme-1
        spendtap budget rm --key k-acme-1 --usd
    """
    scope, principal = which(key, account)
    unit = USD if usd else TOKENS
    with open_budgets(db_path) as budgets:
        removed = budgets.remove(scope, principal, unit)
    what = "money budget" if usd else "budget"
    if not removed:
        raise click.ClickException(f"no {what} for {scope} {principal}")
    click.echo(f"removed the {what} of {scope} {principal}")


@click.command(name="reservations")
@db_option
@output_options
def reservations_command(db_path: Path, fmt: str) -> None:
    """List open budget reservations (requests in flight), oldest first.

    A reservation lives from just before a budgeted request is sent until its
    ledger row lands; one that stays open belongs to a crashed sidecar or a
    lost request, and `spendtap sweep` releases it.

    \b
    Examples:
        spendtap reservations
        spendtap reservations -f jsonl
    """
    with open_budgets(db_path, readonly=True) as budgets:
        rows = budgets.reservations()
    now = time.time()
    for row in rows:
        row["age_s"] = round(now - parse_datetime(row["created_at"]).timestamp(), 3)
        row["usd"] = Decimal(row.pop("nusd") or 0).scaleb(-9).quantize(Decimal("1e-9"))
    write_rows(rows, fmt, RESERVATION_COLUMNS)


@click.command(name="sweep")
@click.option(
    "--older-than",
    metavar="DURATION",
    help="Also release reservations older than this (such as 1h), whoever holds them.",
)
@db_option
def sweep_command(older_than: str | None, db_path: Path) -> None:
    """Release stale budget reservations.

    Always releases reservations whose sidecar process is gone (same host,
    process no longer running). With --older-than, also those older than that,
    which covers sidecars on other hosts and lost requests of live ones; make
    it longer than your longest request.

    \b
    Examples:
        spendtap sweep
        spendtap sweep --older-than 1h
    """
    older_than_s = None
    if older_than is not None:
        try:
            older_than_s = parse_duration(older_than).total_seconds()
        except ValueError as e:
            raise bad_value("older_than", str(e)) from None
    with open_budgets(db_path) as budgets:
        released = budgets.sweep(owner_alive, older_than_s)
    click.echo(f"released {released} stale reservation{'s' if released != 1 else ''}")
