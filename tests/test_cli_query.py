"""The query CLI: exact output of `requests` and `report` in every format, errors, and help."""

from __future__ import annotations

import ast
import sqlite3
import textwrap
from pathlib import Path

import pytest
import sqlite_utils

from spendtap import __version__
from spendtap.cli.main import cli
from spendtap.cli.output import format_table
from spendtap.cli.paths import default_db_path
from spendtap.store.ledger import Ledger
from tests.helpers import invoke

ROWS = [
    {
        "id": "f1",
        "ts": "2025-01-30T23:59:59.999Z",
        "account": "acme",
        "key": "k-acme-1",
        "model": "gpt-4o",
        "node": "neuron-a:8000",
        "api": "openai-chat",
        "method": "POST",
        "path": "/v1/chat/completions",
        "streamed": True,
        "status": 200,
        "outcome": "completed",
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "cached_tokens": 1024,
        "usage_source": "reported",
        "ttft_s": 0.25,
        "duration_s": 3.5,
        "tokens_per_s": 92.31,
        "response_bytes": 4096,
    },
    {
        "id": "f2",
        "ts": "2025-01-31T00:10:00.000Z",
        "account": "acme",
        "key": "k-acme-2",
        "model": "claude-sonnet",
        "node": "neuron-b:8000",
        "api": "anthropic-messages",
        "method": "POST",
        "path": "/v1/messages",
        "streamed": False,
        "status": 200,
        "outcome": "completed",
        "prompt_tokens": 50,
        "completion_tokens": 20,
        "cache_creation_tokens": 10,
        "usage_source": "reported",
        "duration_s": 0.8,
        "tokens_per_s": 25.0,
        "response_bytes": 512,
    },
    {
        "id": "f3",
        "ts": "2025-01-31T01:00:00.000Z",
        "account": "beta",
        "key": "k-beta-1",
        "model": "gpt-4o",
        "node": "neuron-a:8000",
        "api": "openai-chat",
        "method": "POST",
        "path": "/v1/chat/completions",
        "streamed": True,
        "status": 502,
        "outcome": "upstream_error",
        "usage_source": "none",
        "duration_s": 0.012,
        "error": "connection refused",
        "response_bytes": 0,
    },
    {
        "id": "f4",
        "ts": "2025-01-31T01:30:00.000Z",
        "account": None,
        "key": None,
        "model": "gpt-4o",
        "node": "neuron-a:8000",
        "api": "openai-responses",
        "method": "POST",
        "path": "/v1/responses",
        "streamed": True,
        "status": 200,
        "outcome": "completed",
        "prompt_tokens": 40,
        "completion_tokens": 400,
        "reasoning_tokens": 256,
        "usage_source": "reported",
        "ttft_s": 1.5,
        "duration_s": 5.25,
        "tokens_per_s": 106.667,
        "response_bytes": 20000,
    },
]


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        ledger.insert_rows(ROWS)
    return path


def run(*args: str, env: dict | None = None):
    # Neither variable of the shell that runs pytest may choose the ledger a test reads.
    env = {"SPENDTAP_DB": None, "XDG_DATA_HOME": None} | (env or {})
    return invoke(*args, env=env, catch_exceptions=False)


REQUESTS_TABLE = """\
ts                        account  key       model          node           status  outcome         prompt  completion  cached  reasoning  usage     ttft_s  duration_s    tok/s
------------------------  -------  --------  -------------  -------------  ------  --------------  ------  ----------  ------  ---------  --------  ------  ----------  -------
2025-01-31T01:30:00.000Z  -        -         gpt-4o         neuron-a:8000     200  completed           40         400       -        256  reported   1.500       5.250  106.667
2025-01-31T01:00:00.000Z  beta     k-beta-1  gpt-4o         neuron-a:8000     502  upstream_error       -           -       -          -  none           -       0.012        -
2025-01-31T00:10:00.000Z  acme     k-acme-2  claude-sonnet  neuron-b:8000     200  completed           50          20       -          -  reported       -       0.800   25.000
2025-01-30T23:59:59.999Z  acme     k-acme-1  gpt-4o         neuron-a:8000     200  completed         1200         300    1024          -  reported   0.250       3.500   92.310
"""  # noqa: E501

