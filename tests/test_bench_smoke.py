"""Smoke run of the benchmark harness (``python -m bench``) at minimal sizes: it runs, it
measures every default target, and it writes its JSON. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.proc import REPO

pytestmark = pytest.mark.e2e


def test_bench_quick_runs_and_writes_results(tmp_path):
    """A tiny quick run measures direct, bare mitmdump and spendtap, checks memory, runs the
    micro-benchmarks, and writes raw results with a verdict per target."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick",
            "--scenarios", "stream-unpaced-c16,json-c16",
            "--streams", "20",
            "--results-dir", str(tmp_path),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("bench-quick-*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    summary = res["summary"]
    # The baseline is the mitmdump program; mitmproxy on spendtap run's uvloop is beside it.
    assert "spendtap" not in res["targets"]["mitmdump"]["command"]
    assert "spendtap.proxy.eventloop uvloop" in res["targets"]["mitmdump-uvloop"]["command"]
    for scenario in ("stream-unpaced-c16", "json-c16"):
        for target in ("direct", "mitmdump", "mitmdump-uvloop", "spendtap"):
            m = summary[scenario][target]
            assert m["errors"] == 0, (scenario, target, m)
            assert m["rps"] > 0, (scenario, target, m)
    stream = summary["stream-unpaced-c16"]
    assert stream["spendtap"]["chunks_per_s"] > 0
    assert stream["spendtap"]["cpu_s_per_1k_chunks"] > 0
    assert stream["spendtap"]["ttfc_p50_ms"] is not None
    assert res["memory"]["spendtap"]["idle_streams"]["held"] == 20
    assert all(h.get("status") == 200 for h in res["memory"]["spendtap"]["huge"])
    assert "error" not in res["micro"]["scanner"]
    assert "error" not in res["micro"]["on_chunk"]
    assert "error" not in res["micro"]["writer"]
    assert res["verdicts"], "no target was judged"
    assert "# spendtap benchmark" in proc.stdout


def test_the_mitmdump_baseline_is_the_mitmdump_program():
    """Built from spendtap run's command line with the addon taken out, the baseline once
    followed spendtap run onto uvloop unnoticed: bare mitmdump is the program itself."""
    from bench.targets import _mitmdump_base

    bare = _mitmdump_base("http://127.0.0.1:1", 5)
    assert Path(bare[0]).name == "mitmdump", bare
    assert not any("spendtap" in a or a == "-s" for a in bare), bare
    assert bare[bare.index("--mode") + 1] == "reverse:http://127.0.0.1:1"
    uv = _mitmdump_base("http://127.0.0.1:1", 5, event_loop="uvloop")
    assert uv[1:4] == ["-m", "spendtap.proxy.eventloop", "uvloop"], uv
    assert uv[4:] == bare[1:]  # the same flags on the other loop


def test_sidebyside_runs_each_variant_and_prints_ratios():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.sidebyside",
            "--scenarios",
            "json-c16",
            "--rounds",
            "1",
            "--seconds",
            "1",
            "--variant",
            "bare=--target mitmdump",
            "--variant",
            "off=--target spendtap --set spendtap_join_chunks=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [r[:2] for r in rows] == [["json-c16", "bare"], ["json-c16", "off"]]
    assert rows[0][-2:] == ["1.00,", "1.00"]


def test_stalls_probes_each_proxy_and_sees_the_frozen_heap():
    """``bench.stalls`` through real proxies: the probe in spendtap's process sees its
    start-up heap frozen (``spendtap run``'s default), not with ``spendtap_gc_freeze=false``
    nor in bare mitmdump."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.stalls", "--scenario", "stream-paced-c16",
         "--seconds", "2", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {
        cells[0]: cells
        for line in out.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| target")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {"mitmdump", "spendtap-unfrozen", "spendtap"}
    frozen = {name: int(cells[1].replace(",", "")) for name, cells in rows.items()}
    assert frozen["spendtap"] > 100_000
    assert frozen["spendtap-unfrozen"] < 1000 and frozen["mitmdump"] < 1000
