"""``spendtap prices`` and ``spendtap reprice``: which price applies, and costs recomputed.

Both use the same prices the sidecar uses: ``--prices FILE`` (else ``SPENDTAP_PRICES``,
else none), then the genai-prices catalogue shipped with spendtap.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

import click

from spendtap.cli.output import output_options, write_rows
from spendtap.cli.paths import db_option, open_ledger
from spendtap.cli.query import time_range
from spendtap.pricing import PriceFileError, Pricer
from spendtap.store.ledger import NANO, LedgerError, usd

BATCH = 2000


def prices_option(fn):
    return click.option(
        "--prices",
        "prices_path",
        type=click.Path(dir_okay=False),
        envvar="SPENDTAP_PRICES",
        show_envvar=True,
        help="The operator's TOML price file (overrides the catalogue).",
    )(fn)


def load_pricer(path: str | None) -> Pricer:
    try:
        return Pricer.from_path(path)
    except PriceFileError as e:
        raise click.ClickException(str(e)) from None


@click.command(name="prices")
@click.argument("model", required=False)
@click.option("--provider", help="Catalogue provider id (openai, anthropic, google, ...).")
@click.option("--check", is_flag=True, help="List models seen in the ledger that have no price.")
@prices_option
@db_option
@output_options
def prices_command(model, provider, check, prices_path, db_path: Path, fmt: str):
    """Show which price applies to MODEL and where it comes from.

    The price file (--prices, SPENDTAP_PRICES) wins over the genai-prices
    catalogue. With --check, every model in the ledger is looked up and those
    with no price are listed (their requests have no cost); exit status 1 when
    there are any.

    \b
    Examples:
        spendtap prices gpt-4o
        spendtap prices claude-sonnet-4-0 --provider anthropic
        spendtap prices qwen3-8b --prices /etc/spendtap/prices.toml
        spendtap prices --check --db /var/lib/spendtap/ledger.db
    """
    pricer = load_pricer(prices_path)
    if check:
        if model:
            raise click.UsageError("--check looks at every model in the ledger; give no MODEL")
        ledger = open_ledger(db_path)
        try:
            groups = ledger.report("model")
        except LedgerError as e:
            raise click.ClickException(f"cannot read the ledger: {e}") from None
        finally:
            ledger.close()
        missing = [
            {"model": g["model"], "requests": g["requests"], "tokens": g["total_tokens"]}
            for g in groups
            if g["model"] and g["total_tokens"]
            and pricer.lookup(g["model"], provider=provider)[0] == "none"
        ]  # fmt: skip
        write_rows(missing, fmt, ("model", "requests", "tokens"))
        if missing:
            raise SystemExit(1)
        return
    if not model:
        raise click.UsageError("give a MODEL, or --check")
    source, detail = pricer.lookup(model, provider=provider)
    write_rows([{"model": model, "price_source": source, "price": detail}], fmt,
               ("model", "price_source", "price"))  # fmt: skip
    if source == "none":
        raise SystemExit(1)


@click.command(name="reprice")
@click.option("--since", metavar="WHEN", help="Only requests that started at or after this time.")
@click.option("--until", metavar="WHEN", help="Only requests that started before this time.")
@click.option("--model", help="Only this model's requests.")
@prices_option
@db_option
def reprice_command(since, until, model, prices_path, db_path: Path):
    """Recompute the cost of stored requests from their token figures.

    After a price change (a new price file, a newer catalogue), each row's
    cost_usd and price_source are computed again at the price in force at the
    row's time, in batches of 2000 rows, each its own transaction. Running it
    twice changes nothing the second time. Prints how many rows changed and the
    total cost before and after.

    \b
    Examples:
        spendtap reprice --since 30d --prices /etc/spendtap/prices.toml
        spendtap reprice --model qwen3-8b
    """
    pricer = load_pricer(prices_path)
    start, end = time_range(since, until)
    ledger = open_ledger(db_path, write=True)
    before = after = Decimal(0)
    seen = changed = 0
    try:
        total = ledger.count(since=start, until=end, model=model)
        bar = click.progressbar(length=total, label="repricing", file=sys.stderr)
        show = sys.stderr.isatty()
        last = 0
        while True:
            page = ledger.requests(
                since=start, until=end, model=model, limit=BATCH,
                after_rowid=last, order="asc", include_rowid=True,
            )  # fmt: skip
            rows = list(page)
            if not rows:
                break
            last = rows[-1]["rowid"]
            updates = []
            for row in rows:
                before += row["cost_usd"] or 0
                pricer.apply(row)
                after += usd(row["cost_nusd"]) or 0
                updates.append((row["id"], row["cost_nusd"], row["price_source"]))
            changed += ledger.set_costs(updates)
            seen += len(rows)
            if show:
                bar.update(len(rows))
        if show:
            bar.render_finish()
    except LedgerError as e:
        raise click.ClickException(f"cannot reprice the ledger: {e}") from None
    finally:
        ledger.close()
    click.echo(
        f"repriced {seen} rows: {changed} changed; total cost "
        f"${format(before.quantize(NANO), 'f')} before, ${format(after.quantize(NANO), 'f')} after"
    )
