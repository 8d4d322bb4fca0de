"""spendtap's addons in one process, through mitmproxy's own test harness (no mitmdump).

``spendtap.proxy.addons.default_addons()`` is loaded into a ``taddons`` context the
way mitmdump loads the entry script's list; flows from ``tflow`` go through the hooks.
These tests hold the split: each addon declares its own options and reacts to them,
the shared state (writer, gate, metrics) is read through the references the list
gives, and a setting that cannot be honoured fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
from dataclasses import dataclass

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.test import taddons, tflow, tutils

from spendtap.options import BY_NAME
from spendtap.proxy.addons import SpendtapAddons, default_addons
from spendtap.proxy.failclosed import FailClosed, SpendtapAddon
from spendtap.proxy.gatekeeper import Gatekeeper
from spendtap.proxy.guard import Guard
from spendtap.proxy.heap import Heap
from spendtap.proxy.hooks import Metering
from spendtap.proxy.monitoring import Monitoring
from spendtap.proxy.recording import Recording
from spendtap.store.budgets import Budgets
from spendtap.store.writer import LedgerWriter
from spendtap.store.writer_process import ProcessLedgerWriter
from tests.proc import ADDON

CHAT = b"/v1/chat/completions"
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


@dataclass
class Sidecar:
    tctx: taddons.context
    fail_closed: FailClosed
    metering: Metering
    guard: Guard
    recording: Recording
    gatekeeper: Gatekeeper
    monitoring: Monitoring
    heap: Heap

    def update(self, **options) -> None:
        self.tctx.options.update(**options)

    async def running(self) -> None:
        await self.tctx.master.addons.trigger_event(hooks.RunningHook())


@contextlib.asynccontextmanager
async def sidecar(tmp_path, *, deferred: tuple[str, ...] = (), **options):
    """The addon list loaded and configured as mitmdump would (``deferred``: ``--set``
    values given before the addons registered their options); shut down at the end."""
    spendtap = SpendtapAddons()
    addons = spendtap.addons
    with taddons.context() as tctx:
        for item in deferred:
            tctx.options.set(item, defer=True)
        tctx.master.addons.add(spendtap)
        settings = {
            "spendtap_db": str(tmp_path / "ledger.db"),
            "spendtap_metrics": "",
            "listen_host": "127.0.0.1",
            **options,
        }
        tctx.configure(addons[0], **settings)
        try:
            yield Sidecar(tctx, *addons)
        finally:
            await tctx.master.addons.trigger_event(hooks.DoneHook())


def chat_flow(*, stream: bool = False, headers=(), peer: str = "127.0.0.1"):
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    req = tutils.treq(
        method=b"POST",
        path=CHAT,
        content=json.dumps(body).encode(),
        headers=((b"content-type", b"application/json"), *headers),
    )
    flow = tflow.tflow(req=req)
    flow.client_conn.peername = (peer, 40000)
    return flow


def json_response(doc: dict):
    content = json.dumps(doc).encode()
    return tutils.tresp(
        status_code=200,
        headers=((b"content-type", b"application/json"),
                 (b"content-length", str(len(content)).encode())),
        content=content,
    )  # fmt: skip


def sse_response():
    """A chunked ``text/event-stream`` response head; the body comes through its stream."""
    return tutils.tresp(
        headers=((b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")),
        content=None,
    )


def ledger_rows(path) -> list[dict]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY ts")]
    finally:
        conn.close()


def gauge(monitoring: Monitoring, family: str) -> dict[tuple, float]:
    for metric in monitoring.metrics.registry.collect():
        if metric.name == family:
            return {
                tuple(s.labels.values()): s.value
                for s in metric.samples
                if not s.name.endswith("_created")
            }
    return {}


# -- options ------------------------------------------------------------------------------


def test_every_option_has_one_owner_and_is_declared_by_it():
    addons = default_addons()
    owned = [name for a in addons if isinstance(a, SpendtapAddon) for name in a.OPTIONS]
    assert sorted(owned) == sorted(BY_NAME), "an option with no owner, or with two"
    for addon in addons:
        with taddons.context() as tctx:
            before = set(tctx.options.keys())
            tctx.master.addons.add(addon)
            declared = set(tctx.options.keys()) - before
            assert declared == set(getattr(addon, "OPTIONS", ())), addon.name
            for name in declared:
                option = BY_NAME[name]
                assert tctx.options.default(name) == option.default, name
                assert tctx.options._options[name].choices == option.choices, name


def test_the_entry_script_is_the_list_of_addons(tmp_path):
    """mitmdump -s addon/spendtap.py: the script's ``addons`` is ``default_addons()``,
    configured from the deferred --set values."""
    with taddons.context() as tctx:
        tctx.options.update(listen_host="127.0.0.1")
        for item in (f"spendtap_db={tmp_path / 'ledger.db'}", "spendtap_metrics=",
                     "spendtap_node=node-a"):  # fmt: skip
            tctx.options.set(item, defer=True)
        script = tctx.script(str(ADDON))
        try:
            assert [type(a) for a in script.addons] == [type(a) for a in default_addons()]
            fail_closed, recording = script.addons[0], script.addons[3]
            assert fail_closed.misconfiguration is None
            assert recording.db_path == str(tmp_path / "ledger.db")
            assert tctx.options.spendtap_node == "node-a"
        finally:
            for addon in script.addons:
                if hasattr(addon, "done"):
                    addon.done()


def test_configure_rebuilds_only_what_the_changed_option_decides(tmp_path):
    async def go():
        async with sidecar(tmp_path) as s:
            writer, gate, metrics = s.recording.writer, s.gatekeeper.gate, s.monitoring.metrics
            s.update(spendtap_commit_wait_ms=10)  # read per flow: nothing rebuilt
            assert (s.recording.writer, s.gatekeeper.gate, s.monitoring.metrics) == (
                writer, gate, metrics)  # fmt: skip
            s.update(spendtap_metrics_prefix="edge")
            assert s.monitoring.metrics is not metrics
            assert s.recording.writer is writer and s.gatekeeper.gate is gate
            assert "edge_requests" in {m.name for m in s.monitoring.metrics.registry.collect()}
            s.update(spendtap_enforce_budgets=False)
            assert s.gatekeeper.gate is not gate and not s.gatekeeper.gate.enforce
            assert s.recording.writer is writer
            gate = s.gatekeeper.gate
            s.update(spendtap_trusted_peers="10.0.0.0/8")  # the guard's: the gate follows
            assert s.gatekeeper.gate is not gate
            assert s.gatekeeper.gate.trust is s.guard.policy
            assert s.guard.policy.trusts_peer("10.1.2.3")
            s.update(spendtap_access_log=str(tmp_path / "access.jsonl"))
            assert s.recording.access_log is not None and s.recording.writer is writer

    asyncio.run(go())


# -- a metered flow --------------------------------------------------------------------------


def test_a_request_through_the_hooks_is_one_priced_ledger_row(tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."m1"]\ninput = 1\noutput = 2\n')
    headers = ((b"x-helexa-account-id", b"acct-1"), (b"x-helexa-key-id", b"key-1"))

    async def go():
        async with sidecar(tmp_path, spendtap_prices=str(prices)) as s:
            flow = chat_flow(headers=headers)
            await s.metering.request(flow)
            assert flow.response is None  # dispatched, not refused
            flow.response = json_response({"model": "m1", "choices": [], "usage": USAGE})
            s.metering.responseheaders(flow)
            await s.metering.response(flow)  # returns once the row committed
            assert s.metering.in_flight == {}
            rows = ledger_rows(tmp_path / "ledger.db")
            assert len(rows) == 1
            written = gauge(s.monitoring, "cortex_ledger_rows_written")
        return rows[0], written

    row, written = asyncio.run(go())
    assert (row["account"], row["key"], row["model"]) == ("acct-1", "key-1", "m1")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (5, 7)
    assert (row["status"], row["outcome"]) == (200, "completed")
    # $1 and $2 per million tokens: 1000 and 2000 nano-dollars a token.
    assert row["cost_nusd"] == 5 * 1000 + 7 * 2000
    assert written == {(): 1.0}


async def one_json_request(s: Sidecar, account: str) -> None:
    flow = chat_flow(headers=((b"x-helexa-account-id", account.encode()),))
    await s.metering.request(flow)
    flow.response = json_response({"model": "m1", "choices": [], "usage": USAGE})
    s.metering.responseheaders(flow)
    await s.metering.response(flow)  # returns once the row committed


def test_a_committed_row_wakes_the_fleets_shipper(tmp_path, pg_dsn, monkeypatch):
    """With a fleet, the ledger's commits wake the shipper: each row reaches PostgreSQL
    within a pass, though the shipper's own look comes only every ``SHIP_IDLE_S``."""
    import psycopg

    from spendtap.proxy import gatekeeper

    monkeypatch.setattr(gatekeeper, "SHIP_IDLE_S", 60.0)

    def central_ids() -> set[str]:
        with psycopg.connect(pg_dsn) as conn:
            return {r[0] for r in conn.execute("SELECT id FROM requests")}

    async def go():
        async with sidecar(tmp_path, spendtap_central=pg_dsn) as s:
            await s.running()
            await asyncio.sleep(0.5)  # past the shipper's first passes: it sleeps now
            for n in range(3):
                await one_json_request(s, f"acct-{n}")
                rows = ledger_rows(tmp_path / "ledger.db")
                deadline = asyncio.get_running_loop().time() + 3
                while rows[-1]["id"] not in central_ids():
                    assert asyncio.get_running_loop().time() < deadline, "not shipped"
                    await asyncio.sleep(0.05)

    asyncio.run(go())


