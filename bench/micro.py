"""Micro-benchmarks: the usage scanner, the stream callable, the ledger writer, budgets.

Each runs in this process (no proxy): what one core pays per chunk, per row.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.procs import REPO
from tests.helpers import ledger_row

CORPUS = REPO / "tests" / "corpus" / "wire"
CHUNK = 120  # bytes: a typical SSE chunk on the wire (one small event or part of one)
JOINED_CHUNK = 8192  # bytes a joined read holds, for the scanner's figure per event

clock = time.perf_counter


def corpus_cases() -> list[dict]:
    cases = []
    for d in sorted(CORPUS.iterdir()):
        body, meta = d / "body", d / "meta.json"
        if body.is_file() and meta.is_file():
            m = json.loads(meta.read_text())
            cases.append(
                {
                    "name": d.name,
                    "api": m["api"],
                    "content_type": m.get("content_type"),
                    "streaming": bool(m.get("streaming")),
                    "body": body.read_bytes(),
                }
            )
    return cases


def split(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def sim_stream_body(tokens: int) -> bytes:
    """A real simulator chat stream (include_usage) of ``tokens`` tokens."""
    import httpx

    from spendtap.sim import run_in_thread

    with run_in_thread() as sim:
        r = httpx.post(
            sim.url + "/v1/chat/completions",
            json={
                "model": "sim-model",
                "messages": [{"role": "user", "content": "Say hello"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers={"x-sim-tokens": str(tokens)},
            timeout=60,
        )
        return r.content


def sse_events(body: bytes) -> list[bytes]:
    """The body cut at event boundaries (each piece one whole event, as paced servers send)."""
    parts = body.split(b"\n\n")
    out = [p + b"\n\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


# -- scanner --------------------------------------------------------------------------------


def _scan_once(api: str, ctype: str | None, chunks: list[bytes]) -> float:
    from spendtap.metering.dialect_scanner import make_scanner

    t0 = clock()
    s = make_scanner(api, ctype, None)
    feed = s.feed
    tnow = time.time()
    for c in chunks:
        feed(c, tnow)
    s.finish(tnow)
    return clock() - t0


def _time_chunks(api: str, ctype: str | None, chunks: list[bytes], min_s: float) -> float:
    """Best-of-3 seconds per pass (each sample repeats until min_s/3)."""
    _scan_once(api, ctype, chunks)  # warm
    best = float("inf")
    for _ in range(3):
        n, t = 0, 0.0
        while t < min_s / 3 or n == 0:
            t += _scan_once(api, ctype, chunks)
            n += 1
        best = min(best, t / n)
    return best


def bench_scanner(quick: bool) -> dict:
    min_s = 0.02 if quick else 0.15
    cases = corpus_cases()
    per_case = []
    tot_bytes = tot_chunks = 0
    tot_s = 0.0
    stream_bytes = stream_chunks = 0
    stream_s = 0.0
    for c in cases:
        chunks = split(c["body"], CHUNK)
        s = _time_chunks(c["api"], c["content_type"], chunks, min_s)
        n, b = len(chunks), len(c["body"])
        per_case.append(
            {
                "case": c["name"],
                "bytes": b,
                "chunks": n,
                "us_per_chunk": round(s / n * 1e6, 3),
                "mb_per_s": round(b / s / 1e6, 2),
            }
        )
        tot_bytes += b
        tot_chunks += n
        tot_s += s
        if c["streaming"]:
            stream_bytes += b
            stream_chunks += n
            stream_s += s
    # The simulator's chat stream, cut at 120 bytes and at event boundaries; and linearity.
    sizes = (64, 512) if quick else (64, 512, 4096)
    linear = []
    sim_chunked = sim_events = None
    for tokens in sizes:
        body = sim_stream_body(tokens)
        chunks = split(body, CHUNK)
        s = _time_chunks("openai-chat", "text/event-stream", chunks, min_s)
        linear.append(
            {
                "tokens": tokens,
                "bytes": len(body),
                "us_per_chunk": round(s / len(chunks) * 1e6, 3),
                "ns_per_byte": round(s / len(body) * 1e9, 2),
            }
        )
        if tokens == 512:
            sim_chunked = linear[-1]["us_per_chunk"]
            ev = sse_events(body)
            se = _time_chunks("openai-chat", "text/event-stream", ev, min_s)
            # What one read of a fast stream brings, joined (spendtap.proxy.coalesce).
            joined = split(body, JOINED_CHUNK)
            sj = _time_chunks("openai-chat", "text/event-stream", joined, min_s)
            sim_events = {
                "events": len(ev),
                "avg_event_bytes": round(len(body) / len(ev), 1),
                "us_per_event": round(se / len(ev) * 1e6, 3),
                "us_per_event_joined": round(sj / len(ev) * 1e6, 3),
            }
    nspb = [x["ns_per_byte"] for x in linear]
    return {
        "chunk_bytes": CHUNK,
        "corpus_cases": len(cases),
        "corpus_us_per_chunk": round(tot_s / tot_chunks * 1e6, 3),
        "corpus_mb_per_s": round(tot_bytes / tot_s / 1e6, 2),
        "corpus_stream_us_per_chunk": round(stream_s / stream_chunks * 1e6, 3)
        if stream_chunks
        else None,
        "corpus_stream_mb_per_s": round(stream_bytes / stream_s / 1e6, 2) if stream_s else None,
        "worst_case": max(per_case, key=lambda x: x["us_per_chunk"]),
        "sim_stream_us_per_120b_chunk": sim_chunked,
        "sim_stream_per_event": sim_events,
        "linearity": linear,
        "linearity_ns_per_byte_max_over_min": round(max(nspb) / min(nspb), 2),
        "per_case": per_case,
    }


# -- the stream callable, through the real hooks ------------------------------------------


async def _hooks_bench(chunk_sets: dict[str, list[bytes]], flows: int, tmp: Path) -> dict:
    from mitmproxy import hooks
    from mitmproxy.test import taddons, tflow, tutils

    from spendtap.proxy.addons import SpendtapAddons

    spendtap = SpendtapAddons()
    out: dict = {}
    asked = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # A set whose name ends in "_inject" is sent by a client that did not ask for usage:
    # spendtap injects it, and its callable filters what the upstream adds (the
    # simulator stream asked for usage, so it carries what an injected one would).
    unasked = {k: v for k, v in asked.items() if k != "stream_options"}

    async def maybe(x):
        if asyncio.iscoroutine(x):
            return await x
        return x

    with taddons.context(spendtap) as tctx:
        addon = tctx.master.addons.get("spendtap-metering")  # the flow hooks
        tctx.configure(
            addon, spendtap_db=str(tmp / "micro-ledger.db"), spendtap_metrics="",
            spendtap_commit_wait_ms=0, listen_host="127.0.0.1",
        )  # fmt: skip

        def new_flow(req_body: bytes):
            req = tutils.treq(
                method=b"POST", path=b"/v1/chat/completions", content=req_body,
                headers=((b"content-type", b"application/json"),
                         (b"x-helexa-account-id", b"bench-acct"),
                         (b"x-helexa-key-id", b"bench-key")),
            )  # fmt: skip
            return tflow.tflow(req=req)

        def new_response(f):
            f.response = tutils.tresp(
                status_code=200,
                headers=((b"content-type", b"text/event-stream; charset=utf-8"),
                         (b"transfer-encoding", b"chunked")),
                content=None,
            )  # fmt: skip

        # Per-request hook cost (request + responseheaders + response, no commit wait).
        t_hooks = 0.0
        n_hooks = 0
        for name, chunks in chunk_sets.items():
            per_call: list[float] = []
            baseline: list[float] = []

            def same(d):
                return d

            injected = name.endswith("_inject")
            req_body = json.dumps(unasked if injected else asked).encode()
            for i in range(flows):
                f = new_flow(req_body)
                t0 = clock()
                await maybe(addon.request(f))
                new_response(f)
                await maybe(addon.responseheaders(f))
                t1 = clock()
                cb = f.response.stream
                if not callable(cb):
                    raise RuntimeError("spendtap did not set a stream callable")
                if injected and getattr(cb, "__name__", "") != "on_chunk_filtered":
                    raise RuntimeError("spendtap did not inject usage for this request")
                gc_was = gc.isenabled()
                gc.disable()
                t = clock()
                for c in chunks:
                    cb(c)
                t_cb = clock() - t
                t = clock()
                for c in chunks:
                    same(c)
                t_same = clock() - t
                if gc_was:
                    gc.enable()
                cb(b"")
                f.response.timestamp_end = time.time()
                t2 = clock()
                await maybe(addon.response(f))
                t3 = clock()
                if i:  # the first flow warms caches
                    per_call.append(t_cb / len(chunks))
                    baseline.append(t_same / len(chunks))
                    if not injected:  # the request hook's rewrite is not in this figure
                        t_hooks += (t1 - t0) + (t3 - t2)
                        n_hooks += 1
            out[name] = {
                "chunks_per_flow": len(chunks),
                "avg_chunk_bytes": round(sum(map(len, chunks)) / len(chunks), 1),
                "us_per_call_p50": round(statistics.median(per_call) * 1e6, 3),
                "us_per_call_min": round(min(per_call) * 1e6, 3),
                "python_call_baseline_us": round(statistics.median(baseline) * 1e6, 3),
            }
        out["hooks_us_per_request"] = round(t_hooks / max(1, n_hooks) * 1e6, 1)
        # Every addon's done, in order: rows in flight, then the writer, then the rest.
        await tctx.master.addons.invoke_addon(spendtap, hooks.DoneHook())
    return out


def bench_on_chunk(quick: bool, tmp: Path) -> dict:
    body = sim_stream_body(64)
    sets = {
        "sim_events": sse_events(body),
        "sim_120b": split(body, CHUNK),
        "sim_events_inject": sse_events(body),
    }
    return asyncio.run(_hooks_bench(sets, 20 if quick else 200, tmp))


# -- ledger writer ---------------------------------------------------------------------------


def _row(i: int) -> dict:
    # The tests' full row (tests.helpers), with the figures of a typical streamed answer.
    return ledger_row(
        f"bench-{i:012d}",
        "2025-01-01T00:00:00.000Z",
        account="bench-acct",
        key="bench-key",
        model="sim-model",
        node="127.0.0.1:8000",
        prompt_tokens=8,
        completion_tokens=64,
        cached_tokens=0,
        cache_creation_tokens=None,
        reasoning_tokens=0,
        ttft_s=0.2,
        duration_s=1.46,
        tokens_per_s=50.0,
        error=None,
        response_bytes=17000,
    )


def bench_writer(quick: bool, tmp: Path) -> dict:
    import logging

    from spendtap.store.writer import LedgerWriter
    from spendtap.store.writer_process import ProcessLedgerWriter

    log = logging.getLogger("bench.writer")
    res: dict = {}

    # 1. Batched throughput: submit as fast as possible, then wait for all commits.
    n = 5000 if quick else 50000
    w = LedgerWriter(tmp / "writer-batch.db", logger=log)
    w.start()
    t0 = clock()
    for i in range(n):
        w.submit(_row(i))
    ok = w.flush(120)
    dt = clock() - t0
    res["batched"] = {
        "rows": n,
        "rows_per_s": round(n / dt),
        "flushed": ok,
        "batches": w.batches_written,
    }
    w.close(30)

    # 2. Durable: C concurrent "requests" each submit with on_commit and wait for it,
    # exactly as the response hook does (call_soon_threadsafe back to the event loop).
    async def durable(conc: int, seconds: float, process: bool = False, **kw) -> dict:
        tag = "-".join(f"{k}{v}" for k, v in kw.items()) + ("-process" if process else "")
        path = tmp / f"writer-durable-{conc}{tag}.db"
        loop = asyncio.get_running_loop()
        if process:
            # The sidecar's default: the writer process, acknowledged on the loop itself.
            w = ProcessLedgerWriter(path, logger=log)
            w.start(loop)
        else:
            w = LedgerWriter(path, logger=log, **kw)
            w.start()
        lat: list[float] = []
        counter = iter(range(10**9))
        stop = loop.time() + seconds

        def resolve(fut):
            if not fut.done():
                fut.set_result(None)

        async def one():
            while loop.time() < stop:
                fut = loop.create_future()
                t = clock()
                if process:
                    w.submit(_row(next(counter)), lambda fut=fut: resolve(fut))
                else:
                    w.submit(
                        _row(next(counter)),
                        lambda fut=fut: loop.call_soon_threadsafe(resolve, fut),
                    )
                await fut
                lat.append(clock() - t)

        t0 = clock()
        await asyncio.gather(*(one() for _ in range(conc)))
        dt = clock() - t0
        batches = w.batches_written
        w.close(30)
        lat.sort()
        return {
            "writer": "process" if process else "thread",
            "concurrency": conc,
            "rows_per_s": round(len(lat) / dt),
            "commit_wait_ms_p50": round(lat[len(lat) // 2] * 1e3, 3),
            "commit_wait_ms_p99": round(lat[int(len(lat) * 0.99)] * 1e3, 3),
            "rows_per_batch": round(len(lat) / max(1, batches), 1),
        }

    secs = 0.5 if quick else 2.0
    # The writer as the sidecar runs it: group commit (rows that arrive while a
    # commit is in progress share the next one), no batch-fill wait.
    res["durable"] = [asyncio.run(durable(c, secs)) for c in (1, 16, 64)]
    res["durable_process"] = [asyncio.run(durable(c, secs, process=True)) for c in (1, 16, 64)]
    return res


# -- budgets ---------------------------------------------------------------------------------


def bench_budget(quick: bool, tmp: Path) -> dict:
    """Reserve + settle latency against a budgeted key, as the sidecar does them.

    Reserve is ``Budgets.reserve`` (one BEGIN IMMEDIATE transaction); settle is the
    request's row landing through ``Ledger.insert_rows``, which deletes the
    reservation and adds the row's tokens to the budget in the same transaction.
    """
    from spendtap.store.budgets import Budgets, process_owner
    from spendtap.store.ledger import Ledger

    db = tmp / "budget-bench.db"
    budgets = Budgets(db)
    ledger = Ledger(db)
    budgets.set("key", "bench-key", 10**15, None)
    owner = process_owner()
    n = 300 if quick else 3000
    reserve, settle = [], []
    try:
        for i in range(n):
            row = {**_row(i), "key": "bench-key", "account": "bench"}
            t = clock()
            # As the gate asks: only for a principal it knows has a budget.
            d = budgets.reserve(row["id"], "bench", "bench-key", 500, owner, check_first=False)
            t1 = clock()
            ledger.insert_rows([row])
            t2 = clock()
            assert d.allowed and d.reservation_id == row["id"]
            reserve.append(t1 - t)
            settle.append(t2 - t1)
    finally:
        budgets.close()
        ledger.close()
    reserve.sort()
    settle.sort()

    def us(xs, q):
        return round(xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6, 1)

    return {
        "ops": n,
        "reserve_us_p50": us(reserve, 0.5),
        "reserve_us_p99": us(reserve, 0.99),
        "settle_us_p50": us(settle, 0.5),
        "settle_us_p99": us(settle, 0.99),
    }


def bench_central(quick: bool, tmp: Path) -> dict:
    """The fleet's store on loopback: reserve and settle latency, and shipping throughput.

    Reserve is ``CentralStore.reserve`` through the sidecar's connection pool (one
    PL/pgSQL round trip); settle is shipping the request's row (``CentralStore.ship``,
    one transaction). Shipping throughput is the shipper thread copying a local ledger of
    committed rows to PostgreSQL in batches, as a sidecar catching up after an outage.
    Needs Debian's PostgreSQL (``scripts/ci-deps.sh``); skipped without it.
    """
    from spendtap.store.budgets import process_owner
    from spendtap.store.central import CentralStore
    from spendtap.store.fleet import Shipper
    from spendtap.store.ledger import Ledger
    from tests.pg import PostgresServer, pg_bindir

    if pg_bindir() is None:
        return {"skipped": "PostgreSQL is not installed (scripts/ci-deps.sh installs it)"}
    server = PostgresServer()
    try:
        store = CentralStore(server.create_database(), pool_size=8)
        store.set("key", "bench-key", 10**15, None)
        owner = process_owner()
        n = 300 if quick else 3000
        reserve, settle = [], []
        for i in range(n):
            row = {**_row(i), "key": "bench-key", "account": "bench"}
            t = clock()
            d = store.reserve(row["id"], "bench", "bench-key", 500, owner, node_id="bench")
            t1 = clock()
            store.ship("bench", [(i + 1, row)], "bench")
            t2 = clock()
            assert d.allowed and d.reservation_id == row["id"]
            reserve.append(t1 - t)
            settle.append(t2 - t1)
        reserve.sort()
        settle.sort()
        rows = 2000 if quick else 20000
        db = tmp / "ship-bench.db"
        with Ledger(db) as ledger:
            ledger.insert_rows([{**_row(10**6 + i), "key": "k", "account": "a"}
                                for i in range(rows)])  # fmt: skip
        shipper = Shipper(str(db), store, node_id="ship-bench", owner=owner, interval_s=0.01)
        t = clock()
        shipper.start()
        while shipper.rows_shipped < rows and clock() - t < 120:
            time.sleep(0.005)
        elapsed = clock() - t
        shipper.close(5)
        store.close()
    finally:
        server.destroy()

    def ms(xs, q):
        return round(xs[min(len(xs) - 1, int(len(xs) * q))] * 1e3, 3)

    return {
        "ops": n,
        "reserve_ms_p50": ms(reserve, 0.5),
        "reserve_ms_p99": ms(reserve, 0.99),
        "settle_ms_p50": ms(settle, 0.5),
        "settle_ms_p99": ms(settle, 0.99),
        "ship_rows": rows,
        "ship_rows_per_s": round(rows / elapsed, 1),
    }


def run_all(quick: bool, log=print) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="spendtap-bench-micro-") as d:
        tmp = Path(d)
        for name, fn in (
            ("scanner", lambda: bench_scanner(quick)),
            ("on_chunk", lambda: bench_on_chunk(quick, tmp)),
            ("writer", lambda: bench_writer(quick, tmp)),
            ("budget", lambda: bench_budget(quick, tmp)),
            ("central", lambda: bench_central(quick, tmp)),
        ):
            t0 = clock()
            try:
                out[name] = fn()
            except Exception as e:  # one broken micro-benchmark must not sink the run
                out[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  micro {name}: {clock() - t0:.1f}s")
    return out