F3_JSON = (
    '{"id": "f3", "ts": "2025-01-31T01:00:00.000Z", "account": "beta", "key": "k-beta-1", '
    '"model": "gpt-4o", "node": "neuron-a:8000", "api": "openai-chat", "method": "POST", '
    '"path": "/v1/chat/completions", "streamed": true, "status": 502, '
    '"outcome": "upstream_error", "prompt_tokens": null, "completion_tokens": null, '
    '"cached_tokens": null, "cache_creation_tokens": null, "reasoning_tokens": null, '
    '"usage_source": "none", "ttft_s": null, "duration_s": 0.012, "tokens_per_s": null, '
    '"error": "connection refused", "response_bytes": 0, "cost_usd": null, "price_source": null, '
    '"server_prompt_s": null, "server_decode_s": null}'
)
F2_JSON = (
    '{"id": "f2", "ts": "2025-01-31T00:10:00.000Z", "account": "acme", "key": "k-acme-2", '
    '"model": "claude-sonnet", "node": "neuron-b:8000", "api": "anthropic-messages", '
    '"method": "POST", "path": "/v1/messages", "streamed": false, "status": 200, '
    '"outcome": "completed", "prompt_tokens": 50, "completion_tokens": 20, '
    '"cached_tokens": null, "cache_creation_tokens": 10, "reasoning_tokens": null, '
    '"usage_source": "reported", "ttft_s": null, "duration_s": 0.8, "tokens_per_s": 25.0, '
    '"error": null, "response_bytes": 512, "cost_usd": null, "price_source": null, '
    '"server_prompt_s": null, "server_decode_s": null}'
)

CSV_HEADER = (
    "id,ts,account,key,model,node,api,method,path,streamed,status,outcome,prompt_tokens,"
    "completion_tokens,cached_tokens,cache_creation_tokens,reasoning_tokens,usage_source,"
    "ttft_s,duration_s,tokens_per_s,error,response_bytes,cost_usd,price_source,"
    "server_prompt_s,server_decode_s\n"
)


def test_requests_table(db):
    """The default table shows the main figures, newest first, numbers right-aligned."""
    result = run("requests", "--db", str(db))
    assert result.exit_code == 0
    assert result.output == REQUESTS_TABLE


def test_requests_json(db):
    """--format json is one array with one row per line and every column."""
    result = run("requests", "--db", str(db), "--model", "gpt-4o", "--since", "2025-01-31",
                 "--until", "2025-01-31T01:30:00Z", "-f", "json")  # fmt: skip
    assert result.exit_code == 0
    assert result.output == "[" + F3_JSON + "]\n"
    result = run("requests", "--db", str(db), "--limit", "2", "--since", "2025-01-31",
                 "--until", "2025-01-31T01:30:00Z", "--format", "json")  # fmt: skip
    assert result.output == "[" + F3_JSON + ",\n " + F2_JSON + "]\n"


def test_requests_jsonl(db):
    """--format jsonl is one object per line."""
    result = run("requests", "--db", str(db), "--since", "2025-01-31",
                 "--until", "2025-01-31T01:30:00Z", "-f", "jsonl")  # fmt: skip
    assert result.exit_code == 0
    assert result.output == F3_JSON + "\n" + F2_JSON + "\n"


def test_requests_csv(db):
    """--format csv has a header, empty cells for null and true/false for streamed."""
    result = run("requests", "--db", str(db), "--account", "beta", "-f", "csv")
    assert result.exit_code == 0
    assert result.output == CSV_HEADER + (
        "f3,2025-01-31T01:00:00.000Z,beta,k-beta-1,gpt-4o,neuron-a:8000,openai-chat,POST,"
        "/v1/chat/completions,true,502,upstream_error,,,,,,none,,0.012,,connection refused,0,,,,\n"
    )


def test_requests_filters(db):
    """Each filter option narrows the rows."""
    cases = [
        (["--account", "acme"], ["f2", "f1"]),
        (["--key", "k-acme-1"], ["f1"]),
        (["--model", "claude-sonnet"], ["f2"]),
        (["--node", "neuron-a:8000"], ["f4", "f3", "f1"]),
        (["--outcome", "upstream_error"], ["f3"]),
        (["--limit", "1"], ["f4"]),
        (["--limit", "0"], ["f4", "f3", "f2", "f1"]),
        (["--until", "2025-01-31"], ["f1"]),
    ]
    for args, expected in cases:
        result = run("requests", "--db", str(db), "-f", "csv", *args)
        assert result.exit_code == 0, result.output
        ids = [line.split(",")[0] for line in result.output.splitlines()[1:]]
        assert ids == expected, args