def test_the_ledger_is_written_from_a_child_process_or_from_a_thread(tmp_path):
    async def go():
        async with sidecar(tmp_path) as s:
            writer = s.recording.writer
            assert isinstance(writer, ProcessLedgerWriter)
            child = writer._proc.pid
            await one_json_request(s, "by-process")
            assert [r["account"] for r in ledger_rows(tmp_path / "ledger.db")] == ["by-process"]
            s.update(spendtap_ledger_process=False)  # drains and stops the child
            assert isinstance(s.recording.writer, LedgerWriter)
            assert writer.queue_depth == 0 and writer._proc is None
            with pytest.raises(ChildProcessError):
                os.waitpid(child, os.WNOHANG)  # reaped: no zombie left behind
            await one_json_request(s, "by-thread")
            s.update(spendtap_ledger_process=True)
            assert isinstance(s.recording.writer, ProcessLedgerWriter)
            await one_json_request(s, "by-process-again")
        return [r["account"] for r in ledger_rows(tmp_path / "ledger.db")]

    assert sorted(asyncio.run(go())) == ["by-process", "by-process-again", "by-thread"]


def test_a_new_price_file_reaches_the_writer_process(tmp_path):
    """The child prices rows from the file it was started with: a change starts another."""
    cheap, dear = tmp_path / "cheap.toml", tmp_path / "dear.toml"
    cheap.write_text('[models."m1"]\ninput = 1\noutput = 2\n')
    dear.write_text('[models."m1"]\ninput = 10\noutput = 20\n')

    async def go():
        async with sidecar(tmp_path, spendtap_prices=str(cheap)) as s:
            writer = s.recording.writer
            await one_json_request(s, "before")
            s.update(spendtap_prices=str(dear))
            assert s.recording.writer is not writer and writer._proc is None
            await one_json_request(s, "after")
        return {r["account"]: r["cost_nusd"] for r in ledger_rows(tmp_path / "ledger.db")}

    # 5 prompt and 7 completion tokens.
    assert asyncio.run(go()) == {"before": 5 * 1000 + 7 * 2000, "after": 5 * 10_000 + 7 * 20_000}


