"""Dispatch each mitmproxy hook only to the addons that have it.

mitmproxy's ``AddonManager.trigger_event`` walks its whole addon chain for every hook
of every flow: for each of mitmdump's forty-odd default addons (and spendtap's, inside
the script loader) it creates a coroutine, enters a ``safecall`` context manager, runs
two nested generators and a ``getattr``, whether the addon has the hook or not; and
each addon that has it rebuilds the hook's arguments (``dataclasses.fields``). Then the
same again for the ``update`` hook after every flow hook. For a metering sidecar that
is a large part of what a request costs the event loop (bench/README.md).

``HookCache`` keeps mitmproxy's manager and lists each hook's (addon, method) pairs once,
in chain order, rebuilding the lists whenever the chain can have changed: the chain
list replaced or of another length than when they were made (an addon added, inserted
or removed, the chain cleared, or grown behind the manager's back), an addon
registered, or options changed (the script loader re-orders its scripts from its
``configure``). The order, the error handling (an addon's exception is logged and the
others still run) and ``AddonHalt`` are mitmproxy's.

The lean runner builds its master with it; under ``mitmdump -s``, ``cache_hooks``
turns the running master's manager into one (its class is swapped in place: every
reference to the manager stays valid). If mitmproxy's manager is not the class this
was written against, nothing changes. ``spendtap_cache_hooks=false`` turns it back
(``uncache_hooks``): mitmproxy's own dispatch, in either runner.
"""

from __future__ import annotations

import inspect

from mitmproxy import addonmanager, exceptions, hooks

__all__ = ["HookCache", "cache_hooks", "uncache_hooks"]


class HookCache(addonmanager.AddonManager):
    """mitmproxy's addon manager, dispatching a hook only to the addons that have it."""

    _hooked: dict[str, list[tuple[object, object]]]
    _listed_chain: tuple[object, int]  # the chain list the lists were made from, its length

    def __init__(self, master_) -> None:
        super().__init__(master_)
        self._hooked = {}
        self._listed_chain = (None, 0)

    # Adding, inserting, removing or clearing changes the chain list's length or
    # replaces it, which ``_hooks_for`` notices; registering may add an addon below one
    # already in the chain (mitmproxy's script loader), which only this tells.
    def register(self, addon):
        self._hooked.clear()
        return super().register(addon)

    def insert(self, index: int, addon) -> None:
        """Register ``addon`` and put it at ``index`` in the chain."""
        self.chain.insert(index, self.register(addon))

    def trigger(self, event: hooks.Hook):
        try:
            return super().trigger(event)
        finally:
            if isinstance(event, hooks.ConfigureHook):
                # An addon's configure may change its children (the script loader).
                self._hooked.clear()

    def _hooks_for(self, event: hooks.Hook) -> list[tuple[object, object]]:
        chain = self.chain
        if self._listed_chain[0] is not chain or self._listed_chain[1] != len(chain):
            # Added to, removed from, cleared (mitmproxy replaces the list), or grown
            # behind the manager's back (``chain.append``): list everything again.
            self._hooked.clear()
            self._listed_chain = (chain, len(chain))
        found = self._hooked.get(event.name)
        if found is None:
            found = []
            for top in self.chain:
                found.extend(self._iter_hooks(top, event))
            self._hooked[event.name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self._hooks_for(event)
        if not handlers:
            return
        args = event.args()
        for _addon, func in handlers:
            try:
                with addonmanager.safecall():
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except exceptions.AddonHalt:
                return


def cache_hooks(manager: addonmanager.AddonManager) -> bool:
    """Make a running master's addon manager a ``HookCache``; True if it became one
    (False: it already was, or it is not mitmproxy's own ``AddonManager``)."""
    if type(manager) is not addonmanager.AddonManager:
        return False
    manager._hooked = {}
    manager._listed_chain = (None, 0)
    manager.__class__ = HookCache
    return True


def uncache_hooks(manager: addonmanager.AddonManager) -> bool:
    """Give a ``HookCache`` back mitmproxy's own dispatch; True if it was one."""
    if type(manager) is not HookCache:
        return False
    manager.__class__ = addonmanager.AddonManager
    return True
