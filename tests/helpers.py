"""Plain helpers shared by the test modules (fixtures live in ``tests/conftest.py``).

Process wrappers (``Sidecar``, ``Simulator``, ``read_rows``) live in ``tests/proc.py``
and the PostgreSQL server in ``tests/pg.py``; what is here is what more than one test
module needs: running the CLI, naming a principal, SDK clients, ledger rows,
reading metrics, waiting for a condition.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

# The CLI two ways: as a module of the interpreter running the tests (no console script
# needed), and as the console script pip installed next to it (what users run).
SPENDTAP_MODULE = [sys.executable, "-m", "spendtap.cli.main"]
SPENDTAP_SCRIPT = Path(sys.executable).with_name("spendtap")


# -- running the CLI ---------------------------------------------------------------------


def invoke(
    *args: str,
    db: Path | str | None = None,
    input: str | None = None,
    env: dict | None = None,
    catch_exceptions: bool = True,
):
    """``spendtap ARGS [--db DB]`` in this process (click's ``CliRunner``); the Result."""
    from click.testing import CliRunner

    from spendtap.cli.main import cli

    argv = [*args, "--db", str(db)] if db is not None else list(args)
    return CliRunner().invoke(cli, argv, input=input, env=env, catch_exceptions=catch_exceptions)


def usage_error(result) -> str:
    """click's usage error: exit 2, the usage, then exactly one Error line (returned)."""
    assert result.exit_code == 2 and result.output.startswith("Usage: "), result.output
    assert result.output.count("Error:") == 1, result.output
    return result.output.splitlines()[-1]


def spendtap(*args: str, db: Path | str, input: str | None = None) -> str:
    """``spendtap ARGS --db DB`` in a child process; its stdout (fails the test on exit != 0)."""
    out = subprocess.run(
        [*SPENDTAP_MODULE, *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=30,
        input=input,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def environ_without_spendtap() -> dict[str, str]:
    """This process's environment minus every ``SPENDTAP_*`` variable (for a child process
    whose settings must come from the test alone, not from the shell that ran pytest)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPENDTAP_")}


def dead_owner() -> str:
    """A reservation owner string whose process has exited (a child that printed its own)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from spendtap.store.budgets import process_owner; print(process_owner())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


# -- requests through a sidecar ----------------------------------------------------------


def principal(prefix: str = "acct", key: str = "k") -> tuple[str, dict[str, str]]:
    """A fresh account name and the headers that name it and ``key``: rows of one test are
    told apart from the others' in a ledger shared by a module."""
    account = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return account, {"x-helexa-account-id": account, "x-helexa-key-id": key}


def openai_client(url: str, headers: dict | None = None, *, api_key: str = "sk-test", **kw):
    """The official OpenAI SDK against ``url`` (a sidecar or the simulator). No retries unless
    ``max_retries`` says so: a test sees the answer of each request it made."""
    import openai

    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, default_headers=headers, **kw)


def anthropic_client(url: str, headers: dict | None = None, *, api_key: str = "sk-test", **kw):
    """The official Anthropic SDK against ``url``; no retries, as ``openai_client``."""
    import anthropic

    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=url, api_key=api_key, default_headers=headers, **kw)


def read_then_hang_up(url: str, body: dict, headers: dict, after_bytes: int) -> None:
    """POST a streaming request and close the connection once ``after_bytes`` arrived."""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", url, json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        got = 0
        for chunk in resp.iter_raw():
            got += len(chunk)
            if got > after_bytes:
                break


def strip_ids(body: bytes, *, padding: bool = False) -> bytes:
    """Blank out per-response ids and timestamps so two generations compare equal; with
    ``padding``, the ``obfuscation`` padding of OpenAI chunks too (the other callers keep
    comparing it byte for byte)."""
    body = re.sub(rb'"id":\s*"[^"]*"', b'"id":""', body)
    if padding:
        body = re.sub(rb'"obfuscation":\s*"[^"]*"', b'"obfuscation":""', body)
    return re.sub(rb'"created(_at)?":\s*\d+', b'"created":0', body)


def sim_total(sim) -> int:
    """How many requests the simulator has answered (``/sim/stats``)."""
    return httpx.get(sim.url + "/sim/stats", timeout=5).json()["total"]


# -- ledger rows ---------------------------------------------------------------------------


def ledger_row(id_: str, ts: str = "2025-01-31T12:00:00.000Z", **fields) -> dict:
    """A complete ledger row of a completed, streamed OpenAI chat call; ``fields`` override."""
    return {
        "id": id_,
        "ts": ts,
        "account": "acme",
        "key": "k1",
        "model": "m1",
        "node": "n1",
        "api": "openai-chat",
        "method": "POST",
        "path": "/v1/chat/completions",
        "streamed": True,
        "status": 200,
        "outcome": "completed",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "usage_source": "reported",
        "ttft_s": 0.5,
        "duration_s": 1.0,
        "tokens_per_s": 10.0,
        "response_bytes": 100,
    } | fields


def tokens_of(rows: Iterable[dict], key: str) -> int:
    """Prompt plus completion tokens of ``key``'s rows (a missing figure counts 0)."""
    return sum(
        (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0) for r in rows if r["key"] == key
    )


# -- metrics and waiting ---------------------------------------------------------------------


def metric_value(text: str, name: str, default: float | None = None) -> float:
    """The value of the unlabelled series ``name`` in a Prometheus exposition; ``default``
    when it is not there (None: fail, the series must be exported)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    if default is None:
        raise AssertionError(f"no metric {name}")
    return default


def wait_for(predicate: Callable[[], Any], timeout: float = 10, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last answer, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


# -- metric names in PromQL (enough of PromQL for the alert rules and the dashboard) --------

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "inf", "nan",
}  # fmt: skip

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_SELECTOR = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and labels removed)."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("1", text)
    text = _SELECTOR.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


# -- chunking ----------------------------------------------------------------------------------


def cut(body: bytes, points: Iterable[int]) -> list[bytes]:
    """``body`` cut at ``points`` (each taken modulo its length + 1): non-empty pieces, in
    order, that join back to ``body``."""
    idx = sorted({p % (len(body) + 1) for p in points} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(idx)]


def voluntary_switches(pid: int, tid: int | None = None) -> int:
    """Voluntary context switches of a thread so far (the main thread by default): each
    is a wake-up from a wait, so an idle thread's count stays put."""
    path = f"/proc/{pid}/task/{tid or pid}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches in {path}")
