"""The ``spendtap`` command: a click group and the commands registered on it.

Commands live in modules by concern (``query.py`` reads the ledger); each is
registered below with ``cli.add_command``, so the full list is in one place.
"""

from __future__ import annotations

import click

from spendtap import __version__
from spendtap.cli.budget import budget_group, reservations_command, sweep_command
from spendtap.cli.demo import demo
from spendtap.cli.doctor import doctor
from spendtap.cli.export import export_command
from spendtap.cli.keys import keys_group
from spendtap.cli.prices import prices_command, reprice_command
from spendtap.cli.query import report_command, requests_command
from spendtap.cli.run import addon_path_command, run
from spendtap.cli.simulate import simulate
from spendtap.cli.tail import tail_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="spendtap")
def cli() -> None:
    """Meter LLM inference traffic: tokens, latency and spend per key.

    spendtap is a mitmproxy addon that sits between API clients and OpenAI- or
    Anthropic-compatible inference servers. It streams every response through
    untouched, records each request's token usage in a SQLite ledger and
    exports Prometheus metrics. These commands query that ledger.

    The ledger is $SPENDTAP_DB, else $XDG_DATA_HOME/spendtap/ledger.db, else
    ~/.local/share/spendtap/ledger.db; --db overrides it.

    \b
    Examples:
        spendtap report --by account --since 24h
        spendtap requests --since 15m --format jsonl
    """


cli.add_command(requests_command)
cli.add_command(tail_command)
cli.add_command(report_command)
cli.add_command(export_command)
cli.add_command(prices_command)
cli.add_command(reprice_command)
cli.add_command(budget_group)
cli.add_command(reservations_command)
cli.add_command(sweep_command)
cli.add_command(keys_group)
cli.add_command(run)
cli.add_command(addon_path_command)
cli.add_command(simulate)
cli.add_command(demo)
cli.add_command(doctor)


if __name__ == "__main__":
    cli()
