"""What a sidecar costs with no traffic at all: CPU a second, by thread.

    python -m bench.quiet                                  # spendtap, budgets, the fleet
    python -m bench.quiet --targets spendtap-central --seconds 30

Each target fronts the simulator and receives nothing; after ``--settle`` seconds its
processes' threads' CPU (``se.sum_exec_runtime`` from ``/proc``, as ``make bench``
samples it) is read over ``--seconds``. The threads are shown by id, busiest first,
with their Python names when ``py-spy`` can read them (the interpreter gives its threads
no kernel names). ``spendtap-central`` starts a PostgreSQL server of its own, as ``make
bench`` does.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.profile import thread_stats
from bench.targets import (
    budget_support,
    start_sim,
    start_spendtap,
    start_spendtap_budget,
    start_spendtap_central,
)

TARGETS = ("spendtap", "spendtap-budget", "spendtap-central")


def _start(name: str, upstream: str, log_dir: Path):
    if name == "spendtap":
        return start_spendtap(upstream, log_dir)
    _, _, extra = budget_support(log_dir)
    if name == "spendtap-budget":
        return start_spendtap_budget(upstream, log_dir, extra)
    return start_spendtap_central(upstream, log_dir, extra)


def thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name, from ``py-spy dump`` (empty without it)."""
    beside = Path(sys.executable).with_name("py-spy")  # a virtualenv's, not on PATH
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        return {}
    try:
        out = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    names = {}
    for line in out.splitlines():
        # Thread 24545 (idle): "spendtap-central-budgets"
        if line.startswith("Thread ") and '"' in line:
            tid = line.split()[1]
            if tid.isdigit():
                names[int(tid)] = line.split('"')[1]
    return names


def quiet_cpu(target, settle_s: float, seconds: float) -> tuple[float, list[tuple[str, float]]]:
    """(ms of CPU a second in all, [(thread, ms a second)] busiest first)."""
    time.sleep(settle_s)
    pids = target.pids()
    names: dict[int, str] = {}
    for pid in pids:
        names |= thread_names(pid)

    def cpu() -> dict[tuple[int, int], float]:
        return {(pid, tid): s for pid in pids for tid, (s, _) in thread_stats(pid).items()}

    before = cpu()
    time.sleep(seconds)
    spent = {k: (s - before.get(k, s)) * 1000 / seconds for k, s in cpu().items()}
    threads = [
        (f"{tid} {names.get(tid) or ('main' if tid == pid else f'process {pid}')}", ms)
        for (pid, tid), ms in spent.items()
        if ms > 0.005
    ]
    return sum(spent.values()), sorted(threads, key=lambda t: -t[1])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.quiet", description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after start, unmeasured")
    args = ap.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="spendtap-quiet-"))
    sim = start_sim(log_dir)
    try:
        for name in args.targets.split(","):
            target = _start(name, sim.url, log_dir)
            try:
                total, threads = quiet_cpu(target, args.settle, args.seconds)
            finally:
                target.stop()
            print(f"{name}: {total:.2f} ms of CPU a second, no traffic")
            for label, ms in threads:
                print(f"    {ms:7.3f} ms/s  {label}")
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
