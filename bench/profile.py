"""Profile a target's process under one load scenario with py-spy (sampling, no changes).

    python -m bench.profile --target spendtap --scenario stream-unpaced-c64 --seconds 15

Writes the collapsed stacks (``*.folded``, for flamegraph tools / speedscope) under
``bench/results/`` and prints where the time goes: self time per function, and
inclusive time of the frames that matter (spendtap's modules, mitmproxy's layers, the
stream callable, the ledger writer thread). Needs ``py-spy`` (``pip install py-spy``)
and ptrace permission on the child (root, or ``kernel.yama.ptrace_scope=0``). Each
thread's own CPU over the load, from ``/proc``, follows (py-spy's sample shares count a
thread waiting for the GIL as active). ``--no-spy`` measures only that, and each
thread's context switches a request, without the sampler's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.main import RESULTS, measure, scenarios
from bench.procs import PYTHON, descendants, task_runtimes
from bench.targets import (
    budget_support,
    start_mitmdump,
    start_sim,
    start_spendtap,
    start_spendtap_budget,
    start_spendtap_central,
)
from spendtap.proxy.eventloop import EVENT_LOOPS


def py_spy() -> str:
    exe = Path(PYTHON).with_name("py-spy")
    if exe.exists():
        return str(exe)
    found = shutil.which("py-spy")
    if not found:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def thread_stats(pid: int) -> dict[int, tuple[float, int]]:
    """Each thread of ``pid``: CPU seconds (its run time in ns, as ``make bench`` counts
    it; utime + stime where the kernel does not show that) and context switches
    (voluntary + involuntary), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    runtimes = task_runtimes(pid) or {}
    out: dict[int, tuple[float, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            lines = (task / "status").read_text().splitlines()
        except OSError:
            continue  # the thread ended
        cpu = runtimes.get(int(task.name))
        if cpu is None:
            cpu = (int(fields[11]) + int(fields[12])) / tick
        out[int(task.name)] = (cpu, sum(int(x.split()[1]) for x in lines if "ctxt_switches" in x))
    return out


def thread_names(folded: Path) -> dict[int, str]:
    """Thread id -> Python thread name, from py-spy's ``thread (TID): NAME`` frames."""
    names: dict[int, str] = {}
    for line in folded.read_text().splitlines():
        head = line.split(";", 1)[0]
        if head.startswith("thread (") and "): " in head:
            tid, _, name = head[len("thread (") :].partition("): ")
            if tid.isdigit():
                names[int(tid)] = name
    return names


def analyze(folded: Path, top: int = 30, us_per_sample: float | None = None) -> str:
    """Self and inclusive sample shares from py-spy's collapsed ('raw') output."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        threads[frames[0]] += n
        frames = [f for f in frames[1:]]
        if frames:
            self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples"
    out = [f"{total} samples"]
    out.append("\nby thread:")
    for t, n in threads.most_common(6):
        out.append(f"  {n / total:6.1%}  {t}")
    out.append(f"\nself time, top {top}:")
    for f, n in self_t.most_common(top):
        out.append(f"  {n / total:6.1%}  {f}")
    out.append(
        "\nspendtap code on the main thread (outermost addon frame), share of all samples"
        + (", us per chunk" if us_per_sample else "")
        + ":"
    )
    outer: Counter[str] = Counter()
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or "MainThread" not in stack.split(";")[0]:
            continue
        for f in stack.split(";")[1:]:
            if "runner.py" in f:  # the lean runner's frames hold every hook: not metering
                continue
            if "/addon/" in f or "(addon/" in f:
                outer[f.split(" (")[0]] += int(n)
                break
    outer["(all spendtap code on the main thread)"] = sum(outer.values())
    for t, n in threads.items():
        if "spendtap" in t:
            outer[f"(thread {t.split(':')[-1].strip()})"] = n
    for f, n in outer.most_common(14):
        extra = f"  {n * us_per_sample:7.2f} us/chunk" if us_per_sample else ""
        out.append(f"  {n / total:6.1%}{extra}  {f}")
    out.append("\ninclusive time of selected frames:")
    keys = ("spendtap", "/addon/", "hooks.py", "meter.py", "scanner.py", "sse.py",
            "writer.py", "ledger.py", "metrics.py", "state_stream_response_body", "_run_once",
            "select")  # fmt: skip
    sel = [(f, n) for f, n in incl.items() if any(k in f for k in keys)]
    for f, n in sorted(sel, key=lambda x: -x[1])[:top]:
        out.append(f"  {n / total:6.1%}  {f}")
    return "\n".join(out)


def _threads_only(tgt, sim, sc, args) -> int:
    """Each thread's CPU and context switches a request over one load, without py-spy
    (whose sampling costs the process CPU of its own)."""
    pid = tgt.procs[0].pid
    pids = [p for t in tgt.procs for p in descendants(t.pid)]  # the writer child too

    def stats() -> dict[tuple[int, int], tuple[float, int]]:
        return {(p, tid): v for p in pids for tid, v in thread_stats(p).items()}

    before = stats()
    r = measure(tgt, sim, sc, args)
    after = stats()
    keys = ("rps", "chunks_per_s", "cpu_s_per_1k_chunks", "cpu_ms_per_req")
    print(json.dumps({k: r[k] for k in keys}))
    # The window includes the warm-up: requests are counted at the measured rate over it.
    requests = r["rps"] * (sc.duration_s + sc.warmup_s)
    print("\nby thread (/proc; ms of CPU and context switches a request):")
    spent = {
        tid: (cpu - before.get(tid, (0.0, 0))[0], switches - before.get(tid, (0.0, 0))[1])
        for tid, (cpu, switches) in after.items()
    }
    for (proc, tid), (cpu, switches) in sorted(spent.items(), key=lambda kv: -kv[1][0]):
        if cpu > 0 or switches > 0:
            if proc != pid:
                name = f"process {proc}" + ("" if tid == proc else f" thread {tid}")
            else:
                name = "main (event loop)" if tid == pid else f"thread {tid}"
            print(f"  {1000 * cpu / requests:7.3f} ms  {switches / requests:5.1f}  {name}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--target", default="spendtap",
                    choices=["spendtap", "spendtap-budget", "spendtap-central", "mitmdump",
                             "mitmdump-cb"],
                    help="spendtap-budget: a balance cap no run reaches on the load's key "
                         "and account, enforced (every request reserves and settles); "
                         "spendtap-central: the same through PostgreSQL on loopback "
                         "(a server of its own; its CPU is not the proxy's)")  # fmt: skip
    ap.add_argument("--scenario", default="stream-unpaced-c64")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    ap.add_argument("--idle", action="store_true", help="include idle (waiting) samples")
    ap.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL (py-spy --gil): who has it",
    )
    ap.add_argument(
        "--no-spy",
        action="store_true",
        help="no sampling: only each thread's CPU and context switches a request (/proc)",
    )
    ap.add_argument("--runner", default="mitmdump", choices=["mitmdump", "lean"],
                    help="the spendtap target's runner (spendtap run --runner)")  # fmt: skip
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default=None,
                    help="the spendtap target's event loop (spendtap run --event-loop; "
                    "default: spendtap run's)")  # fmt: skip
    ap.add_argument("--ttft-ms", type=int, default=200)
    ap.add_argument("--tps", type=int, default=50)
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="extra mitmdump/spendtap option for the spendtap target (repeatable)",
    )
    args = ap.parse_args(argv)  # fmt: skip

    sc = next((s for s in scenarios(False) if s.name == args.scenario), None)
    if sc is None:
        sys.exit(f"unknown scenario {args.scenario}")
    from dataclasses import replace

    sc = replace(sc, duration_s=args.seconds, warmup_s=1.0)
    tmp = Path(tempfile.mkdtemp(prefix="spendtap-bench-prof-"))
    sim = start_sim(tmp)
    if args.target == "spendtap":
        tgt = start_spendtap(sim.url, tmp, args.sets, runner=args.runner,
                             event_loop=args.event_loop)  # fmt: skip
    elif args.target in ("spendtap-budget", "spendtap-central"):
        ok, note, extra = budget_support(tmp)
        if not ok:
            sys.exit(f"{args.target}: {note}")
        central = args.target == "spendtap-central"
        start = start_spendtap_central if central else start_spendtap_budget
        tgt = start(sim.url, tmp, [*extra, *args.sets], runner=args.runner,
                    event_loop=args.event_loop)  # fmt: skip
    else:
        tgt = start_mitmdump(sim.url, tmp, callable_stream=args.target == "mitmdump-cb")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = ("-lean" if args.runner == "lean" else "") + ("-gil" if args.gil else "")
    folded = RESULTS / f"profile-{args.target}{tag}-{sc.name}-{stamp}.folded"
    spy = None
    try:
        if args.no_spy:
            return _threads_only(tgt, sim, sc, args)
        cmd = [py_spy(), "record", "-p", str(tgt.procs[0].pid), "-r", str(args.rate),
               "-d", str(int(args.seconds + 1)), "-f", "raw", "-o", str(folded), "--threads",
               "--nonblocking"]  # fmt: skip
        if args.idle:
            cmd.append("--idle")
        if args.gil:
            cmd.append("--gil")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        pid = tgt.procs[0].pid
        cpu_before = thread_stats(pid)
        r = measure(tgt, sim, sc, args)
        cpu_after = thread_stats(pid)
        spy.wait(timeout=args.seconds + 30)
    finally:
        if spy is not None and spy.poll() is None:
            spy.terminate()
            spy.wait()
        tgt.stop()
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ("rps", "chunks_per_s", "cpu_s_per_1k_chunks", "cpu_ms_per_req", "ttfc_p50_ms",
            "e2e_p50_ms")  # fmt: skip
    print(json.dumps({k: r[k] for k in keys}))
    if not folded.exists():
        print("py-spy wrote nothing:", spy.stderr.read() if spy and spy.stderr else "")
        return 1
    # CPU per chunk split by sample share (samples are taken only while a thread runs).
    us_per_sample = None
    if r.get("cpu_s_per_1k_chunks"):
        lines = folded.read_text().splitlines()
        total = sum(int(x.rpartition(" ")[2]) for x in lines if x.rpartition(" ")[2].isdigit())
        us_per_sample = r["cpu_s_per_1k_chunks"] * 1000 / max(1, total)  # us/chunk per sample
    print(analyze(folded, us_per_sample=us_per_sample))
    # Measured, not sampled: each thread's own CPU over the load (warm-up included).
    names = thread_names(folded)
    spent = {t: cpu_after[t][0] - cpu_before.get(t, (0.0, 0))[0] for t in cpu_after}
    total_cpu = sum(spent.values()) or 1.0
    print("\nCPU by thread (/proc, whole load window):")
    for tid, sec in sorted(spent.items(), key=lambda kv: -kv[1]):
        if sec > 0:
            print(f"  {100 * sec / total_cpu:6.1f}%  {sec:7.2f} s  {names.get(tid, tid)}")
    print(f"\ncollapsed stacks: {folded}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
