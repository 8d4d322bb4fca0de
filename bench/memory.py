"""Memory: idle in-flight streams, and one huge non-streaming response passing through."""

from __future__ import annotations

import json
import subprocess
import time

from bench.procs import PYTHON, REPO, hwm_kib, reset_hwm, rss_kib
from bench.targets import ACCOUNT, KEY, Target

CHAT = "/v1/chat/completions"


def _spec(target: Target, stream: bool, headers: dict, mode: str, **kw) -> dict:
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return {
        "mode": mode,
        "host": target.host,
        "port": target.port,
        "path": CHAT,
        "stream": stream,
        "body": json.dumps(body),
        "headers": {"x-helexa-account-id": ACCOUNT, "x-helexa-key-id": KEY, **headers},
        **kw,
    }


def idle_streams(target: Target, n: int, settle_s: float = 1.0) -> dict:
    """RSS of the proxy with ``n`` slow streams held open (a token every 5 s)."""
    pids = target.pids()
    base = rss_kib(pids)
    spec = _spec(
        target, True, {"x-sim-tps": "0.2", "x-sim-tokens": "60", "x-sim-ttft-ms": "0"}, "hold",
        concurrency=n, hold_timeout_s=60,
    )  # fmt: skip
    p = subprocess.Popen(
        [PYTHON, "-m", "bench.loadgen", json.dumps(spec)],
        cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    held = 0
    try:
        for line in p.stdout:
            if line.startswith("HELD"):
                held = int(line.split()[1])
                break
        time.sleep(settle_s)
        loaded = rss_kib(target.pids())
        p.stdin.write("release\n")
        p.stdin.flush()
        out = p.stdout.read()
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    result = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    time.sleep(0.5)
    after = rss_kib(target.pids())
    return {
        "streams": n,
        "held": held,
        "rss_before_kib": base,
        "rss_loaded_kib": loaded,
        "rss_after_kib": after,
        "kib_per_stream": round((loaded - base) / max(1, held), 1),
        "loadgen": result,
    }


def huge_response(target: Target, size: int) -> dict:
    """Peak RSS of the proxy while one ``size``-byte JSON response passes through."""
    pids = target.pids()
    reset_ok = reset_hwm(pids)
    before = rss_kib(pids)
    spec = _spec(
        target, False, {"x-sim-fault": "huge", "x-sim-body-bytes": str(size)}, "fetch",
        request_timeout_s=300,
    )  # fmt: skip
    r = subprocess.run(
        [PYTHON, "-m", "bench.loadgen", json.dumps(spec)],
        cwd=str(REPO), capture_output=True, text=True, timeout=320,
    )  # fmt: skip
    result = {}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    peak = hwm_kib(target.pids())
    return {
        "body_bytes": size,
        "received_bytes": result.get("bytes"),
        "status": result.get("status"),
        "seconds": result.get("seconds"),
        "rss_before_kib": before,
        "peak_rss_kib": peak,
        "peak_growth_kib": peak - before,
        "hwm_reset": reset_ok,
        "error": None if r.returncode == 0 else r.stderr[-500:],
    }


def run(targets: list[Target], streams: int, sizes: tuple[int, int], log=print) -> dict:
    out: dict = {}
    for t in targets:
        if t.name == "direct":
            continue
        res: dict = {}
        try:
            res["idle_streams"] = idle_streams(t, streams)
        except Exception as e:
            res["idle_streams"] = {"error": f"{type(e).__name__}: {e}"}
        res["huge"] = []
        for size in sizes:
            try:
                res["huge"].append(huge_response(t, size))
            except Exception as e:
                res["huge"].append({"body_bytes": size, "error": f"{type(e).__name__}: {e}"})
        h = [x for x in res["huge"] if "peak_rss_kib" in x]
        if len(h) == 2:
            res["huge_peak_growth_large_minus_small_kib"] = (
                h[1]["peak_rss_kib"] - h[0]["peak_rss_kib"]
            )
        out[t.name] = res
        log(
            f"  memory {t.name}: {res['idle_streams'].get('kib_per_stream')} KiB/stream, "
            f"huge peak growth {res.get('huge_peak_growth_large_minus_small_kib')} KiB"
        )
    return out
