"""spendtap: a metering sidecar for LLM inference traffic.

The package is split so that the core can be used and tested without mitmproxy
or click:

- ``spendtap.usage``      normalized token usage (the figures a ledger row holds)
- ``spendtap.sse``        incremental WHATWG event-stream framing
- ``spendtap.decoding``   incremental Content-Encoding decoders
- ``spendtap.scanner``    per-response usage and timing scanner
- ``spendtap.request``    what a request asks for (API, model, principal, limits)
- ``spendtap.ledger``     the SQLite ledger (schema, migrations, queries)
- ``spendtap.writer``     the single writer thread that batches ledger rows
- ``spendtap.metrics``    Prometheus metrics
- ``spendtap.hooks``      the thin mitmproxy addon (the only module importing mitmproxy)
- ``spendtap.cli``        the click CLI
- ``spendtap.sim``        the built-in simulated inference server
"""

__version__ = "0.1.0"
