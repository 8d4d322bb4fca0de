"""``python -m bench [--quick] [--rounds N] [--peers litellm] [--targets ...]``.

Runs every (scenario, target) pair in turn, interleaved, for several rounds, and
reports the median over rounds of each figure. See the package docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import memory, micro, report
from bench.procs import (
    PYTHON,
    REPO,
    cpu_between,
    cpu_snapshot,
    hwm_kib,
    machine,
    reset_hwm,
)
from bench.targets import (
    ACCOUNT,
    KEY,
    MASTER_KEY,
    MODEL_PACED,
    MODEL_UNPACED,
    Target,
    budget_support,
    central_figures,
    metering_only_sets,
    start_litellm,
    start_mitmdump,
    start_sim,
    start_spendtap,
    start_spendtap_budget,
    start_spendtap_central,
)

RESULTS = Path(__file__).resolve().parent / "results"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    stream: bool
    paced: bool
    tokens: int
    warmup_s: float
    duration_s: float
    # False: the client does not ask for usage, so spendtap injects stream_options
    # upstream and filters the usage chunk out (what most real clients get).
    include_usage: bool = True
    # Each client waits a random 0..think_ms after a response before its next request
    # (0: back to back, and clients with the same pacing move in lockstep).
    think_ms: int = 0
    # Only these targets (empty: every one).
    only: tuple[str, ...] = ()

    def controls(self, ttft_ms: int, tps: int) -> dict[str, str]:
        h = {"x-sim-tokens": str(self.tokens)}
        if self.paced:
            h |= {"x-sim-ttft-ms": str(ttft_ms), "x-sim-tps": str(tps)}
        return h

    @property
    def model(self) -> str:
        return MODEL_PACED if self.paced else MODEL_UNPACED


OUT_OF_LOCKSTEP_TARGETS = (
    "direct", "mitmdump", "mitmdump-uvloop", "spendtap", "spendtap-budget", "spendtap-lean",
)  # fmt: skip


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [
            Scenario("stream-unpaced-c16", 16, True, False, 32, 0.2, 0.8),
            Scenario("stream-paced-c16", 16, True, True, 8, 0.3, 0.8),
            Scenario("json-c16", 16, False, False, 32, 0.2, 0.6),
        ]
    return [
        Scenario("stream-unpaced-c1", 1, True, False, 64, 0.4, 2.5),
        Scenario("stream-unpaced-c16", 16, True, False, 64, 0.4, 2.5),
        Scenario("stream-unpaced-c64", 64, True, False, 64, 0.5, 3.0),
        # One client at ~1.2 requests a second: 10 s for a dozen requests a round (3.5 s
        # gave four, and its CPU a request moved by ±15% between targets doing the same).
        Scenario("stream-paced-c1", 1, True, True, 32, 0.9, 10.0),
        Scenario("stream-paced-c16", 16, True, True, 32, 0.9, 3.5),
        Scenario("stream-paced-c64", 64, True, True, 32, 0.9, 3.5),
        Scenario("json-c16", 16, False, False, 64, 0.4, 2.5),
        # Issue 12's load: 200 events a response written back to back, no usage asked.
        Scenario("stream-inject-c16", 16, True, False, 200, 0.4, 2.5, include_usage=False),
        # The paced loads with the clients out of lockstep (bench/README.md, "The paced
        # TTFC excess with clients out of lockstep"): their TTFC beside the lockstep one.
        Scenario("stream-paced-c16-think50", 16, True, True, 32, 0.9, 3.5,
                 think_ms=50, only=OUT_OF_LOCKSTEP_TARGETS),
        Scenario("stream-paced-c64-think50", 64, True, True, 32, 0.9, 3.5,
                 think_ms=50, only=OUT_OF_LOCKSTEP_TARGETS),
    ]  # fmt: skip


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def measure(target: Target, upstream: Target, sc: Scenario, args) -> dict:
    """One load run against ``target``; the proxy's CPU is sampled between the marks."""
    body = {
        "model": sc.model,
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": sc.stream,
    }
    if sc.stream and sc.include_usage:
        body["stream_options"] = {"include_usage": True}
    headers = {
        "Authorization": f"Bearer {MASTER_KEY}",
        "x-helexa-account-id": ACCOUNT,
        "x-helexa-key-id": KEY,
        **sc.controls(args.ttft_ms, args.tps),
    }
    spec = {
        "mode": "load",
        "host": target.host,
        "port": target.port,
        "path": CHAT,
        "stream": sc.stream,
        "body": json.dumps(body),
        "headers": headers,
        "concurrency": sc.concurrency,
        "warmup_s": sc.warmup_s,
        "duration_s": sc.duration_s,
        "grace_s": 5.0,
        "first_event": 2,  # chat: the role preamble, then the first token
        "request_timeout_s": 30,
        "think_ms": sc.think_ms,
    }
    proxy_pids = [] if target is upstream else target.pids()
    up_pids = upstream.pids()
    p = subprocess.Popen(
        [PYTHON, "-m", "bench.loadgen", json.dumps(spec)],
        cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    cpu = {}
    result = None
    try:
        for line in p.stdout:
            if line.startswith("MARK start"):
                reset_hwm(proxy_pids)
                cpu["p0"], cpu["u0"] = cpu_snapshot(proxy_pids), cpu_snapshot(up_pids)
            elif line.startswith("MARK end"):
                cpu["p1"], cpu["u1"] = cpu_snapshot(proxy_pids), cpu_snapshot(up_pids)
                cpu["hwm"] = hwm_kib(proxy_pids)
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if result is None:
        raise RuntimeError(f"load generator failed: {p.stderr.read()[-1000:]}")
    samples = result.pop("samples")
    ttfb = [s[0] for s in samples if s[0] is not None]
    ttfc = [s[1] for s in samples if s[1] is not None]
    e2e = [s[2] for s in samples]
    w = result["window_s"]
    events = result["events"]
    proxy_cpu = cpu_between(cpu["p0"], cpu["p1"]) if proxy_pids else None
    up_cpu = cpu_between(cpu["u0"], cpu["u1"])
    return {
        "target": target.name,
        "scenario": sc.name,
        "requests": len(samples),
        "completed_in_window": result["completed"],
        "errors": result["errors"] + result["bad_status"],
        "error_samples": result["error_samples"],
        "rps": result["completed"] / w,
        "chunks_per_s": events / w,
        "ttfb_p50_ms": _ms(percentile(ttfb, 0.5)),
        "ttfc_p50_ms": _ms(percentile(ttfc, 0.5)),
        "ttfc_p99_ms": _ms(percentile(ttfc, 0.99)),
        "e2e_p50_ms": _ms(percentile(e2e, 0.5)),
        "e2e_p99_ms": _ms(percentile(e2e, 0.99)),
        "proxy_cpu_s": proxy_cpu,
        "proxy_cpu_frac": proxy_cpu / w if proxy_cpu is not None else None,
        "cpu_s_per_1k_chunks": proxy_cpu / events * 1000
        if proxy_cpu is not None and events
        else None,
        "cpu_ms_per_req": proxy_cpu / result["completed"] * 1000
        if proxy_cpu is not None and result["completed"]
        else None,
        "upstream_cpu_frac": up_cpu / w,
        "peak_rss_mib": cpu["hwm"] / 1024 if proxy_pids else None,
        "lg_cpu_frac": result["lg_cpu_frac"],
        "window_s": w,
    }


def measure_central(target: Target, upstream: Target, sc: Scenario, args) -> dict:
    """``measure``, plus the shipping figures: the worst lag and backlog seen during the
    load (sampled every 0.1 s), the time to drain once it ends, and rows shipped per second
    over load and drain."""
    samples: list[dict[str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            with contextlib.suppress(Exception):
                samples.append(central_figures(target))

    before = central_figures(target)
    started = time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = measure(target, upstream, sc, args)
    finally:
        stop.set()
        sampler.join()
    ended = time.monotonic()
    after = central_figures(target)
    while after.get("backlog_rows", 0) > 0 and time.monotonic() - ended < 30:
        time.sleep(0.05)
        after = central_figures(target)
    drained = time.monotonic()
    shipped = after.get("rows_shipped_total", 0) - before.get("rows_shipped_total", 0)
    r["central"] = {
        "rows_shipped": int(shipped),
        "ship_rows_per_s": round(shipped / max(1e-9, drained - started), 1),
        "lag_max_s": round(max((x.get("lag_seconds", 0) for x in samples), default=0), 3),
        "backlog_max_rows": int(max((x.get("backlog_rows", 0) for x in samples), default=0)),
        "drain_s": round(drained - ended, 3),
        "backlog_after": int(after.get("backlog_rows", 0)),
        "ship_errors": int(after.get("ship_errors_total", 0) - before.get("ship_errors_total", 0)),
    }
    return r


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def summarize(runs: list[dict]) -> dict:
    """Median over rounds of every figure, per (scenario, target); TTFC excess per round."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        by.setdefault((r["scenario"], r["target"]), []).append(r)
    # TTFC excess over direct, computed within each round (interleaved => same conditions).
    direct = {(r["scenario"], r["round"]): r for r in runs if r["target"] == "direct"}
    for r in runs:
        d = direct.get((r["scenario"], r["round"]))
        k = "ttfb_p50_ms"
        r["ttfb_excess_p50_ms"] = (
            r[k] - d[k] if d and r.get(k) is not None and d.get(k) is not None else None
        )
        for q in ("p50", "p99"):
            k = f"ttfc_{q}_ms"
            r[f"ttfc_excess_{q}_ms"] = (
                r[k] - d[k] if d and r[k] is not None and d[k] is not None else None
            )
            k = f"e2e_{q}_ms"
            r[f"e2e_excess_{q}_ms"] = (
                r[k] - d[k] if d and r[k] is not None and d[k] is not None else None
            )
    out: dict = {}
    for (sc, tg), rs in by.items():
        med: dict = {"rounds": len(rs)}
        for k in rs[0]:
            vals = [
                r[k]
                for r in rs
                if isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool)
            ]
            if vals and k not in ("round",):
                med[k] = statistics.median(vals)
        med["errors"] = sum(r["errors"] for r in rs)
        out.setdefault(sc, {})[tg] = med
    return out


def _versions() -> dict:
    v = {"python": platform.python_version()}
    with contextlib.suppress(Exception):
        import mitmproxy.version

        v["mitmproxy"] = mitmproxy.version.VERSION
    with contextlib.suppress(Exception):
        v["spendtap_git"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    return v


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round (~1 min)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    ap.add_argument(
        "--peers",
        default=os.environ.get("PEERS", ""),
        help="comma list of peer proxies to add: litellm (env PEERS)",
    )
    ap.add_argument(
        "--targets",
        default="",
        help="comma list to run instead of the default set (direct,mitmdump,mitmdump-uvloop,"
        "spendtap,spendtap-asyncio,spendtap-lean,spendtap-nowait,spendtap-budget[,litellm]); "
        "mitmdump-cb is opt-in",
    )
    ap.add_argument("--scenarios", default="", help="comma list of scenario names to keep")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: load,micro,memory")
    ap.add_argument("--ttft-ms", type=int, default=200, help="paced time to first token")
    ap.add_argument("--tps", type=int, default=50, help="paced decode rate, tokens/s")
    ap.add_argument("--streams", type=int, help="idle streams for the memory check (500)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    ap.add_argument(
        "--hold",
        action="store_true",
        help="after the load phase, keep the targets up until Enter (to profile)",
    )
    return ap.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    rounds = args.rounds or (1 if args.quick else 3)
    skip = {s for s in args.skip.split(",") if s}
    peers = {s for s in args.peers.split(",") if s}
    wanted = [s for s in args.targets.split(",") if s] or None

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_begin:6.1f}s] {msg}", flush=True)

    tmpdir = tempfile.mkdtemp(prefix="spendtap-bench-")
    log_dir = Path(tmpdir)
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "versions": _versions(),
        "config": {
            "quick": args.quick,
            "rounds": rounds,
            "ttft_ms": args.ttft_ms,
            "tps": args.tps,
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "notes": [],
        "targets": {},
    }
    targets: list[Target] = []
    try:
        sim = start_sim(log_dir)
        targets.append(sim)
        log(f"simulator on {sim.url}")

        def want(name: str, default: bool = True) -> bool:
            return name in wanted if wanted else default

        if want("mitmdump"):
            targets.append(start_mitmdump(sim.url, log_dir))
        if want("mitmdump-uvloop"):
            # mitmproxy itself on the loop spendtap run picks: what the loop alone gives.
            targets.append(start_mitmdump(sim.url, log_dir, event_loop="uvloop"))
        if want("lean-bare", default=False):
            from bench.targets import start_lean_bare

            targets.append(start_lean_bare(sim.url, log_dir))
        if want("mitmdump-cb", default=False):
            targets.append(start_mitmdump(sim.url, log_dir, callable_stream=True))
        if want("spendtap"):
            sets = metering_only_sets()
            if sets:
                results["notes"].append(f"spendtap (metering only): --set {' '.join(sets)}")
            targets.append(start_spendtap(sim.url, log_dir, sets))
        if want("spendtap-asyncio"):
            # The same on mitmdump's own asyncio loop (spendtap run --event-loop asyncio):
            # the difference is what uvloop's loop saves.
            sets = metering_only_sets()
            targets.append(start_spendtap(sim.url, log_dir, sets, name="spendtap-asyncio",
                                          event_loop="asyncio"))  # fmt: skip
        if want("spendtap-lean"):
            # The same addon through the lean runner (spendtap run --runner lean).
            sets = metering_only_sets()
            targets.append(start_spendtap(sim.url, log_dir, sets, name="spendtap-lean",
                                          runner="lean"))  # fmt: skip
        if want("spendtap-nowait"):
            # The same without the durable commit wait: the difference is its cost.
            sets = [*metering_only_sets(), "spendtap_commit_wait_ms=0"]
            targets.append(start_spendtap(sim.url, log_dir, sets, name="spendtap-nowait"))
        if want("spendtap-budget"):
            ok, note, extra = budget_support(log_dir)
            if ok:
                try:
                    targets.append(start_spendtap_budget(sim.url, log_dir, extra))
                    results["notes"].append(f"spendtap-budget: {note}")
                except Exception as e:
                    results["notes"].append(f"spendtap-budget skipped: {e}")
            else:
                results["notes"].append(f"spendtap-budget skipped: {note}")
        if want("spendtap-central"):
            ok, note, extra = budget_support(log_dir)
            try:
                if not ok:
                    raise RuntimeError(note)
                targets.append(start_spendtap_central(sim.url, log_dir, extra))
                results["notes"].append(
                    "spendtap-central: budgets enforced through PostgreSQL on loopback "
                    "(proxy CPU excludes PostgreSQL's)"
                )
            except Exception as e:
                results["notes"].append(f"spendtap-central skipped: {e}")
        if "litellm" in peers or (wanted and "litellm" in wanted):
            try:
                from bench.peers import ensure_litellm

                exe, version = ensure_litellm(log)
                sc_list = scenarios(args.quick)
                controls = {}
                for sc in sc_list:
                    controls.setdefault(sc.model, {}).update(sc.controls(args.ttft_ms, args.tps))
                if len({tuple(sorted(sc.controls(args.ttft_ms, args.tps).items()))
                        for sc in sc_list if sc.model == MODEL_UNPACED}) > 1:  # fmt: skip
                    results["notes"].append(
                        "litellm: unpaced scenarios differ in tokens; the model entry carries "
                        "the last one's x-sim-tokens"
                    )
                log(f"starting litellm {version} ...")
                targets.append(start_litellm(exe, sim.url, log_dir, controls, version))
                results["versions"]["litellm"] = version
            except Exception as e:
                results["notes"].append(f"litellm skipped: {type(e).__name__}: {e}")
                log(f"litellm skipped: {e}")
        if wanted and "direct" not in wanted:
            # direct is still measured: every excess figure is relative to it
            results["notes"].append("direct kept: excess figures need it")
        for note in results["notes"]:
            log(note)
        for t in targets:
            results["targets"][t.name] = {"url": t.url, "command": t.note}
        log("targets: " + ", ".join(t.name for t in targets))

        # -- load --------------------------------------------------------------------------
        runs: list[dict] = []
        if "load" not in skip:
            scs = scenarios(args.quick)
            if args.scenarios:
                keep = set(args.scenarios.split(","))
                scs = [s for s in scs if s.name in keep]
            # LiteLLM's model entry fixes x-sim-tokens per pacing: keep unpaced tokens equal.
            for rnd in range(rounds):
                for sc in scs:
                    order = targets if rnd % 2 == 0 else [targets[0], *reversed(targets[1:])]
                    for t in order:
                        if not all(x.alive() for x in t.procs):
                            continue
                        if sc.only and t.name not in sc.only:
                            continue
                        try:
                            if t.name == "spendtap-central":
                                r = measure_central(t, sim, sc, args)
                            else:
                                r = measure(t, sim, sc, args)
                        except Exception as e:
                            log(f"  {sc.name} {t.name}: FAILED {e}")
                            results["notes"].append(f"{sc.name} {t.name} round {rnd}: {e}")
                            continue
                        r["round"] = rnd
                        runs.append(r)
                        log(
                            f"  r{rnd} {sc.name:20s} {t.name:16s} {r['rps']:8.1f} req/s "
                            f"{r['chunks_per_s']:9.0f} ch/s ttfc50 {_f(r['ttfc_p50_ms'])} "
                            f"e2e50 {_f(r['e2e_p50_ms'])} cpu/1k {_f(r['cpu_s_per_1k_chunks'], 4)}"
                            f" err {r['errors']}"
                        )
            results["runs"] = runs
            results["summary"] = summarize(runs)
            shipping: dict[str, list] = {}
            for r in runs:
                if "central" in r:
                    shipping.setdefault(r["scenario"], []).append(r["central"])
            if shipping:
                results["central_shipping"] = shipping
        if args.hold:
            log(
                "holding the targets up; press Enter to continue: "
                + ", ".join(f"{t.name}={t.url} pid {t.procs[0].pid}" for t in targets)
            )
            sys.stdin.readline()

        # -- memory ------------------------------------------------------------------------
        if "memory" not in skip:
            mem_targets = [t for t in targets if t.name in ("mitmdump", "mitmdump-cb", "spendtap")]
            streams = args.streams or (50 if args.quick else 500)
            sizes = (2 << 20, 20 << 20) if args.quick else (20 << 20, 200 << 20)
            log(
                f"memory: {streams} idle streams, responses of {sizes[0] >> 20} and "
                f"{sizes[1] >> 20} MiB"
            )
            results["memory"] = memory.run(mem_targets, streams, sizes, log)

        # -- micro -------------------------------------------------------------------------
        if "micro" not in skip:
            log("micro-benchmarks ...")
            results["micro"] = micro.run_all(args.quick, log)

        for t in targets:
            if t.name == "spendtap-budget" and runs:
                from bench.targets import budget_charged

                shown = budget_charged(Path(tmpdir) / "spendtap-budget-ledger.db")
                results["budget_after_load"] = shown
                spent = shown.get("spent") if isinstance(shown, dict) else None
                if not spent:
                    results["notes"].append(
                        f"spendtap-budget: the key's budget shows no spend after the load "
                        f"({shown}); the addon does not enforce budgets yet, so this target "
                        "measured spendtap with a budget row only"
                    )
        for t in targets:
            if not all(p.alive() for p in t.procs):
                results["notes"].append(f"{t.name} died during the run:\n{t.procs[0].tail()}")
    finally:
        for t in reversed(targets):
            t.stop()
        if not args.keep_logs:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
        else:
            results["notes"].append(f"logs kept in {tmpdir}")

    results["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"bench-{'quick-' if args.quick else ''}{stamp}.json"
    path = args.results_dir / name
    # The raw results first: a minutes-long run must never be lost to a report bug.
    path.write_text(json.dumps(results, indent=1, default=str))
    return _report(results, path)


def _report(results: dict, path) -> int:
    results["verdicts"] = report.verdicts(results)
    path.write_text(json.dumps(results, indent=1, default=str))
    text = report.render(results)
    print(text)
    (path.parent / "latest.txt").write_text(text + "\n")
    print(f"raw results: {path}")
    return 0


def _f(x, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"