def test_requests_no_rows(db):
    """With no matching rows: a bare header, [] for json, nothing for jsonl, the header for csv."""
    args = ("requests", "--db", str(db), "--since", "2030-01-01")
    assert run(*args, "-f", "json").output == "[]\n"
    assert run(*args, "-f", "jsonl").output == ""
    assert run(*args, "-f", "csv").output == CSV_HEADER
    assert run(*args).output == (
        "ts  account  key  model  node  status  outcome  prompt  completion  cached  reasoning"
        "  usage  ttft_s  duration_s  tok/s\n"
        "--  -------  ---  -----  ----  ------  -------  ------  ----------  ------  ---------"
        "  -----  ------  ----------  -----\n"
    )


REPORT_HEADER = (
    "  requests  prompt  completion  cached  cache_write  reasoning  total  errors  refused"
    "  no_usage  avg_ttft_s  avg_tok/s  cost_usd  unpriced\n"
)
REPORT_RULE = (
    "  --------  ------  ----------  ------  -----------  ---------  -----  ------  -------"
    "  --------  ----------  ---------  --------  --------\n"
)


def test_report_by_account_table(db):
    """Totals per account, biggest first; anonymous rows show as (anonymous), null as -."""
    result = run("report", "--db", str(db))
    assert result.exit_code == 0
    assert result.output == (
        "account    " + REPORT_HEADER + "-----------" + REPORT_RULE
        + "acme                2    1250         320    1024           10          -   1570"
        "       0        0         0       0.250     58.660  -                0\n"
        "(anonymous)         1      40         400       -            -        256    440"
        "       0        0         0       1.500    106.670  -                0\n"
        "beta                1       -           -       -            -          -      -"
        "       1        0         1           -          -  -                0\n"
    )  # fmt: skip


def test_report_by_hour_table(db):
    """Hour groups are UTC, in time order."""
    result = run("report", "--db", str(db), "--by", "hour")
    assert result.exit_code == 0
    assert result.output == (
        "hour                " + REPORT_HEADER + "--------------------" + REPORT_RULE
        + "2025-01-30T23:00:00Z         1    1200         300    1024            -          -"
        "   1500       0        0         0       0.250     92.310  -                0\n"
        "2025-01-31T00:00:00Z         1      50          20       -           10          -"
        "     70       0        0         0           -     25.000  -                0\n"
        "2025-01-31T01:00:00Z         2      40         400       -            -        256"
        "    440       1        0         1       1.500    106.670  -                0\n"
    )  # fmt: skip


def test_report_json(db):
    """Report json keeps null for anonymous groups and for figures nobody reported."""
    result = run("report", "--db", str(db), "--by", "key", "--since", "2025-01-31T01:00Z",
                 "-f", "json")  # fmt: skip
    assert result.exit_code == 0
    assert result.output == (
        '[{"key": null, "requests": 1, "prompt_tokens": 40, "completion_tokens": 400, '
        '"cached_tokens": null, "cache_creation_tokens": null, "reasoning_tokens": 256, '
        '"total_tokens": 440, "errors": 0, "refused": 0, "usage_missing": 0, "avg_ttft_s": 1.5, '
        '"avg_tokens_per_s": 106.67, "cost_usd": null, "avg_cost_usd": null, "unpriced": 0},\n'
        ' {"key": "k-beta-1", "requests": 1, "prompt_tokens": null, "completion_tokens": null, '
        '"cached_tokens": null, "cache_creation_tokens": null, "reasoning_tokens": null, '
        '"total_tokens": null, "errors": 1, "refused": 0, "usage_missing": 1, "avg_ttft_s": null, '
        '"avg_tokens_per_s": null, "cost_usd": null, "avg_cost_usd": null, "unpriced": 0}]\n'
    )


def test_report_jsonl_and_csv(db):
    """Report jsonl is an object per line; csv has the full column names."""
    args = ("report", "--db", str(db), "--by", "day", "--until", "2025-01-31")
    assert run(*args, "-f", "jsonl").output == (
        '{"day": "2025-01-30", "requests": 1, "prompt_tokens": 1200, "completion_tokens": 300, '
        '"cached_tokens": 1024, "cache_creation_tokens": null, "reasoning_tokens": null, '
        '"total_tokens": 1500, "errors": 0, "refused": 0, "usage_missing": 0, "avg_ttft_s": 0.25, '
        '"avg_tokens_per_s": 92.31, "cost_usd": null, "avg_cost_usd": null, "unpriced": 0}\n'
    )
    assert run(*args, "-f", "csv").output == (
        "day,requests,prompt_tokens,completion_tokens,cached_tokens,cache_creation_tokens,"
        "reasoning_tokens,total_tokens,errors,refused,usage_missing,avg_ttft_s,avg_tokens_per_s,"
        "cost_usd,avg_cost_usd,unpriced\n"
        "2025-01-30,1,1200,300,1024,,,1500,0,0,0,0.25,92.31,,,0\n"
    )


