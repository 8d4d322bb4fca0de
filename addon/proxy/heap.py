"""Keep the cyclic garbage collector's full passes short: freeze the start-up heap.

Python's collector walks every tracked object of the oldest generation in a full
pass, and a pass holds the interpreter (the event loop with it): every stream the
sidecar relays stops until it ends. A running sidecar's heap is mostly what start-up
made (mitmproxy, its addons, spendtap, the price catalogue: ~125,000 objects) and
lives as long as the process, yet each full pass walked all of it again: 50 to 70 ms on
a shared vCPU, every 10 s or so at 64 paced streams (mitmproxy's flows hold reference
cycles and live as long as a response, so their objects reach the oldest generation
and set the passes off). In a closed loop of paced clients such a stop also bunches
every stream whose events arrived during it (bench/README.md, "Pauses of the
collector").

``freeze`` collects once, then moves every object there is into the collector's
permanent generation (``gc.freeze``), which its passes skip: a full pass then walks
only what was made since, mostly the flows in flight (10 to 16 ms in the same load).
Frozen objects are still freed by reference counting; only a reference cycle among
them is never collected, so the heap is collected and frozen again after a
configuration change at run time (which replaces what the old settings built), and
given back at shutdown (``unfreeze``).
"""

from __future__ import annotations

import gc
import logging

from mitmproxy import ctx

from spendtap.proxy.failclosed import SpendtapAddon

__all__ = ["Heap", "freeze", "unfreeze"]

logger = logging.getLogger("spendtap")


def freeze() -> int:
    """Collect, then freeze everything there is; how many objects are frozen."""
    gc.unfreeze()  # a second freeze collects what became garbage since the first
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Give the frozen objects back to the collector (into the oldest generation)."""
    gc.unfreeze()


class Heap(SpendtapAddon):
    """Freezes the heap once the sidecar runs (``spendtap_gc_freeze``); last in the list,
    so everything the other addons built at start-up is in it."""

    name = "spendtap-heap"
    OPTIONS = ("spendtap_gc_freeze",)

    def __init__(self, fail_closed) -> None:
        super().__init__(fail_closed)
        self._froze = False  # the heap is ours to give back (the switch off, shutdown)

    def running(self) -> None:
        self._apply()

    def reconfigure(self, updated: set[str]) -> None:
        if self.fail_closed.is_running:
            self._apply()

    def _apply(self) -> None:
        if getattr(ctx.options, "spendtap_gc_freeze", True):
            count = freeze()
            self._froze = True
            logger.debug(f"spendtap: {count} objects frozen out of the collector's passes")
        else:
            self._give_back()

    def done(self) -> None:
        self._give_back()

    def _give_back(self) -> None:
        if self._froze:
            unfreeze()
            self._froze = False
