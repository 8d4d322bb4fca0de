"""The proxy's event loop (``spendtap run --event-loop``, ``spendtap.proxy.eventloop``).

``spendtap run`` starts mitmdump, or the lean runner, on uvloop's loop unless told
``--event-loop asyncio``. These run the real command both ways, for both runners, in
front of the simulator: the loop the process logs and has mapped, the bytes a client
gets, the row the ledger gets, a clean SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from click.testing import CliRunner

from spendtap.address import free_port, wait_for_port
from spendtap.cli.main import cli
from spendtap.proxy import eventloop
from tests.helpers import SPENDTAP_MODULE
from tests.proc import Proc, read_rows

UPSTREAM = "http://127.0.0.1:8000"


def _dry_run(*args: str, env: dict | None = None) -> str:
    result = CliRunner().invoke(cli, ["run", "--dry-run", "--upstream", UPSTREAM, *args], env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_spendtap_run_starts_mitmdump_on_uvloop_by_default():
    out = _dry_run(env={})
    assert f"{sys.executable} -m spendtap.proxy.eventloop uvloop --mode reverse:{UPSTREAM}" in out
    assert " -s " in out and "spendtap.py" in out


def test_the_lean_runner_is_told_its_loop():
    assert "-m spendtap.proxy.runner --event-loop uvloop --mode" in _dry_run("--runner", "lean")
    out = _dry_run("--runner", "lean", "--event-loop", "asyncio")
    assert "--event-loop" not in out and "-m spendtap.proxy.runner --mode" in out


def test_asyncio_runs_mitmdump_itself():
    out = _dry_run("--event-loop", "asyncio")
    assert out.startswith(str(eventloop_mitmdump()))
    assert "spendtap.proxy.eventloop" not in out


def test_the_environment_picks_the_loop():
    assert "spendtap.proxy.eventloop" not in _dry_run(env={"SPENDTAP_EVENT_LOOP": "asyncio"})


def test_an_unknown_loop_is_one_line():
    result = CliRunner().invoke(
        cli, ["run", "--dry-run", "--upstream", UPSTREAM, "--event-loop", "trio"], env={}
    )
    assert result.exit_code == 2
    assert "Invalid value for '--event-loop'" in result.output
    assert "Traceback" not in result.output


def test_a_loop_that_is_not_installed_is_refused_before_starting(tmp_path, monkeypatch):
    """uvloop missing from the environment (installed without its dependencies): one line
    saying what to do, exit 1, nothing started."""
    real_find_spec = eventloop.importlib.util.find_spec
    monkeypatch.setattr(
        eventloop.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "uvloop" else real_find_spec(name, *a),
    )
    result = CliRunner().invoke(
        cli,
        ["run", "--upstream", UPSTREAM, "--db", str(tmp_path / "l.db"), "--metrics", ""],
        env={},
    )
    assert result.exit_code == 1, result.output
    assert "uvloop package is not installed" in result.output
    assert "--event-loop asyncio" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def _run_module(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m ARGS`` to its end, its output as text."""
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_the_module_refuses_an_unknown_loop_in_one_line():
    proc = _run_module("spendtap.proxy.eventloop", "trio", "--version")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "spendtap: unknown event loop 'trio' (one of uvloop, asyncio)"
    ), proc.stderr


def test_a_broken_uvloop_is_one_line(tmp_path):
    """A uvloop that is there but does not import (a wheel for another platform, say):
    one line from either runner, exit 1, no traceback."""
    broken = tmp_path / "uvloop"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('wrong platform')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for module in (["spendtap.proxy.eventloop", "uvloop", "--version"],
                   ["spendtap.proxy.runner", "--event-loop", "uvloop"]):  # fmt: skip
        proc = _run_module(*module, env=env)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip() == (
            "spendtap: event loop uvloop: cannot import uvloop: wrong platform"
        ), proc.stderr