def test_report_filters_and_groups(db):
    """--by model/node group as asked and the principal filters narrow the rows."""
    result = run("report", "--db", str(db), "--by", "model", "-f", "csv")
    assert [line.split(",")[:2] for line in result.output.splitlines()[1:]] == [
        ["gpt-4o", "3"],
        ["claude-sonnet", "1"],
    ]
    result = run("report", "--db", str(db), "--by", "node", "--account", "acme", "-f", "csv")
    assert [line.split(",")[:2] for line in result.output.splitlines()[1:]] == [
        ["neuron-a:8000", "1"],
        ["neuron-b:8000", "1"],
    ]
    result = run("report", "--db", str(db), "--since", "2030-01-01", "-f", "json")
    assert result.output == "[]\n"


def test_db_from_environment(db):
    """SPENDTAP_DB names the ledger when --db is not given."""
    result = run("requests", "-f", "csv", "--limit", "1", env={"SPENDTAP_DB": str(db)})
    assert result.exit_code == 0
    assert result.output.splitlines()[1].startswith("f4,")


# -- errors: one line, exit 1 --------------------------------------------------------


def error_of(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    return result.stderr


def usage_error_of(result) -> str:
    """click's usage error: exit 2, the usage and a hint, then the Error line (returned)."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    usage, _, error = result.stderr.rpartition("\n\n")
    assert usage.startswith("Usage: "), result.stderr
    return error


def test_missing_db_is_an_error_and_is_not_created(tmp_path):
    """A missing ledger is one clear line, exit 1, and no file appears."""
    path = tmp_path / "missing.db"
    for command in ("requests", "report"):
        result = run(command, "--db", str(path))
        assert error_of(result) == (
            f"Error: no ledger at {path} (spendtap run creates it; pass --db or set SPENDTAP_DB)\n"
        )
    assert list(tmp_path.iterdir()) == []


def test_default_db_path_under_xdg_data_home(tmp_path):
    """Without --db or SPENDTAP_DB the ledger is $XDG_DATA_HOME/spendtap/ledger.db."""
    result = run("requests", env={"XDG_DATA_HOME": str(tmp_path)})
    expected = tmp_path / "spendtap" / "ledger.db"
    assert error_of(result) == (
        f"Error: no ledger at {expected} (spendtap run creates it; pass --db or set SPENDTAP_DB)\n"
    )
    assert not (tmp_path / "spendtap").exists()


def test_text_file_is_not_a_ledger(tmp_path):
    """A file that is not SQLite is named in one line, exit 1."""
    path = tmp_path / "notes.db"
    path.write_text("hello\n" * 100)
    result = run("requests", "--db", str(path))
    assert error_of(result) == f"Error: {path} is not a spendtap ledger: file is not a database\n"


def test_foreign_sqlite_is_not_a_ledger(tmp_path):
    """An SQLite file that is not spendtap's is named in one line, exit 1."""
    path = tmp_path / "other.db"
    foreign = sqlite_utils.Database(path)  # sqlite-utils 3 has no context manager
    foreign["dogs"].insert({"name": "Cleo"})
    foreign.close()
    result = run("report", "--db", str(path))
    assert error_of(result) == (
        f"Error: {path} is not a spendtap ledger "
        "(an SQLite database without spendtap's migrations table)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["requests", "--since", "7x"],
            "Error: Invalid value for '--since': invalid duration '7x': unknown unit 'x' "
            "(use s for seconds, m minutes, h hours, d days, w weeks)\n",
        ),
        (
            ["report", "--until", "2025-13-01"],
            "Error: Invalid value for '--until': invalid ISO 8601 date/time '2025-13-01': "
            "month must be in 1..12\n",
        ),
        (
            ["requests", "--since", "last week"],
            "Error: Invalid value for '--since': invalid time 'last week': expected a duration "
            "such as 30s, 15m, 24h, 7d or 2w, or an ISO 8601 date/time such as 2025-01-31 "
            "or 2025-01-31T12:00:00Z\n",
        ),
        (
            ["requests", "--since", "2025-01-02", "--until", "2025-01-01"],
            "Error: --until (2025-01-01T00:00:00.000Z) must be later than "
            "--since (2025-01-02T00:00:00.000Z)\n",
        ),
        (
            ["report", "--since", "2025-01-01", "--until", "2025-01-01"],
            "Error: --until (2025-01-01T00:00:00.000Z) must be later than "
            "--since (2025-01-01T00:00:00.000Z)\n",
        ),
        (
            ["report", "--by", "week"],
            "Error: Invalid value for '--by': 'week' is not one of "
            "'account', 'key', 'model', 'node', 'api', 'path', 'outcome', 'price_source', "
            "'day', 'hour'.\n",
        ),
        (
            ["requests", "--outcome", "exploded"],
            "Error: Invalid value for '--outcome': 'exploded' is not one of "
            "'completed', 'client_disconnected', 'upstream_error', 'rejected', 'refused'.\n",
        ),
        (
            ["report", "-f", "xml"],
            "Error: Invalid value for '-f' / '--format': 'xml' is not one of "
            "'table', 'json', 'jsonl', 'csv'.\n",
        ),
        (
            ["requests", "--limit", "-1"],
            "Error: Invalid value for '--limit': -1 is not in the range 0<=x<=9007199254740991.\n",
        ),
    ],
)
def test_bad_arguments_are_usage_errors(db, args, message):
    """Bad times, an inverted range and unknown choices are click's usage errors (exit 2),
    their message one line."""
    result = run(*args, "--db", str(db))
    assert usage_error_of(result) == message


