"""Do the clients of a paced scenario send their requests in bursts, and what does a
request's place in its burst cost its time to first token?

    python -m bench.bursts [--scenario stream-paced-c16] [--seconds 8] [--rounds 2]
    python -m bench.bursts --scenario stream-paced-c64 --think-ms 50   # out of lockstep
    python -m bench.bursts --scenario stream-paced-c64 --from-start --seconds 30 \
        --targets mitmdump,mitmdump-cb,spendtap    # how long the synchronized start lasts
    git worktree add /tmp/before HEAD~1
    python -m bench.bursts --targets mitmdump,spendtap --other before=/tmp/before

For bare mitmdump, spendtap, spendtap without the commit wait (``spendtap-nowait``) and
the lean runner, each fronting one simulator: every request's send time (from the load
generator), grouped into bursts (sent within ``--gap-ms`` of the previous one), and the
median TTFC by position in the burst; the TTFC p50 (less direct's) by when the request was
sent, in windows since the clients started (all at once, as in ``make bench``, whose paced
window is 0.9 to 4.4 s; with ``--from-start`` the load has no warm-up); and how long the
sidecars' response ends waited for their rows (their commit-wait histograms).
In a closed loop each client sends its next request as soon as its response ends: a
group commit that released all the responses of a batch at once re-aligned the clients
every cycle (``spendtap.store.commits`` now releases them with the spacing they ended with).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.main import CHAT, scenarios
from bench.procs import PYTHON, REPO
from bench.targets import (
    ACCOUNT,
    KEY,
    MASTER_KEY,
    start_mitmdump,
    start_sim,
    start_spendtap,
    start_spendtap_budget,
)


def load(target, sc, ttft_ms=200, tps=50, think_ms=0.0) -> list:
    body = {"model": sc.model, "messages": [{"role": "user", "content": "Say hello"}],
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    spec = {
        "mode": "load", "host": target.host, "port": target.port, "path": CHAT,
        "stream": True, "body": json.dumps(body),
        "headers": {"Authorization": f"Bearer {MASTER_KEY}", "x-helexa-account-id": ACCOUNT,
                    "x-helexa-key-id": KEY, **sc.controls(ttft_ms, tps)},
        "concurrency": sc.concurrency, "warmup_s": sc.warmup_s, "duration_s": sc.duration_s,
        "grace_s": 5.0, "first_event": 2, "request_timeout_s": 30, "think_ms": think_ms,
    }  # fmt: skip
    out = subprocess.run([PYTHON, "-m", "bench.loadgen", json.dumps(spec)], cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])["samples"]


# Windows of send time since the load started (s): make bench's paced window is 0.9-4.4 s.
WINDOW_EDGES = (0.0, 0.9, 1.8, 2.7, 3.6, 4.4, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)


def by_window(samples: list) -> dict[str, float]:
    """TTFC p50 (ms) of the requests sent in each window since the load started."""
    out = {}
    for lo, hi in itertools.pairwise(WINDOW_EDGES):
        ttfc = [s[1] for s in samples if s[1] is not None and lo <= s[5] < hi]
        if ttfc:
            out[f"{lo:g}-{hi:g}"] = round(statistics.median(ttfc) * 1000, 2)
    return out


def bursts(samples: list, gap_s: float) -> dict:
    rows = sorted((s[5], s[1]) for s in samples if s[1] is not None)
    groups: list[list[float]] = []
    last = None
    for sent, ttfc in rows:
        if last is None or sent - last > gap_s:
            groups.append([])
        groups[-1].append(ttfc)
        last = sent
    sizes = [len(g) for g in groups]
    by_pos: dict[int, list[float]] = {}
    for g in groups:
        for i, t in enumerate(g):
            by_pos.setdefault(i, []).append(t)
    return {
        "requests": len(rows),
        "bursts": len(groups),
        # the size of the burst an average request was sent in
        "burst_size_per_request": round(sum(n * n for n in sizes) / max(1, sum(sizes)), 2),
        "largest": max(sizes, default=0),
        "ttfc_p50_ms": round(statistics.median(t for _, t in rows) * 1000, 2),
        "end_p50_ms": round(statistics.median(s[2] for s in samples) * 1000, 2),
        "ttfc_p50_by_position_ms": {
            i: round(statistics.median(v) * 1000, 2) for i, v in sorted(by_pos.items()) if i < 16
        },
        "ttfc_p50_by_window_ms": by_window(samples),
    }


def commit_waits(target) -> dict:
    """The share of the sidecar's response ends that waited at most 1, 2 and 5 ms for
    their rows (its ``ledger_commit_wait_seconds`` histogram, scraped)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{target.metrics_port}/metrics", timeout=5).text
    buckets = {
        s.labels["le"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name.endswith("_ledger_commit_wait_seconds")
        for s in family.samples
        if s.name.endswith("_bucket")
    }
    total = buckets.get("+Inf", 0.0)
    if not total:
        return {"waits": 0}
    out: dict = {"waits": int(total)}
    for le, label in (("0.001", "<=1ms"), ("0.002", "<=2ms"), ("0.005", "<=5ms")):
        out[label] = f"{100 * buckets.get(le, 0.0) / total:.1f}%"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bursts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--scenario", default="stream-paced-c16")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gap-ms", type=float, default=1.0)
    ap.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="each client waits a random 0..MS between a response's end and "
        "its next request (out of lockstep; 0: back to back, as make bench)",
    )
    ap.add_argument(
        "--from-start",
        action="store_true",
        help="no warm-up: also the TTFC excess by window of time since the clients started",
    )
    ap.add_argument("--targets", default="mitmdump,spendtap,spendtap-nowait,spendtap-lean")
    ap.add_argument(
        "--switch-ms", type=float, action="append", default=[],
        help="also spendtap with sys.setswitchinterval(MS/1000) (the GIL hand-off interval; "
        "Python's default is 5 ms), set through a sitecustomize on PYTHONPATH; repeatable",
    )  # fmt: skip
    ap.add_argument(
        "--other", action="append", default=[], metavar="NAME=DIR",
        help="also spendtap as another checkout has it (DIR/addon imported as spendtap through "
        "PYTHONPATH; e.g. `git worktree add DIR COMMIT` for a before/after), named NAME; "
        "repeatable",
    )  # fmt: skip
    args = ap.parse_args(argv)
    sc = next(s for s in scenarios(False) if s.name == args.scenario)
    sc = replace(sc, duration_s=args.seconds)
    if args.from_start:
        sc = replace(sc, warmup_s=0.0)
    tmp = Path(tempfile.mkdtemp(prefix="spendtap-bursts-"))
    sim = start_sim(tmp)
    wanted = set(args.targets.split(","))
    targets = [sim]
    sets = ["spendtap_enforce_budgets=false"]
    if "mitmdump" in wanted:
        targets.append(start_mitmdump(sim.url, tmp))
    if "mitmdump-uvloop" in wanted:
        targets.append(start_mitmdump(sim.url, tmp, event_loop="uvloop"))
    if "mitmdump-cb" in wanted:
        targets.append(start_mitmdump(sim.url, tmp, callable_stream=True))
    if "spendtap" in wanted:
        targets.append(start_spendtap(sim.url, tmp, sets))
    if "spendtap-nowait" in wanted:
        targets.append(start_spendtap(sim.url, tmp, [*sets, "spendtap_commit_wait_ms=0"],
                                      name="spendtap-nowait"))  # fmt: skip
    if "spendtap-budget" in wanted:
        # Every request reserves and settles against a cap no run reaches.
        targets.append(start_spendtap_budget(sim.url, tmp, ["spendtap_enforce_budgets=true"]))
    if "spendtap-lean" in wanted:
        targets.append(start_spendtap(sim.url, tmp, sets, name="spendtap-lean", runner="lean"))
    for spec in args.other:
        name, _, tree = spec.partition("=")
        code = Path(tree).resolve() / "addon"
        if not name or not (code / "proxy" / "hooks.py").is_file():
            ap.error(f"--other {spec}: want NAME=DIR, DIR a spendtap checkout")
        pkg = tmp / f"other-{name}"
        pkg.mkdir()
        (pkg / "spendtap").symlink_to(code)
        targets.append(start_spendtap(sim.url, tmp, sets, name=name,
                                      env={"PYTHONPATH": str(pkg)}))  # fmt: skip
    for ms in args.switch_ms:
        site = tmp / f"switch-{ms}"
        site.mkdir()
        code = f"import sys\nsys.setswitchinterval({ms / 1000!r})\n"
        (site / "sitecustomize.py").write_text(code)
        targets.append(start_spendtap(sim.url, tmp, sets, name=f"spendtap-switch{ms:g}ms",
                                      env={"PYTHONPATH": str(site)}))  # fmt: skip
    results: dict[str, list] = {}
    waits: dict[str, dict] = {}
    try:
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else [targets[0], *reversed(targets[1:])]
            for t in order:
                b = bursts(load(t, sc, think_ms=args.think_ms), args.gap_ms / 1000)
                results.setdefault(t.name, []).append(b)
                print(f"r{rnd} {t.name:16s} {json.dumps(b)}", flush=True)
        for t in targets:
            if t.metrics_port is not None:
                waits[t.name] = commit_waits(t)
    finally:
        for t in reversed(targets):
            t.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nmedians over rounds (+TTFC: each round's TTFC p50 less direct's, as make bench):")
    direct = [r["ttfc_p50_ms"] for r in results.get(targets[0].name, [])]
    for name, rs in results.items():
        size = statistics.median(r["burst_size_per_request"] for r in rs)
        excess = statistics.median(r["ttfc_p50_ms"] - d for r, d in zip(rs, direct, strict=True))
        print(f"{name:16s} burst size per request {size:5.2f}"
              f"  TTFC p50 {statistics.median(r['ttfc_p50_ms'] for r in rs):7.2f} ms"
              f"  +TTFC {excess:6.2f} ms"
              f"  end p50 {statistics.median(r['end_p50_ms'] for r in rs):7.2f} ms"
              f"  requests {statistics.median(r['requests'] for r in rs)}"
              f"  by position: {rs[-1]['ttfc_p50_by_position_ms']}")  # fmt: skip
    if waits:
        print(
            "\nhow long the ends of responses waited for their rows (the sidecar's "
            "ledger_commit_wait_seconds over the whole run, warm-ups included):"
        )
        for name, w in waits.items():
            print(f"{name:16s} " + "  ".join(f"{k} {v}" for k, v in w.items()))
    print(
        "\n+TTFC p50 (ms) by window of send time since the clients started (s), each "
        "round's less direct's, medians over rounds (make bench's window: 0.9-4.4 s):"
    )
    d_rounds = results.get(targets[0].name, [])
    windows = list(d_rounds[0]["ttfc_p50_by_window_ms"]) if d_rounds else []
    print(f"{'':16s} " + " ".join(f"{w:>9s}" for w in windows))
    for name, rs in results.items():
        cells = []
        for w in windows:
            got = [r["ttfc_p50_by_window_ms"].get(w) for r in rs]
            ref = [d["ttfc_p50_by_window_ms"].get(w) for d in d_rounds]
            pairs = zip(got, ref, strict=True)
            diffs = [a - b for a, b in pairs if a is not None and b is not None]
            cells.append(f"{statistics.median(diffs):9.2f}" if diffs else f"{'-':>9s}")
        print(f"{name:16s} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
