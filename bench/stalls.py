"""How long the proxy's event loop stops, and what the collector's full passes have to
do with it.

    python -m bench.stalls                      # stream-paced-c64, 3 rounds of 30 s
    python -m bench.stalls --scenario stream-paced-c16 --seconds 20 --rounds 2

Bare mitmdump, spendtap with ``spendtap_gc_freeze=false`` (the collector walks the whole
heap) and spendtap as it starts by default (the start-up heap frozen), each fronting one
simulator, under a paced scenario. Each proxy process runs two probes, loaded through a
``sitecustomize`` on ``PYTHONPATH`` (the bench's, not the product's): ``gc.callbacks``
time every collection by generation, and a callback the event loop schedules every
5 ms notes how late it runs (a late wake-up is the loop stopped: a collection, a long
iteration). For each target the table gives, over the load's rounds: the full passes
(generation 2) and the longest; the loop's late wake-ups over 10 ms and the longest;
TTFC p50 less direct's, p99 and the worst; the ratio of the longest stop to bare
mitmdump's. A round is long enough to hold a full pass (one every half a minute or so
at c64).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.bursts import load
from bench.main import percentile, scenarios
from bench.targets import start_mitmdump, start_sim, start_spendtap

# The probes: written into the run's temporary folder, loaded by every process started
# with it on PYTHONPATH (the ledger writer's child too: its figures are kept apart).
PROBE = r"""
import gc, json, os, sys, threading, time

_OUT = os.environ.get("SPENDTAP_BENCH_STALLS")
if _OUT:
    _passes = []   # (wall time, generation, seconds)
    _lates = []    # (wall time, seconds late)
    _started = [0.0]

    def _on_gc(phase, info):
        if phase == "start":
            _started[0] = time.perf_counter()
        else:
            _passes.append((time.time(), info["generation"], time.perf_counter() - _started[0]))

    gc.callbacks.append(_on_gc)

    def _running_loop():
        # The main thread's frames hold the loop (asyncio.run's runner, mitmproxy's
        # master): found there, not through gc.get_objects(), which skips a frozen heap.
        import asyncio
        main = threading.main_thread().ident
        frame = sys._current_frames().get(main)
        while frame is not None:
            for value in list(frame.f_locals.values()):
                for c in (value, getattr(value, "_loop", None), getattr(value, "loop", None)):
                    if isinstance(c, asyncio.AbstractEventLoop) and c.is_running():
                        return c
            frame = frame.f_back
        return None

    def _probe():
        loop = None
        while loop is None:
            time.sleep(0.5)
            loop = _running_loop()
        due = [0.0]

        def tick():
            now = time.perf_counter()
            late = now - due[0]
            if late > 0.002:
                _lates.append((time.time(), late))
            due[0] = now + 0.005
            loop.call_later(0.005, tick)

        def start():
            due[0] = time.perf_counter() + 0.005
            loop.call_later(0.005, tick)

        loop.call_soon_threadsafe(start)

    def _dump():
        while True:
            time.sleep(1)
            tmp = f"{_OUT}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"argv": sys.argv[:1], "passes": list(_passes), "lates": list(_lates),
                           "frozen": gc.get_freeze_count()}, f)
            os.replace(tmp, f"{_OUT}.{os.getpid()}.json")

    if "-c" not in sys.argv[:1]:  # not the ledger writer's child (python -c ...)
        threading.Thread(target=_probe, daemon=True).start()
    threading.Thread(target=_dump, daemon=True).start()
