"""Keep ``mitmdump -s`` from reloading spendtap's entry script while it runs.

mitmdump watches every script it loads: each second it stats the file and, when the
modification time changes (an upgrade installed in place, another commit checked out),
it removes the script's addons and loads them anew, with flows in flight and the ledger
writer being replaced under them. A sidecar is upgraded by restarting it. Once the proxy
runs, ``stop_reloading`` cancels that watcher for the script that holds the given addon:
the file is loaded once, and an idle sidecar no longer wakes every second. (The lean
runner loads the script once anyway.) If mitmproxy's internals are not what this
expects, nothing changes.
"""

from __future__ import annotations

from mitmproxy import ctx

__all__ = ["stop_reloading"]


def stop_reloading(addon) -> bool:
    """Cancel mitmdump's watcher of the script whose addons include ``addon``; True if
    one was cancelled."""
    loader = ctx.master.addons.get("scriptloader")
    for script in getattr(loader, "addons", None) or ():
        module = getattr(script, "ns", None)
        if module is None or not any(a is addon for a in getattr(module, "addons", None) or ()):
            continue
        task = getattr(script, "reloadtask", None)
        if task is None:
            return False
        # Called from the watcher itself (the script loaded after the proxy started), the
        # cancellation ends it at its next sleep.
        task.cancel()
        script.reloadtask = None
        return True
    return False
