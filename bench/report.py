"""The printed table and the verdicts against issue 6's targets."""

from __future__ import annotations

COLS = [
    ("target", "target", "{}"),
    ("rps", "req/s", "{:.1f}"),
    ("chunks_per_s", "chunks/s", "{:.0f}"),
    ("ttfc_p50_ms", "TTFC p50", "{:.2f}"),
    ("ttfc_p99_ms", "TTFC p99", "{:.2f}"),
    ("ttfc_excess_p50_ms", "+TTFC p50", "{:.2f}"),
    ("e2e_p50_ms", "end p50", "{:.2f}"),
    ("e2e_p99_ms", "end p99", "{:.2f}"),
    ("cpu_s_per_1k_chunks", "CPU s/1k ch", "{:.4f}"),
    ("cpu_ms_per_req", "CPU ms/req", "{:.3f}"),
    ("proxy_cpu_frac", "proxy CPU", "{:.0%}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.1f}"),
    ("lg_cpu_frac", "loadgen CPU", "{:.0%}"),
    ("errors", "err", "{}"),
]

ORDER = [
    "direct",
    "mitmdump",
    "mitmdump-uvloop",
    "mitmdump-cb",
    "lean-bare",
    "spendtap",
    "spendtap-asyncio",
    "spendtap-lean",
    "spendtap-nowait",
    "spendtap-budget",
    "spendtap-central",
    "litellm",
]