def test_locked_ledger_still_reads(db):
    """Readers are not blocked by a writer holding the write lock (WAL)."""
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        result = run("requests", "--db", str(db), "-f", "csv")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert result.exit_code == 0
    assert len(result.output.splitlines()) == 5


# -- help ---------------------------------------------------------------------


def test_every_command_has_help_with_an_example():
    """Each command's --help and -h show its description and an example block."""
    assert cli.commands, "no commands registered"
    for name, command in cli.commands.items():
        for flag in ("--help", "-h"):
            result = run(name, flag)
            assert result.exit_code == 0, (name, flag)
            assert result.output.startswith(f"Usage: cli {name} "), name
            assert command.get_short_help_str().strip(), name
            assert "Examples:" in result.output, name
            assert f"spendtap {name}" in result.output, name


def test_group_help_and_version():
    """The group has help text listing the commands, and --version prints the version."""
    result = run("-h")
    assert result.exit_code == 0
    assert "Meter LLM inference traffic" in result.output
    assert "requests" in result.output and "report" in result.output
    result = run("--version")
    assert result.output == f"spendtap, version {__version__}\n"


# -- units -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SPENDTAP_DB": "/data/x.db", "XDG_DATA_HOME": "/xdg", "HOME": "/h"}, "/data/x.db"),
        ({"SPENDTAP_DB": "", "XDG_DATA_HOME": "/xdg", "HOME": "/h"}, "/xdg/spendtap/ledger.db"),
        ({"XDG_DATA_HOME": "relative/dir", "HOME": "/h"}, "/h/.local/share/spendtap/ledger.db"),
        ({"HOME": "/h"}, "/h/.local/share/spendtap/ledger.db"),
    ],
)
def test_default_db_path(environ, expected):
    """$SPENDTAP_DB wins, then an absolute $XDG_DATA_HOME, then ~/.local/share."""
    assert default_db_path(environ) == Path(expected)


def test_format_table_alignment():
    """Text columns are left-aligned, numeric ones right-aligned, None as the given label."""
    rows = [{"name": "a", "n": 1, "x": 1.5}, {"name": None, "n": 1000, "x": None}]
    text = format_table(rows, [("name", "name"), ("n", "n"), ("x", "x")], {"name": "(none)"})
    assert text == textwrap.dedent(
        """\
        name       n      x
        ------  ----  -----
        a          1  1.500
        (none)  1000      -"""
    )


def test_core_modules_import_neither_click_nor_mitmproxy():
    """The ledger, writer and timeparse modules import neither click nor mitmproxy."""
    import spendtap.store.ledger
    import spendtap.store.writer
    import spendtap.timeparse

    for module in (spendtap.store.ledger, spendtap.store.writer, spendtap.timeparse):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"click", "mitmproxy"}, module.__name__
