"""What one request costs spendtap after the machine idled, against back to back.

    python -m bench.idle                      # gaps 0, 0.001, 0.01, 0.1, 0.5 s
    python -m bench.idle --gaps 0,0.5 --requests 20

At one request a second (``stream-paced-c1``) every request finds cold caches: the
vCPU ran other work, or nothing, in between. Two figures for each idle gap between
requests, each the median of ``--requests`` requests:

- the event loop's CPU for one streamed request through spendtap's real addons
  (mitmproxy's test harness, as ``tests/test_hooks_in_process.py`` loads them): the
  request, responseheaders and response hooks, the stream callable over the
  simulator's 32-token stream event by event, and the wait for the row's commit (the
  writer process's CPU is not in it);
- one ``Ledger.insert_rows`` of one row (the writer's commit: the row, its indexes and
  triggers, the WAL), in this process.

``time.thread_time`` of the calling thread: CPU, not wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.micro import sim_stream_body, sse_events


def _ts() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def request_cpu(gaps: list[float], requests: int) -> dict[float, float]:
    """Median loop CPU (µs) of one streamed request after each idle gap."""
    from tests.test_hooks_in_process import chat_flow, sidecar, sse_response

    events = sse_events(sim_stream_body(32))
    principal = ((b"x-helexa-account-id", b"acct"), (b"x-helexa-key-id", b"key"))

    async def one(s) -> None:
        flow = chat_flow(stream=True, headers=principal)
        await s.metering.request(flow)
        flow.response = sse_response()
        s.metering.responseheaders(flow)
        for event in events:
            flow.response.stream(event)
        flow.response.stream(b"")
        await s.metering.response(flow)

    async def go() -> dict[float, float]:
        out = {}
        async with sidecar(Path(tempfile.mkdtemp()), spendtap_enforce_budgets=False) as s:
            await s.running()
            for _ in range(50):  # warm up: imports, first rows, the writer process
                await one(s)
            for gap in gaps:
                spent = []
                for _ in range(requests):
                    if gap:
                        await asyncio.sleep(gap)
                    t = time.thread_time()
                    await one(s)
                    spent.append(time.thread_time() - t)
                out[gap] = statistics.median(spent) * 1e6
        return out

    return asyncio.run(go())


def insert_cpu(gaps: list[float], requests: int) -> dict[float, float]:
    """Median CPU (µs) of one ``insert_rows`` of one row after each idle gap."""
    from spendtap.store.ledger import Ledger, normalize_row
    from tests.helpers import ledger_row

    def row() -> dict:
        return normalize_row(
            ledger_row(uuid.uuid4().hex, ts=_ts(), account="acct", key="key",
                       model="sim-chat", prompt_tokens=10, completion_tokens=32)
        )  # fmt: skip

    ledger = Ledger(str(Path(tempfile.mkdtemp()) / "ledger.db"))
    try:
        for _ in range(20):
            ledger.insert_rows([row() for _ in range(100)], normalized=True)
        out = {}
        for gap in gaps:
            spent = []
            for _ in range(requests):
                r = row()
                if gap:
                    time.sleep(gap)
                t = time.thread_time()
                ledger.insert_rows([r], normalized=True)
                spent.append(time.thread_time() - t)
            out[gap] = statistics.median(spent) * 1e6
        return out
    finally:
        ledger.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n")[0])
    ap.add_argument("--gaps", default="0,0.001,0.01,0.1,0.5", help="idle seconds, comma list")
    ap.add_argument("--requests", type=int, default=15, help="requests a gap (median)")
    args = ap.parse_args()
    gaps = [float(g) for g in args.gaps.split(",")]
    hooks = request_cpu(gaps, args.requests)
    inserts = insert_cpu(gaps, args.requests)
    print(f"{'idle before each':>18} {'request, loop CPU':>18} {'one-row insert':>15}")
    for gap in gaps:
        print(f"{gap * 1000:>15.0f} ms {hooks[gap]:>15.0f} µs {inserts[gap]:>12.0f} µs")


if __name__ == "__main__":
    main()
