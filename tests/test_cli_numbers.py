"""Every numeric CLI input has a range, checked by click's own types: a usage error
(the usage, then one ``Error:`` line naming the option and the range), exit 2.

Found by a new user: ``budget set --cap 99999999999999999999999`` was
``OverflowError: Python int too large to convert to SQLite INTEGER``.
"""

from __future__ import annotations

import subprocess

import click
import pytest

from spendtap.cli.main import cli
from spendtap.cli.numbers import FiniteRange
from spendtap.store.ledger import Ledger
from tests.helpers import SPENDTAP_MODULE, invoke, usage_error

HUGE = "99999999999999999999999"


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_numeric_option_has_a_range():
    """No command takes a bare int or float: each is a click IntRange or FloatRange with a
    top (a float one also refuses nan)."""
    bare = []
    for path, command in _commands(cli):
        for param in command.params:
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                ok = (
                    isinstance(param.type, (click.IntRange, FiniteRange))
                    and param.type.max is not None
                )
                if not ok:
                    bare.append(f"{' '.join(path)} {param.opts[0]}")
    assert not bare, f"numeric options without a range: {bare}"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["budget", "set", "--key", "k", "--cap", HUGE, "--window", "1h"], "--cap"),
        (["budget", "set", "--key", "k", "--cap", "-1", "--window", "balance"], "--cap"),
        (["budget", "set", "--key", "k", "--cap", "1e3", "--window", "balance"], "--cap"),
        (["requests", "--limit", HUGE], "--limit"),
        (["tail", "--once", "-n", HUGE], "--lines"),
        (["tail", "--once", "--interval", "nan"], "--interval"),
        (["tail", "--once", "--interval", "0"], "--interval"),
        (["tail", "--once", "--max-rows", "-3"], "--max-rows"),
        (["tail", "--once", "--timeout", "inf"], "--timeout"),
        (["doctor", "--metrics", "none", "--timeout", "nan"], "--timeout"),
        (["doctor", "--metrics", "none", "--timeout", "0"], "--timeout"),
        (["demo", "--requests", "0"], "--requests"),
        (["demo", "--ttft-ms", HUGE], "--ttft-ms"),
        (["simulate", "--tps", "nan"], "--tps"),
        (["simulate", "--tokens", HUGE], "--tokens"),
    ],
)
def test_out_of_range_is_a_usage_error(tmp_path, args, option):
    """Too large, negative, nan, inf or not a number: click's usage error, exit 2, its
    one Error line naming the option."""
    db = tmp_path / "ledger.db"
    Ledger(db).close()
    env = {"SPENDTAP_DB": str(db)}
    result = invoke(*args, env=env)
    assert usage_error(result).startswith("Error: Invalid value for '")
    assert option in result.output
    assert "Traceback" not in result.output


def test_huge_cap_through_the_installed_command(tmp_path):
    """The exact report: the real console script, a new ledger, no traceback."""
    db = tmp_path / "ledger.db"
    out = subprocess.run(
        [*SPENDTAP_MODULE, "budget", "set", "--key", "k",
         "--cap", HUGE, "--window", "1h", "--db", str(db)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.endswith(
        f"\nError: Invalid value for '--cap': {HUGE} is not in the range "
        "0<=x<=9223372036854775807.\n"
    )
    assert out.stderr.count("Error:") == 1
    assert "OverflowError" not in out.stderr + out.stdout


def test_largest_cap_is_accepted(tmp_path):
    """The top of the range works end to end (stored and shown exactly)."""
    db = tmp_path / "ledger.db"
    env = {"SPENDTAP_DB": str(db)}
    top = str(2**63 - 1)
    result = invoke("budget", "set", "--key", "k", "--cap", top, "--window", "balance", env=env)
    assert result.exit_code == 0, result.output
    shown = invoke("budget", "show", "--key", "k", "-f", "json", env=env)
    assert f'"cap": {top}' in shown.output
