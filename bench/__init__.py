"""spendtap's benchmark harness: ``python -m bench`` (or ``make bench``).

Loopback only and bounded in time. It starts the built-in simulator and each target
in its own processes -- (a) the simulator directly, (b) bare ``mitmdump`` in reverse
mode with streaming on and no addon, (c) spendtap, (d) spendtap with budgets enforced
on every request (when the installed spendtap has budgets), (e) LiteLLM's proxy when
asked (``--peers litellm``; its own pinned venv under ``bench/.peers/``) -- and drives
the same load at each from a separate load-generator process (:mod:`bench.loadgen`),
interleaved over several rounds, reporting medians. Micro-benchmarks
(:mod:`bench.micro`) and memory checks (:mod:`bench.memory`) run beside it.

Results: a table and the target ratios on stdout, raw JSON under ``bench/results/``.
"""