def _fmt(fmt: str, v) -> str:
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def table(summary: dict) -> str:
    lines = []
    for sc, by_target in summary.items():
        rows = [[h for _, h, _ in COLS]]
        for tg in sorted(by_target, key=lambda t: ORDER.index(t) if t in ORDER else 99):
            m = {**by_target[tg], "target": tg}
            rows.append([_fmt(f, m.get(k)) for k, _, f in COLS])
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLS))]
        lines.append(
            f"\n## {sc}   (medians over {max(m.get('rounds', 0) for m in by_target.values())} "
            "rounds; ms unless noted)"
        )
        for j, r in enumerate(rows):
            lines.append(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _get(res: dict, sc: str, tg: str, k: str):
    return res.get("summary", {}).get(sc, {}).get(tg, {}).get(k)


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdicts(res: dict) -> list[dict]:
    """Each target of issue 6: figure, limit, met (True/False/None when not measured)."""
    out: list[dict] = []

    def add(name: str, value, limit: str, met, detail: str = "") -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": met, "detail": detail})

    # CPU per chunk, spendtap vs bare mitmdump.
    for sc in ("stream-unpaced-c64", "stream-paced-c64", "stream-unpaced-c16", "stream-paced-c16"):
        s = _get(res, sc, "spendtap", "cpu_s_per_1k_chunks")
        b = _get(res, sc, "mitmdump", "cpu_s_per_1k_chunks")
        r = _ratio(s, b)
        if r is not None:
            add(f"CPU/chunk spendtap/mitmdump ({sc})", round(r, 3), "<= 1.15", r <= 1.15,
                f"{s:.4f} vs {b:.4f} CPU s per 1000 chunks")  # fmt: skip
    # Throughput at c=64.
    for sc in ("stream-unpaced-c64",):
        s, b = _get(res, sc, "spendtap", "rps"), _get(res, sc, "mitmdump", "rps")
        r = _ratio(s, b)
        if r is not None:
            add(f"req/s spendtap/mitmdump ({sc})", round(r, 3), ">= 0.85", r >= 0.85,
                f"{s:.1f} vs {b:.1f} req/s")  # fmt: skip
    # TTFC excess over direct.
    for sc in ("stream-paced-c1", "stream-paced-c16", "stream-paced-c64"):
        s = _get(res, sc, "spendtap", "ttfc_excess_p50_ms")
        b = _get(res, sc, "mitmdump", "ttfc_excess_p50_ms")
        r = _ratio(s, b)
        if r is not None:
            add(f"TTFC excess spendtap/mitmdump ({sc})", round(r, 3), "<= 1.2", r <= 1.2,
                f"+{s:.3f} ms vs +{b:.3f} ms over direct (p50)")  # fmt: skip
        lt = _get(res, sc, "litellm", "ttfc_excess_p50_ms")
        r = _ratio(s, lt)
        if r is not None:
            add(f"TTFC excess spendtap/litellm ({sc})", round(r, 3), "< 0.25", r < 0.25,
                f"+{s:.3f} ms vs +{lt:.3f} ms over direct (p50)")  # fmt: skip
    s, lt = (
        _get(res, "stream-unpaced-c64", "spendtap", "rps"),
        _get(res, "stream-unpaced-c64", "litellm", "rps"),
    )
    if s is not None and lt:
        add("req/s spendtap/litellm (stream-unpaced-c64)", round(s / lt, 2), "(info)", None,
            f"{s:.1f} vs {lt:.1f} req/s")  # fmt: skip
    # Durable commit: what waiting for the row's commit adds to the end of a response,
    # spendtap against the same sidecar with the wait off (spendtap-nowait).
    for sc in ("stream-paced-c16", "stream-unpaced-c16", "json-c16"):
        s = _get(res, sc, "spendtap", "e2e_p50_ms")
        nw = _get(res, sc, "spendtap-nowait", "e2e_p50_ms")
        if s is not None and nw is not None:
            d = s - nw
            primary = sc == "stream-paced-c16"
            add(f"end p50, spendtap - spendtap-nowait ({sc})", round(d, 3), "(info)", None,
                "end to end, so within the run's noise" if primary else
                "info: includes CPU queueing at saturation")  # fmt: skip
        b = _get(res, sc, "mitmdump", "e2e_p50_ms")
        if s is not None and b is not None:
            add(f"end-of-response p50 added, spendtap - mitmdump ({sc})", round(s - b, 3),
                "(info)", None)  # fmt: skip
    # Budgets: what enforcement adds.
    for sc in ("stream-paced-c16", "stream-unpaced-c64"):
        s = _get(res, sc, "spendtap", "e2e_p50_ms")
        bg = _get(res, sc, "spendtap-budget", "e2e_p50_ms")
        if s is not None and bg is not None:
            add(f"budget enforcement adds to end p50 ({sc})", round(bg - s, 3), "(info)", None)
        s = _get(res, sc, "spendtap", "ttfc_p50_ms")
        bg = _get(res, sc, "spendtap-budget", "ttfc_p50_ms")
        if s is not None and bg is not None:
            add(f"budget enforcement adds to TTFC p50 ({sc})", round(bg - s, 3), "(info)", None)
    # Issue 12: every scenario, spendtap (with budgets enforced too, and the lean runner)
    # against bare mitmdump.
    cpu_bound = ("stream-unpaced-c16", "stream-unpaced-c64", "json-c16", "stream-inject-c16")
    out_of_lockstep = ("stream-paced-c16-think50", "stream-paced-c64-think50")
    lockstep_or_unpaced = (
        "stream-paced-c1", "stream-paced-c16", "stream-paced-c64",
        "stream-unpaced-c1", "stream-unpaced-c16", "stream-unpaced-c64",
    )  # fmt: skip
    for tg in ("spendtap", "spendtap-budget", "spendtap-lean"):
        for sc in res.get("summary", {}):
            if sc in out_of_lockstep:
                continue  # beside the goal's loads, not one of them: info lines below
            for k, what in (("cpu_s_per_1k_chunks", "CPU/chunk"), ("cpu_ms_per_req", "CPU/req")):
                s, b = _get(res, sc, tg, k), _get(res, sc, "mitmdump", k)
                r = _ratio(s, b)
                if r is not None:
                    add(f"[12] {what} {tg}/mitmdump ({sc})", round(r, 3), "<= 1.10", r <= 1.10,
                        f"{s:.4f} vs {b:.4f}")  # fmt: skip
            if sc in cpu_bound:
                s, b = _get(res, sc, tg, "rps"), _get(res, sc, "mitmdump", "rps")
                r = _ratio(s, b)
                if r is not None:
                    add(f"[12] req/s {tg}/mitmdump ({sc})", round(r, 3), ">= 0.95", r >= 0.95,
                        f"{s:.1f} vs {b:.1f} req/s")  # fmt: skip
        for sc in lockstep_or_unpaced:
            s = _get(res, sc, tg, "ttfc_excess_p50_ms")
            b = _get(res, sc, "mitmdump", "ttfc_excess_p50_ms")
            r = _ratio(s, b)
            if r is not None:
                add(f"[12] TTFC excess {tg}/mitmdump ({sc})", round(r, 3), "<= 1.2", r <= 1.2,
                    f"+{s:.3f} ms vs +{b:.3f} ms over direct (p50)")  # fmt: skip
        for sc in out_of_lockstep:
            s = _get(res, sc, tg, "ttfc_excess_p50_ms")
            b = _get(res, sc, "mitmdump", "ttfc_excess_p50_ms")
            r = _ratio(s, b)
            if r is not None:
                add(f"TTFC excess {tg}/mitmdump ({sc}, clients out of lockstep)", round(r, 3),
                    "(info)", None, f"+{s:.3f} ms vs +{b:.3f} ms over direct (p50)")  # fmt: skip
    # What uvloop's loop saves: spendtap (spendtap run's default, uvloop) against the same
    # on mitmdump's own asyncio loop.
    for sc in res.get("summary", {}):
        s, a = (
            _get(res, sc, "spendtap", "cpu_ms_per_req"),
            _get(res, sc, "spendtap-asyncio", "cpu_ms_per_req"),
        )
        r = _ratio(s, a)
        if r is not None:
            add(f"CPU/req spendtap (uvloop) / spendtap-asyncio ({sc})", round(r, 3), "(info)",
                None, f"{s:.3f} vs {a:.3f} ms")  # fmt: skip
    # spendtap against mitmproxy on the same loop (spendtap run's uvloop): what spendtap's
    # own work costs, the loop's saving set aside; and what that loop saves bare mitmproxy.
    for sc in res.get("summary", {}):
        for k, what in (("cpu_ms_per_req", "CPU/req"), ("ttfc_excess_p50_ms", "TTFC excess")):
            for tg, base in (("spendtap", "mitmdump-uvloop"), ("mitmdump-uvloop", "mitmdump")):
                s, b = _get(res, sc, tg, k), _get(res, sc, base, k)
                r = _ratio(s, b)
                if r is not None:
                    add(f"{what} {tg}/{base} ({sc})", round(r, 3), "(info)", None,
                        f"{s:.3f} vs {b:.3f}")  # fmt: skip
    # The fleet: budgets through PostgreSQL (issue 9's goals).
    ce = res.get("micro", {}).get("central", {})
    if ce.get("reserve_ms_p50") is not None:
        v = ce["reserve_ms_p50"]
        add("central reserve p50 (PostgreSQL on loopback)", v, "< 2 ms", v < 2.0,
            f"p99 {ce['reserve_ms_p99']} ms; settle (ship one row) p50 "
            f"{ce['settle_ms_p50']} ms; catch-up {ce['ship_rows_per_s']} rows/s")  # fmt: skip
    for sc in ("stream-unpaced-c64", "stream-paced-c64", "stream-unpaced-c16", "json-c16"):
        local = _get(res, sc, "spendtap-budget", "rps")
        central = _get(res, sc, "spendtap-central", "rps")
        if local and central is not None:
            ratio = round(central / local, 3)
            ttfc = _get(res, sc, "spendtap-central", "ttfc_p50_ms")
            ttfc_local = _get(res, sc, "spendtap-budget", "ttfc_p50_ms")
            detail = f"{central:.1f} vs {local:.1f} req/s"
            if ttfc is not None and ttfc_local is not None:
                detail += f"; TTFC p50 {ttfc:.2f} vs {ttfc_local:.2f} ms"
            add(f"req/s spendtap-central / spendtap-budget ({sc})", ratio, ">= 0.8",
                ratio >= 0.8, detail)  # fmt: skip
    for sc, runs in res.get("central_shipping", {}).items():
        if sc.endswith("-c64") and runs:
            worst = max(x["lag_max_s"] for x in runs)
            rate = max(x["ship_rows_per_s"] for x in runs)
            add(f"central shipping at c=64 ({sc}): worst lag s", worst, "(info)", None,
                f"{rate} rows/s shipped over load and drain; drained "
                f"{max(x['drain_s'] for x in runs)} s after the load")  # fmt: skip
    # Scanner.
    # Durable commit: what the end of a response waits for its row (the writer as the
    # sidecar runs it, c=16 concurrent responses), measured directly rather than as
    # a difference of two noisy end-to-end medians.
    writer = res.get("micro", {}).get("writer", {})
    for d in [*writer.get("durable_process", []), *writer.get("durable", [])]:
        if d.get("concurrency") == 16:
            v = d["commit_wait_ms_p50"]
            add(f"durable commit wait p50 at c=16 (ledger writer {d.get('writer', 'thread')})",
                v, "< 2 ms", v < 2.0,
                f"p99 {d['commit_wait_ms_p99']} ms, {d['rows_per_batch']} rows/batch")  # fmt: skip
    sc = res.get("micro", {}).get("scanner", {})
    v = sc.get("corpus_stream_us_per_chunk")
    if v is not None:
        add("scanner us per ~120 B chunk (corpus streams)", v, "< 5 us", v < 5,
            f"all corpus {sc.get('corpus_us_per_chunk')} us/chunk, "
            f"{sc.get('corpus_mb_per_s')} MB/s;"
            f" worst case {sc.get('worst_case', {}).get('case')} "
            f"{sc.get('worst_case', {}).get('us_per_chunk')} us")  # fmt: skip
    v = sc.get("linearity_ns_per_byte_max_over_min")
    if v is not None:
        add("scanner linear in body size (ns/byte max/min)", v, "<= 1.3", v <= 1.3)
    # Memory.
    mem = res.get("memory", {})
    s = mem.get("spendtap", {}).get("idle_streams", {}).get("kib_per_stream")
    b = mem.get("mitmdump", {}).get("idle_streams", {}).get("kib_per_stream")
    if s is not None:
        extra = None if b is None else round(s - b, 1)
        add("memory per idle stream, spendtap (KiB)", s, "bounded; <= mitmdump + 64 KiB",
            None if extra is None else extra <= 64,
            f"mitmdump {b} KiB/stream; spendtap adds {extra} KiB/stream")  # fmt: skip
    g = mem.get("spendtap", {}).get("huge_peak_growth_large_minus_small_kib")
    if g is not None:
        sizes = [h.get("body_bytes", 0) >> 20 for h in mem["spendtap"].get("huge", [])]
        bg = mem.get("mitmdump", {}).get("huge_peak_growth_large_minus_small_kib")
        add(f"peak RSS growth {sizes[-1]} MiB vs {sizes[0]} MiB response, spendtap (KiB)", g,
            "< 32768 KiB (independent of size)", g < 32768, f"mitmdump: {bg} KiB")  # fmt: skip
    return out


def render(res: dict) -> str:
    lines = ["# spendtap benchmark"]
    m, v = res.get("machine", {}), res.get("versions", {})
    lines.append(
        f"machine: {m.get('cpu')} x{m.get('nproc')} (affinity {m.get('affinity')}), "
        f"{m.get('mem_mib')} MiB, kernel {m.get('kernel')}; python {v.get('python')}, "
        f"mitmproxy {v.get('mitmproxy')}, spendtap {v.get('spendtap_git')}"
        + (f", litellm {v['litellm']}" if v.get("litellm") else "")
    )
    c = res.get("config", {})
    lines.append(
        f"rounds {c.get('rounds')}, paced = ttft {c.get('ttft_ms')} ms + {c.get('tps')} tok/s; "
        "chunks = SSE events received by the client; TTFC = first token event (after the role "
        "preamble); +TTFC = excess over direct in the same round; CPU = the proxy's "
        "processes' threads' run time (sched, ns) over the measured window; elapsed "
        f"{res.get('elapsed_s')} s"
    )
    if res.get("summary"):
        lines.append(table(res["summary"]))
    mic = res.get("micro", {})
    if mic:
        lines.append("\n## micro-benchmarks")
        sc = mic.get("scanner", {})
        if "error" in sc:
            lines.append(f"scanner: ERROR {sc['error']}")
        elif sc:
            lines.append(
                f"scanner (ResponseScanner.feed, {sc['chunk_bytes']} B chunks, "
                f"{sc['corpus_cases']} corpus cases): {sc['corpus_us_per_chunk']} us/chunk, "
                f"{sc['corpus_mb_per_s']} MB/s "
                f"(streams only {sc['corpus_stream_us_per_chunk']} us/chunk, "
                f"{sc['corpus_stream_mb_per_s']} MB/s); simulator chat stream "
                f"{sc['sim_stream_us_per_120b_chunk']} us per 120 B chunk, "
                f"{(sc.get('sim_stream_per_event') or {}).get('us_per_event')} us per whole event "
                f"(~{(sc.get('sim_stream_per_event') or {}).get('avg_event_bytes')} B), "
                f"{(sc.get('sim_stream_per_event') or {}).get('us_per_event_joined')} us per event "
                "in 8 KiB joined chunks; "
                f"ns/byte at {', '.join(str(x['tokens']) for x in sc['linearity'])} tokens: "
                f"{', '.join(str(x['ns_per_byte']) for x in sc['linearity'])}"
            )
        oc = mic.get("on_chunk", {})
        if "error" in oc:
            lines.append(f"stream callable: ERROR {oc['error']}")
        elif oc:
            for k in ("sim_events", "sim_120b", "sim_events_inject"):
                x = oc.get(k)
                if x:
                    lines.append(
                        f"stream callable (spendtap's resp.stream via real hooks), {k} "
                        f"(~{x['avg_chunk_bytes']} B): {x['us_per_call_p50']} us/call p50 "
                        f"(a bare Python call: {x['python_call_baseline_us']} us)"
                    )
            lines.append(
                f"hooks per request (request+responseheaders+response, no commit wait): "
                f"{oc.get('hooks_us_per_request')} us"
            )
        w = mic.get("writer", {})
        if "error" in w:
            lines.append(f"ledger writer: ERROR {w['error']}")
        elif w:
            b = w["batched"]
            lines.append(f"ledger writer batched: {b['rows_per_s']} rows/s ({b['rows']} rows, "
                         f"{b['batches']} batches)")  # fmt: skip
            for d in [*w.get("durable_process", []), *w["durable"]]:
                lines.append(
                    f"ledger writer ({d.get('writer', 'thread')}) durable (submit + wait "
                    f"on_commit), c={d['concurrency']}: "
                    f"{d['rows_per_s']} rows/s, commit wait p50 {d['commit_wait_ms_p50']} ms, "
                    f"p99 {d['commit_wait_ms_p99']} ms, {d['rows_per_batch']} rows/batch"
                )
        bu = mic.get("budget", {})
        if bu:
            lines.append(f"budget reserve+settle: {bu}")
        ce = mic.get("central", {})
        if ce:
            lines.append(f"central (PostgreSQL) reserve+settle and shipping: {ce}")
    shipping = res.get("central_shipping", {})
    if shipping:
        lines.append("\n## central shipping (spendtap-central)")
        for sc, runs in shipping.items():
            for x in runs:
                lines.append(
                    f"{sc}: {x['rows_shipped']} rows at {x['ship_rows_per_s']} rows/s, "
                    f"lag max {x['lag_max_s']} s, backlog max {x['backlog_max_rows']}, "
                    f"drained {x['drain_s']} s after the load, errors {x['ship_errors']}"
                )
    mem = res.get("memory", {})
    if mem:
        lines.append("\n## memory")
        for tg, r in mem.items():
            i = r.get("idle_streams", {})
            lines.append(
                f"{tg}: {i.get('held')} idle streams: RSS {_kib(i.get('rss_before_kib'))} -> "
                f"{_kib(i.get('rss_loaded_kib'))} = {i.get('kib_per_stream')} KiB/stream"
                + (f" ERROR {i['error']}" if "error" in i else "")
            )
            for h in r.get("huge", []):
                lines.append(
                    f"{tg}: {h.get('body_bytes', 0) >> 20} MiB JSON response: received "
                    f"{h.get('received_bytes')} B in {h.get('seconds')} s, peak RSS "
                    f"{_kib(h.get('peak_rss_kib'))} (+{_kib(h.get('peak_growth_kib'))} over start)"
                    + (f" ERROR {h['error']}" if h.get("error") else "")
                )
    lines.append("\n## targets (issue 6)")
    for v in res.get("verdicts", []):
        mark = {True: "MET   ", False: "MISSED", None: "info  "}[v["met"]]
        lines.append(f"[{mark}] {v['target']}: {v['value']} (limit {v['limit']})"
                     + (f" -- {v['detail']}" if v["detail"] else ""))  # fmt: skip
    for n in res.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _kib(x) -> str:
    return "-" if x is None else f"{x / 1024:.1f} MiB"
