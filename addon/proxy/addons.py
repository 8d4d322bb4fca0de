"""spendtap's addons, in the order mitmproxy must run them (as mitmproxy's own
``default_addons()``); the entry script (``spendtap.py``) hands this list to mitmdump.

Each addon declares its share of the one option table (``spendtap.options``) and
reacts to its own options; they share state through the references given here,
never through globals:

- ``FailClosed``: the "refuse to meter" state; checks mitmproxy's deferred values
  before any option exists.
- ``Metering`` (``hooks``): the flow hooks.
- ``Guard``: trusted peers, gateway secret, principal source, key swap credential.
- ``Recording``: prices, the ledger and its writer, the access log.
- ``Gatekeeper``: the gate (principals, budgets), the fleet, the sweeps, SIGHUP.
- ``Monitoring``: metrics, the metrics port, ``/healthz``, the error counts.
- ``Heap``: once everything above is built, its objects frozen out of the cyclic
  collector's passes (short pauses of the event loop).

The list's order is the order of ``configure`` and of ``done``. Configured in this
order, an unguarded start stops before the ledger is created, and a bad ledger before
the metrics port listens; the gate is built on the guard's trust and the recording's
ledger. At ``done`` the flow hooks submit the rows still in flight before the writer
drains, the fleet ships what the writer committed, and the metrics port closes last.
"""

from __future__ import annotations

from spendtap.proxy.failclosed import FailClosed
from spendtap.proxy.gatekeeper import Gatekeeper
from spendtap.proxy.guard import Guard
from spendtap.proxy.heap import Heap
from spendtap.proxy.hooks import Metering
from spendtap.proxy.monitoring import Monitoring
from spendtap.proxy.recording import Recording


def default_addons() -> list:
    fail_closed = FailClosed()
    monitoring = Monitoring(fail_closed)
    guard = Guard(fail_closed)
    recording = Recording(fail_closed, monitoring)
    gatekeeper = Gatekeeper(fail_closed, guard, recording, monitoring)
    monitoring.watch(recording, gatekeeper)
    metering = Metering(fail_closed, guard, recording, gatekeeper, monitoring)
    return [fail_closed, metering, guard, recording, gatekeeper, monitoring, Heap(fail_closed)]


class SpendtapAddons:
    """``default_addons()`` as one addon, for harnesses that add addons one at a time
    (``mitmproxy.test.taddons.context``).

    mitmproxy loads an addon's ``addons`` together with it, every one declaring its
    options before any is configured: what mitmdump does with the entry script's list.
    Added one by one instead, the addons in place would be configured by the options
    each next one declares, before the rest exist (with mitmproxy's default listen
    host, the guard would refuse the start).
    """

    name = "spendtap"

    def __init__(self) -> None:
        self.addons = default_addons()
