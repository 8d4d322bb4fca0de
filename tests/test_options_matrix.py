"""A bad option never leaves an unmetered proxy behind, whichever way it is given.

For every option of the addon's table there is a bad value below (the test that
checks the table fails when an option is added without one). Each is given

- to ``spendtap run`` with ``--set``, through ``SPENDTAP_SET`` and through the TOML
  file's ``[set]`` table, and
- to ``mitmdump -s addon/spendtap.py --set`` directly,

each a real process, while a client keeps sending requests at the listen port and a
recording upstream counts what reaches it. Every process must exit non-zero with the
error in a line that names the option, no traceback, the secret never echoed, and
nothing may reach the upstream.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spendtap.address import free_port
from spendtap.options import OPTIONS, OptionError, check_settings, take_deferred
from tests.helpers import SPENDTAP_SCRIPT, environ_without_spendtap
from tests.proc import ADDON
from tests.recorder import Recorder

MITMDUMP = Path(sys.executable).with_name("mitmdump")
BAD_SECRET = "tooshort-x1"

# option -> (bad value, checked when): "parse" values are refused by the option table
# itself; "start" values parse but cannot be honoured (a file that is not there).
BAD: dict[str, tuple[str, str]] = {
    "spendtap_db": ("/proc/no-such-dir/ledger.db", "start"),
    "spendtap_metrics": ("nohost", "parse"),
    "spendtap_metrics_prefix": ("9lives", "parse"),
    "spendtap_node": ("node\x07one", "parse"),
    "spendtap_account_header": ("x account", "parse"),
    "spendtap_key_header": ("x:key", "parse"),
    "spendtap_trusted_peers": ("10.0.0.300", "parse"),
    "spendtap_gateway_secret": (BAD_SECRET, "parse"),
    "spendtap_gateway_secret_file": ("/proc/no-such-dir/secret", "start"),
    "spendtap_upstream_key_file": ("/proc/no-such-dir/key", "start"),
    "spendtap_access_log": ("/proc/no-such-dir/access.log", "start"),
    "spendtap_prices": ("/proc/no-such-dir/prices.toml", "start"),
    "spendtap_commit_wait_ms": ("abc", "parse"),
    "spendtap_ledger_process": ("maybe", "parse"),
    "spendtap_inject_usage": ("maybe", "parse"),
    "spendtap_join_chunks": ("often", "parse"),
    "spendtap_cache_hooks": ("sometimes", "parse"),
    "spendtap_gc_freeze": ("frozen", "parse"),
    "spendtap_buffer_bytes": ("-1", "parse"),
    "spendtap_enforce_budgets": ("yes", "parse"),
    "spendtap_principal_source": ("cookie", "parse"),
    "spendtap_require_auth": ("yes", "parse"),
    "spendtap_fallback_max_output": ("-5", "parse"),
    "spendtap_fail_open": ("maybe", "parse"),
    "spendtap_connection_log": ("loud", "parse"),
    "spendtap_reservation_max_age_s": ("0", "parse"),
    "spendtap_central": ("mysql://fleet:pw-not-shown@db/spendtap", "parse"),
    "spendtap_central_timeout_ms": ("50", "parse"),
    "spendtap_central_lease_s": ("0", "parse"),
    "spendtap_max_model_series": ("0", "parse"),
    "spendtap_max_principal_series": ("x", "parse"),
}
CASES = [*BAD.items(), ("spendtap_requier_auth", ("true", "parse"))]
# A bad key-swap file only matters where keys are the principal source.
NEEDS = {"spendtap_upstream_key_file": ["spendtap_principal_source=bearer"]}


def test_every_option_has_a_bad_value():
    assert set(BAD) == {o.name for o in OPTIONS}


@pytest.mark.parametrize(("name", "bad"), [(n, b) for n, b in CASES if b[1] == "parse"])
def test_the_table_refuses_it_in_one_line(name, bad):
    with pytest.raises(OptionError) as e:
        check_settings({name: bad[0]})
    message = str(e.value)
    assert name in message and "\n" not in message
    if name == "spendtap_gateway_secret":
        assert BAD_SECRET not in message
    if name == "spendtap_requier_auth":
        assert "did you mean spendtap_require_auth" in message


def test_defaults_pass_the_table():
    check_settings({o.name: _raw(o.default) for o in OPTIONS})


def _raw(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_deferred_values_are_taken_and_the_good_ones_kept():
    class Deferred:
        def __init__(self, *val):
            self.val = list(val)

    deferred = {
        "spendtap_require_auth": Deferred("yes"),
        "spendtap_fail_open": Deferred("true"),
        "spendtap_requier_auth": Deferred("true"),
        "spendtap_node": Deferred("a", "b"),
        "tcp_timeout": Deferred("x"),  # mitmproxy's own: not ours to judge
    }
    problems = take_deferred(deferred)
    assert len(problems) == 3
    assert set(deferred) == {"spendtap_fail_open", "tcp_timeout"}
    assert any("given 2 times" in p for p in problems)


# -- real processes --------------------------------------------------------------------


class Hammer:
    """Keeps sending a chat request to the listen port until stopped; keeps the statuses."""

    def __init__(self, port: int):
        self.port = port
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        while not self._stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("POST", "/v1/chat/completions", body,
                             {"content-type": "application/json"})  # fmt: skip
                self.statuses.append(conn.getresponse().status)
                conn.close()
            except OSError:
                time.sleep(0.02)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10)
        return self.statuses


# Python 3.12.1's asyncio reports a connection handler cancelled at shutdown (the
# hammer's, when the refusing process exits) as an error with a traceback; later 3.12
# releases do not. spendtap's own loops silence it (spendtap.proxy.eventloop
# .quiet_cancelled); plain mitmdump on asyncio's loop cannot.
CANCELLED_HANDLER = re.compile(
    r"^[^\n]*Exception in callback <function StreamReaderProtocol\.connection_made\."
    r".*?^\s*asyncio\.exceptions\.CancelledError\n",
    re.S | re.M,
)


def _run_refused(
    args: list[str], env: dict, port: int, recorder: Recorder, *, plain_mitmdump: bool = False
) -> str:
    hammer = Hammer(port)
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    finally:
        statuses = hammer.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"it kept running or exited 0:\n{out}"
    errors = CANCELLED_HANDLER.sub("", out) if plain_mitmdump else out
    assert "Traceback" not in errors, out
    assert all(s == 503 for s in statuses), (statuses, out)
    assert recorder.seen == [], recorder.seen
    return out


def _check_message(out: str, name: str) -> None:
    what = "gateway secret" if name == "spendtap_gateway_secret" else name
    lines = [line for line in out.splitlines() if what in line]
    assert lines, out
    assert BAD_SECRET not in out
    assert "pw-not-shown" not in out  # the central store URL's password


@pytest.fixture(scope="module")
def recorder():
    rec = Recorder()
    yield rec
    rec.stop()


def _env(tmp: Path) -> dict:
    env = environ_without_spendtap()
    env["HOME"] = str(tmp)
    return env


def _spendtap_run(tmp: Path, recorder: Recorder, name: str, bad: str, channel: str) -> str:
    port = free_port()
    args = [
        str(SPENDTAP_SCRIPT),
        "run",
        "--upstream",
        recorder.url,
        "--listen",
        f"127.0.0.1:{port}",
    ]
    env = _env(tmp)
    items = [f"{name}={bad}", *NEEDS.get(name, [])]
    if name != "spendtap_db":
        args += ["--db", str(tmp / "ledger.db")]
    if name != "spendtap_metrics":
        args += ["--metrics", ""]
    if channel == "--set":
        for item in items:
            args += ["--set", item]
    elif channel == "SPENDTAP_SET":
        env["SPENDTAP_SET"] = " ".join(shlex.quote(i) for i in items)
    else:
        config = tmp / "spendtap.toml"
        lines = ["[set]"]
        for item in items:
            key, _, value = item.partition("=")
            lines.append(f"{key} = {json.dumps(value)}")
        config.write_text("\n".join(lines) + "\n")
        args += ["--config", str(config)]
    return _run_refused(args, env, port, recorder)


def _mitmdump(tmp: Path, recorder: Recorder, name: str, bad: str) -> str:
    port = free_port()
    args = [str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:{recorder.url}",
            "--listen-host", "127.0.0.1", "--listen-port", str(port)]  # fmt: skip
    sets = [f"{name}={bad}", *NEEDS.get(name, [])]
    if name != "spendtap_db":
        sets.append(f"spendtap_db={tmp / 'ledger.db'}")
    if name != "spendtap_metrics":
        sets.append("spendtap_metrics=")
    for item in sets:
        args += ["--set", item]
    return _run_refused(args, _env(tmp), port, recorder, plain_mitmdump=True)


CHANNELS = ["--set", "SPENDTAP_SET", "toml", "mitmdump -s"]


def test_no_bad_option_serves_unmetered(tmp_path, recorder):
    """Every bad value of every option, through every channel: refused, nothing upstream.
    The 92 processes run four at a time (each is a real start of spendtap or mitmdump)."""
    jobs = [(name, bad, channel) for name, (bad, _) in CASES for channel in CHANNELS]

    def one(job):
        name, bad, channel = job
        tmp = tmp_path / f"{len(name)}-{abs(hash(job))}"
        tmp.mkdir()
        try:
            if channel == "mitmdump -s":
                out = _mitmdump(tmp, recorder, name, bad)
            else:
                out = _spendtap_run(tmp, recorder, name, bad, channel)
            _check_message(out, name)
        except AssertionError as e:
            return f"{name}={bad!r} via {channel}: {e}"
        return None

    with ThreadPoolExecutor(4) as pool:
        failures = [f for f in pool.map(one, jobs) if f]
    assert not failures, "\n\n".join(failures)
    assert recorder.seen == []


def test_a_bad_deferred_option_refuses_every_request_in_process(tmp_path):
    """Where mitmproxy would drop the script (a deferred value that fails to parse), the
    addon takes the value itself and answers every request 503 in the API's envelope,
    so even a mitmproxy that kept running would forward nothing unmetered."""
    from mitmproxy.test import taddons, tflow, tutils

    from spendtap.proxy.addons import default_addons

    async def go():
        with taddons.context() as tctx:
            tctx.options.set("spendtap_require_auth=yes", defer=True)
            addons = default_addons()
            tctx.master.addons.add(*addons)
            addon = tctx.master.addons.get("spendtap-metering")
            tctx.configure(addon, spendtap_db=str(tmp_path / "l.db"), spendtap_metrics="",
                           listen_host="127.0.0.1")  # fmt: skip
            assert "spendtap_require_auth" not in tctx.options.deferred
            for path in (b"/v1/chat/completions", b"/v1/messages"):
                flow = tflow.tflow(req=tutils.treq(method=b"POST", path=path, content=b"{}"))
                result = addon.request(flow)
                if asyncio.iscoroutine(result):
                    await result
                assert flow.response is not None and flow.response.status_code == 503
                doc = json.loads(flow.response.content)
                message = doc["error"]["message"]
                assert "spendtap_require_auth" in message
                if path == b"/v1/messages":
                    assert doc["type"] == "error"

    asyncio.run(go())