"""


def _probe_env(tmp: Path, name: str) -> dict:
    return {"PYTHONPATH": str(tmp / "probe"), "SPENDTAP_BENCH_STALLS": str(tmp / name)}


def _readings(tmp: Path, name: str, since: float, until: float) -> dict:
    """The proxy process's collections and late wake-ups between ``since`` and ``until``."""
    passes, lates, frozen = [], [], 0
    for path in tmp.glob(f"{name}.*.json"):
        data = json.loads(path.read_text())
        if data["argv"] == ["-c"]:
            continue  # the ledger writer's child: not the event loop's process
        passes += [p for p in data["passes"] if since <= p[0] <= until]
        lates += [late for t, late in data["lates"] if since <= t <= until]
        frozen = max(frozen, data["frozen"])
    full = [p[2] for p in passes if p[1] == 2]
    return {"full": full, "lates": lates, "frozen": frozen}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stalls", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--scenario", default="stream-paced-c64")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    sc = next(s for s in scenarios(False) if s.name == args.scenario)
    sc = replace(sc, duration_s=args.seconds)
    tmp = Path(tempfile.mkdtemp(prefix="spendtap-stalls-"))
    (tmp / "probe").mkdir()
    (tmp / "probe" / "sitecustomize.py").write_text(PROBE)
    sim = start_sim(tmp)
    sets = ["spendtap_enforce_budgets=false"]
    targets = [
        start_mitmdump(sim.url, tmp, env=_probe_env(tmp, "mitmdump")),
        start_spendtap(sim.url, tmp, [*sets, "spendtap_gc_freeze=false"],
                       name="spendtap-unfrozen", env=_probe_env(tmp, "spendtap-unfrozen")),
        start_spendtap(sim.url, tmp, sets, env=_probe_env(tmp, "spendtap")),
    ]  # fmt: skip
    time.sleep(3)  # the probes find their loops
    seen: dict[str, dict] = {}
    try:
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else targets[::-1]
            direct = load(sim, sc)
            direct_p50 = statistics.median(s[1] for s in direct if s[1] is not None)
            for t in order:
                since = time.time()
                samples = load(t, sc)
                until = time.time()
                time.sleep(1.5)  # the probes' last second written
                got = _readings(tmp, t.name, since, until)
                ttfc = [s[1] for s in samples if s[1] is not None]
                acc = seen.setdefault(t.name, {"full": [], "lates": [], "excess": [],
                                               "ttfc": [], "frozen": 0})  # fmt: skip
                acc["full"] += got["full"]
                acc["lates"] += got["lates"]
                acc["frozen"] = max(acc["frozen"], got["frozen"])
                acc["ttfc"] += ttfc
                acc["excess"].append(statistics.median(ttfc) - direct_p50)
                longest = max(got["lates"], default=0) * 1000
                print(f"r{rnd} {t.name:18s} full passes {len(got['full'])}"
                      f" (longest {max(got['full'], default=0) * 1000:.1f} ms)"
                      f"  longest stop {longest:.1f} ms"
                      f"  +TTFC p50 {acc['excess'][-1] * 1000:.2f} ms", flush=True)  # fmt: skip
    finally:
        for t in reversed(targets):
            t.stop()
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    base = max(seen["mitmdump"]["lates"], default=0) or float("nan")
    print(f"\n{args.scenario}, {args.rounds} rounds of {args.seconds:g} s (TTFC and stops"
          " in ms; a stop: the loop's 5 ms callback late by over 10 ms)\n")  # fmt: skip
    print(
        "| target | frozen objects | full passes | longest pass | stops > 10 ms | longest stop"
        " | longest stop / mitmdump's | +TTFC p50 | TTFC p99 | TTFC max |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, a in seen.items():
        longest = max(a["lates"], default=0)
        stops = sum(1 for x in a["lates"] if x > 0.01)
        p99 = percentile(a["ttfc"], 0.99)
        print(f"| {name} | {a['frozen']:,} | {len(a['full'])}"
              f" | {max(a['full'], default=0) * 1000:.1f} | {stops}"
              f" | {longest * 1000:.1f} | {longest / base:.2f} "
              f"| {statistics.median(a['excess']) * 1000:+.2f} | {p99 * 1000:.1f}"
              f" | {max(a['ttfc']) * 1000:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
