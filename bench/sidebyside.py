"""Variants of a target measured side by side: alternating runs, one table.

    python -m bench.sidebyside --scenarios stream-unpaced-c16,stream-inject-c16 --rounds 2 \\
        --variant "mitmdump=--target mitmdump" \\
        --variant "off=--target spendtap --set spendtap_join_chunks=false" \\
        --variant "on=--target spendtap"

Each variant is a set of ``python -m bench.profile --no-spy`` arguments. Every round
runs every scenario through every variant in turn (the order reversed on odd rounds),
so a shared, noisy machine drifts over all variants alike; the table gives each run's
CPU milliseconds a request (every process of the target) and req/s, and each variant's
median ratio to the first variant's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys

from bench.procs import PYTHON

DEFAULT_VARIANTS = ["mitmdump=--target mitmdump", "spendtap=--target spendtap"]


def run_once(scenario: str, args: list[str], seconds: float) -> dict:
    out = subprocess.run(
        [
            PYTHON,
            "-m",
            "bench.profile",
            "--no-spy",
            "--scenario",
            scenario,
            "--seconds",
            str(seconds),
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.sidebyside",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scenarios", default="stream-unpaced-c16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument(
        "--variant",
        action="append",
        metavar="NAME=ARGS",
        help="bench.profile arguments (repeatable; the first is the baseline)",
    )
    opts = ap.parse_args(argv)
    variants = []
    for spec in opts.variant or DEFAULT_VARIANTS:
        name, sep, args = spec.partition("=")
        if not sep or not name:
            ap.error(f"--variant {spec!r}: expected NAME=ARGS")
        variants.append((name, shlex.split(args)))
    scenarios = [s for s in opts.scenarios.split(",") if s]
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(opts.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for scenario in scenarios:
            for name, args in order:
                d = run_once(scenario, args, opts.seconds)
                runs.setdefault((scenario, name), []).append(d)
                print(
                    f"round {r} {scenario} {name}: {d['cpu_ms_per_req']:.2f} ms/req, "
                    f"{d['rps']:.0f} req/s",
                    file=sys.stderr,
                    flush=True,
                )
    base = variants[0][0]
    print(f"{'scenario':20} {'variant':16} {'CPU ms a request':24} {'req/s':18} ratio CPU, req/s")
    for scenario in scenarios:
        b = runs[(scenario, base)]
        b_cpu = statistics.median(d["cpu_ms_per_req"] for d in b)
        b_rps = statistics.median(d["rps"] for d in b)
        for name, _ in variants:
            ds = runs[(scenario, name)]
            cpu = " / ".join(f"{d['cpu_ms_per_req']:.2f}" for d in ds)
            rps = " / ".join(f"{d['rps']:.0f}" for d in ds)
            ratio_cpu = statistics.median(d["cpu_ms_per_req"] for d in ds) / b_cpu
            ratio_rps = statistics.median(d["rps"] for d in ds) / b_rps
            print(f"{scenario:20} {name:16} {cpu:24} {rps:18} {ratio_cpu:.2f}, {ratio_rps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