def test_mitmdump_on_uvloop_parses_its_own_arguments():
    """The module is mitmdump: its options, its errors, under its own name."""
    proc = _run_module("spendtap.proxy.eventloop", "uvloop", "--bogus-flag")
    assert proc.returncode == 1
    assert "mitmdump: error: unrecognized arguments: --bogus-flag" in proc.stderr, proc.stderr


def test_loop_name():
    import asyncio

    import uvloop

    assert eventloop.loop_name(uvloop.new_event_loop()) == "uvloop"
    loop = asyncio.new_event_loop()
    try:
        assert eventloop.loop_name(loop) == "asyncio"
    finally:
        loop.close()


def eventloop_mitmdump():
    from spendtap.cli.run import _mitmdump_command

    return " ".join(_mitmdump_command())


def _uvloop_mapped(pid: int) -> bool:
    """Whether the process has uvloop's extension module loaded (its memory map)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("uvloop" in line for line in f)


@pytest.mark.e2e
@pytest.mark.parametrize("runner", ["mitmdump", "lean"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_sidecar_meters_the_same_on_either_loop(sim, tmp_path, runner, loop):
    """Concurrent streams through ``spendtap run`` on each loop: every byte through, every
    row exact, the loop the process says it runs on, and a clean SIGTERM."""
    port, metrics = free_port(), free_port()
    db = tmp_path / "ledger.db"
    proc = Proc(
        [*SPENDTAP_MODULE, "run", "--upstream", sim.url, "--listen", f"127.0.0.1:{port}",
         "--metrics", f"127.0.0.1:{metrics}", "--db", str(db), "--runner", runner,
         "--event-loop", loop],
        tmp_path / "run.log",
    )  # fmt: skip
    try:
        wait_for_port(port, proc.proc)
        wait_for_port(metrics, proc.proc)
        assert _uvloop_mapped(proc.pid) == (loop == "uvloop")
        bodies: dict[int, bytes] = {}

        def client(i: int) -> None:
            body = {"model": "sim-chat", "stream": True,
                    "messages": [{"role": "user", "content": f"loop {i}"}]}  # fmt: skip
            headers = {"x-helexa-account-id": f"loop-{i}", "x-sim-tokens": str(10 + i)}
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                              json=body, headers=headers, timeout=20) as r:  # fmt: skip
                assert r.status_code == 200
                bodies[i] = r.read()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        code = proc.stop(signal.SIGTERM)
    log = proc.log_path.read_text(errors="replace")
    assert code == 0, log
    assert f"spendtap: event loop {loop}" in log, log
    assert "Traceback" not in log, log
    assert sorted(bodies) == list(range(8))
    rows = {r["account"]: r for r in read_rows(db)}
    for i, body in bodies.items():
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        # The client did not ask for usage: spendtap asked upstream and kept it out.
        assert all("usage" not in json.loads(e) or not json.loads(e)["usage"] for e in events[:-1])
        row = rows[f"loop-{i}"]
        assert row["completion_tokens"] == 10 + i
        assert row["usage_source"] == "reported"
        assert row["outcome"] == "completed"


def test_a_cancelled_connection_handler_at_shutdown_is_not_an_error(caplog):
    """The mitmdump runner's uvloop loops come with ``quiet_cancelled``: a handler task
    cancelled at shutdown (Python 3.12.1 reports it with a traceback) passes silently;
    any other exception still reaches asyncio's default handler."""
    import asyncio

    loop = eventloop.quiet_uvloop_policy().new_event_loop()
    try:
        assert loop.get_exception_handler() is eventloop.quiet_cancelled
        with caplog.at_level("ERROR", logger="asyncio"):
            loop.call_exception_handler(
                {"message": "Exception in callback", "exception": asyncio.CancelledError()}
            )
            assert caplog.records == []
            loop.call_exception_handler(
                {"message": "Exception in callback", "exception": ValueError("real")}
            )
        assert [r.getMessage() for r in caplog.records] == ["Exception in callback"]
    finally:
        loop.close()
