"""spendtap: a metering sidecar for LLM inference traffic.

The core can be used and tested without mitmproxy or click; its folders follow the
data path (docs/architecture.md places every module):

- ``spendtap.metering``  what a response says it cost: request facts, SSE/NDJSON framing,
  content decoding, the usage scanners of every API family, estimates, usage injection,
  one flow's metering state
- ``spendtap.store``     where it is kept: the SQLite ledger and its writer (process or thread),
  commits, budgets, bearer keys, the storage seam, the fleet's PostgreSQL store
- ``spendtap.proxy``     the mitmproxy addon (``hooks``, the only module importing
  mitmproxy) and the request-path decisions it calls: gate, trust, key swap, refusals
- ``spendtap.metrics``   Prometheus families, budget gauges read at scrape time, the port
- ``spendtap.pricing``   prices from the operator's file and the genai-prices catalogue
- ``spendtap.options``   the one table of ``spendtap_*`` options
- ``spendtap.cli``       the click CLI
- ``spendtap.sim``       the built-in simulated inference server
"""

__version__ = "0.1.0"
