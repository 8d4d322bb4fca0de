"""spendtap: a metering sidecar for LLM inference traffic.

The package is split so that the core can be used and tested without mitmproxy
or click:

- ``spendtap.usage``       normalized token usage (the figures a ledger row holds)
- ``spendtap.sse``         incremental WHATWG event-stream framing
- ``spendtap.decoding``    incremental Content-Encoding decoders
- ``spendtap.scanner``     per-response usage and timing scanner (OpenAI and Anthropic shapes)
- ``spendtap.usage_shapes`` the OpenAI and Anthropic usage objects, one reader per family
- ``spendtap.dialects``    the usage extractor base class for native API families
- ``spendtap.dialect_*``   one native family each: ``gemini``, ``ollama``, ``llamacpp``,
  ``cohere``; ``dialect_registry`` lists them, ``dialect_scanner`` scans with them
- ``spendtap.framing``     incremental NDJSON / JSON-array / JSON document framing
- ``spendtap.request``     what a request asks for (API, model, limits, principal headers)
- ``spendtap.estimate``    usage estimates when a server reports none
- ``spendtap.inject``      asking streams for usage, and hiding it from the client
- ``spendtap.meter``       one request's state, from request to ledger row
- ``spendtap.ledger``      the SQLite ledger (schema, migrations, queries)
- ``spendtap.writer``      the single writer thread that group-commits ledger rows
- ``spendtap.commits``     waiting on the event loop for those commits
- ``spendtap.budgets``     caps, reservations, settle/release, sweeps
- ``spendtap.keys``        bearer keys as fingerprints
- ``spendtap.refusals``    the 401/429/503 answers spendtap gives itself
- ``spendtap.gate``        principals and budget admission, off the event loop
- ``spendtap.metrics``     Prometheus metrics (``budget_metrics``: gauges read at scrape time)
- ``spendtap.hooks``       the thin mitmproxy addon (the only module importing mitmproxy)
- ``spendtap.cli``         the click CLI
- ``spendtap.sim``         the built-in simulated inference server
"""

__version__ = "0.1.0"