def test_a_writer_process_that_cannot_start_leaves_the_thread_writing(
    tmp_path, monkeypatch, caplog
):
    """Never unmetered: where no child can run (no interpreter to start), the thread writes."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))

    async def go():
        async with sidecar(tmp_path) as s:
            assert isinstance(s.recording.writer, LedgerWriter)
            await one_json_request(s, "acct")
        return ledger_rows(tmp_path / "ledger.db")

    with caplog.at_level("WARNING", logger="spendtap"):
        rows = asyncio.run(go())
    assert [r["account"] for r in rows] == ["acct"]
    assert any(
        "cannot start the ledger writer process" in r.getMessage()
        and "from a thread instead" in r.getMessage()
        for r in caplog.records
    )


def test_a_streamed_response_passes_through_untouched_and_is_metered(tmp_path):
    events = [
        b'data: {"choices":[{"delta":{"content":"he"}}]}\n\n',
        b'data: {"choices":[{"delta":{"content":"llo"}}]}\n\n',
        b'data: {"choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n",
        b"data: [DONE]\n\n",
    ]
    wire = b"".join(events)

    async def go():
        async with sidecar(tmp_path) as s:
            flow = chat_flow(stream=True)
            await s.metering.request(flow)
            flow.response = sse_response()
            s.metering.responseheaders(flow)
            assert callable(flow.response.stream)
            # Chunk boundaries that do not follow event boundaries.
            passed = [flow.response.stream(wire[i : i + 7]) for i in range(0, len(wire), 7)]
            flow.response.stream(b"")
            await s.metering.response(flow)
            return b"".join(passed), ledger_rows(tmp_path / "ledger.db")

    passed, rows = asyncio.run(go())
    assert passed == wire
    assert [(r["prompt_tokens"], r["completion_tokens"], r["streamed"]) for r in rows] == [
        (5, 7, 1)
    ]


def test_done_writes_the_rows_still_in_flight_before_the_writer_drains(tmp_path):
    async def go():
        async with sidecar(tmp_path) as s:
            flow = chat_flow()
            await s.metering.request(flow)
            assert len(s.metering.in_flight) == 1
        # The context's end ran done on every addon, in the list's order.
        return ledger_rows(tmp_path / "ledger.db")

    rows = asyncio.run(go())
    assert [(r["outcome"], r["error"]) for r in rows] == [
        ("upstream_error", "proxy shut down mid-response")
    ]


def test_principal_headers_from_an_untrusted_peer_are_removed_and_counted(tmp_path):
    headers = ((b"x-helexa-account-id", b"mallory"), (b"x-spendtap-gateway-secret", b"guess"))

    async def go():
        async with sidecar(tmp_path) as s:
            flow = chat_flow(headers=headers, peer="192.0.2.7")
            await s.metering.request(flow)
            counted = gauge(s.monitoring, "cortex_untrusted_principal_headers")
            return flow, counted

    flow, counted = asyncio.run(go())
    assert flow.response is None  # dispatched, unattributed
    assert "x-helexa-account-id" not in flow.request.headers
    assert "x-spendtap-gateway-secret" not in flow.request.headers
    assert counted == {(): 1.0}


# -- fail closed -----------------------------------------------------------------------------


def test_an_unknown_option_refuses_every_request_and_creates_no_ledger(tmp_path):
    async def go():
        async with sidecar(tmp_path, deferred=("spendtap_requier_auth=true",)) as s:
            assert "did you mean spendtap_require_auth" in s.fail_closed.misconfiguration
            # Nothing was set up after the refusal: no ledger, no gate, no metrics.
            assert s.recording.writer is None and s.gatekeeper.gate is None
            flow = chat_flow()
            await s.metering.request(flow)
            return flow

    flow = asyncio.run(go())
    assert flow.response.status_code == 503
    assert "spendtap_requier_auth" in json.loads(flow.response.content)["error"]["message"]
    assert not (tmp_path / "ledger.db").exists()


def test_an_unguarded_start_stops_before_the_ledger_is_created(tmp_path):
    async def go():
        async with sidecar(tmp_path, listen_host="0.0.0.0") as s:
            return s.fail_closed.misconfiguration, s.tctx.options.server

    problem, server = asyncio.run(go())
    assert problem.startswith("refusing to start: listening on 0.0.0.0")
    assert server is False  # not even listening
    assert not (tmp_path / "ledger.db").exists()


def test_a_bad_value_at_run_time_is_rolled_back_and_metering_goes_on(tmp_path):
    async def go():
        async with sidecar(tmp_path) as s:
            await s.running()
            writer = s.recording.writer
            with pytest.raises(exceptions.OptionsError, match="spendtap_prices"):
                s.update(spendtap_prices=str(tmp_path / "missing.toml"))
            with pytest.raises(exceptions.OptionsError, match="spendtap_db"):
                s.update(spendtap_db="/proc/no-such-dir/ledger.db")
            assert s.fail_closed.misconfiguration is None
            assert s.tctx.options.spendtap_prices == ""
            assert s.tctx.options.spendtap_db == str(tmp_path / "ledger.db")
            # The rollback configured the old values again: the catalogue only, same writer.
            assert s.recording.pricer.price_file is None and s.recording.writer is writer
            flow = chat_flow()
            await s.metering.request(flow)
            flow.response = json_response({"model": "m1", "usage": USAGE})
            s.metering.responseheaders(flow)
            await s.metering.response(flow)
        return ledger_rows(tmp_path / "ledger.db")

    assert len(asyncio.run(go())) == 1


# -- run-time changes the shared state follows --------------------------------------------


def test_the_budget_gauges_follow_a_new_ledger(tmp_path):
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    for path, cap in ((first, 100), (second, 200)):
        with Budgets(path) as budgets:
            budgets.set("key", "k1", cap, 3600)

    async def go():
        async with sidecar(tmp_path, spendtap_db=str(first)) as s:
            await s.running()
            before = gauge(s.monitoring, "cortex_budget_cap_tokens")
            s.update(spendtap_db=str(second))
            after = gauge(s.monitoring, "cortex_budget_cap_tokens")
            return before, after, s.recording.db_path

    before, after, db_path = asyncio.run(go())
    assert before == {("key", "k1"): 100.0}
    assert after == {("key", "k1"): 200.0}
    assert db_path == str(second)


def test_new_prices_reach_the_gate_without_a_rebuild(tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."m1"]\ninput = 1\noutput = 2\n')

    async def go():
        async with sidecar(tmp_path) as s:
            gate = s.gatekeeper.gate
            s.update(spendtap_prices=str(prices))
            return gate, s.gatekeeper.gate, s.recording.pricer

    before, after, pricer = asyncio.run(go())
    assert after is before  # reservations in flight keep their gate
    assert after.pricer is pricer  # money caps price with the new file
    assert pricer.lookup("m1")[0] != "none"


# -- the heap -----------------------------------------------------------------------------


class _Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_the_start_up_heap_is_frozen_out_of_the_collectors_passes(tmp_path):
    """Once running, the heap is frozen: a full pass walks only what came after. A change of
    options at run time collects and freezes again (a cycle dropped meanwhile is freed),
    ``spendtap_gc_freeze=false`` gives the heap back, and so does the shutdown."""
    import gc
    import weakref

    async def go():
        async with sidecar(tmp_path) as s:
            assert gc.get_freeze_count() < 1000  # the interpreter's own few, if any
            cycle = _Cycle()
            dropped = weakref.ref(cycle)
            await s.running()
            frozen = gc.get_freeze_count()
            # Everything start-up made (mitmproxy, the addons, the catalogue, this test
            # run) is out of the oldest generation a full pass walks.
            assert frozen > 100_000
            assert len(gc.get_objects(generation=2)) < frozen / 10
            await one_json_request(s, "while-frozen")
            del cycle
            gc.collect()
            assert dropped() is not None, "a frozen cycle is not collected"
            s.update(spendtap_connection_log=True)  # any change at run time
            assert dropped() is None, "collected before the heap was frozen again"
            assert gc.get_freeze_count() > 100_000
            s.update(spendtap_gc_freeze=False)
            assert gc.get_freeze_count() == 0
            s.update(spendtap_gc_freeze=True)
            assert gc.get_freeze_count() > 100_000
        assert gc.get_freeze_count() == 0  # given back at shutdown

    asyncio.run(go())


def test_no_freeze_when_switched_off(tmp_path):
    import gc

    async def go():
        before = gc.get_freeze_count()
        async with sidecar(tmp_path, spendtap_gc_freeze=False) as s:
            await s.running()
            await one_json_request(s, "unfrozen")
            assert gc.get_freeze_count() == before
        return ledger_rows(tmp_path / "ledger.db")

    assert [r["account"] for r in asyncio.run(go())] == ["unfrozen"]
