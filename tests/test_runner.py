"""The lean runner (``spendtap run --runner lean``, ``python -m spendtap.proxy.runner``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from click.testing import CliRunner

from spendtap.cli.main import cli


def test_dry_run_lean_runs_the_runner_module_without_a_script():
    result = CliRunner().invoke(
        cli, ["run", "--dry-run", "--runner", "lean", "--upstream", "http://127.0.0.1:8000"], env={}
    )
    assert result.exit_code == 0, result.output
    assert "-m spendtap.proxy.runner --event-loop uvloop --mode reverse:http://127.0.0.1:8000" in (
        result.output
    )
    assert " -s " not in result.output
    assert "--set connection_strategy=lazy" in result.output


def test_dry_run_default_is_still_mitmdump_with_the_script():
    result = CliRunner().invoke(
        cli, ["run", "--dry-run", "--upstream", "http://127.0.0.1:8000"], env={}
    )
    assert result.exit_code == 0, result.output
    assert "spendtap.proxy.runner" not in result.output
    assert " -s " in result.output and "spendtap.py" in result.output


def test_hooks_go_only_to_the_addons_that_have_them_in_chain_order():
    from mitmproxy import hooks
    from mitmproxy.test import taddons

    from spendtap.proxy.dispatch import HookCache

    seen: list[str] = []

    class A:
        def running(self):
            seen.append("a")

    class Broken:
        def running(self):
            seen.append("broken")
            raise RuntimeError("an addon's bug")

    class Silent:
        pass

    class B:
        async def running(self):
            seen.append("b")

    class C:
        def running(self):
            seen.append("c")

    async def go():
        with taddons.context() as tctx:
            manager = HookCache(tctx.master)
            manager.add(A(), Broken(), Silent(), B())
            await manager.trigger_event(hooks.RunningHook())
            assert {type(a) for a, _ in manager._hooks_for(hooks.RunningHook())} == {A, Broken, B}
            seen.append("|")
            manager.add(C())  # the chain changed: the cached list is rebuilt
            await manager.trigger_event(hooks.RunningHook())

    asyncio.run(go())
    assert seen == ["a", "broken", "b", "|", "a", "broken", "b", "c"]


@pytest.mark.e2e
def test_an_option_of_an_addon_it_does_not_load_is_refused_in_one_line(tmp_path):
    from spendtap.address import free_port

    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "spendtap.proxy.runner", "--mode", "reverse:http://127.0.0.1:1",
         "--listen-host", "127.0.0.1", "--listen-port", str(port),
         "--set", f"spendtap_db={tmp_path / 'l.db'}", "--set", "spendtap_metrics=",
         "--set", "anticache=true"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert [line for line in out.splitlines() if "anticache" in line], out
