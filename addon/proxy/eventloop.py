"""The event loop the sidecar runs on: uvloop by default, asyncio's own on request.

mitmproxy runs every connection on one asyncio event loop, and on a streaming load the
loop's own work is a large part of the proxy's: every chunk is a wake-up, a
``recv``, a ``send`` and a handful of callbacks. asyncio's loop does that in Python;
uvloop (libuv's, in C; the loop uvicorn uses) does it in C. Measured side by side
(bench/README.md, "On uvloop"): 6-10 % less CPU a request on paced streams, the same
bytes out.

``spendtap run`` picks the loop (``--event-loop``); ``mitmdump -s addon/spendtap.py``
run by hand keeps mitmdump's asyncio loop, and spendtap works the same on both.

    python -m spendtap.proxy.eventloop uvloop MITMDUMP-ARGS...

is mitmdump (mitmproxy's own ``mitmdump()``, every default addon, the same arguments)
on the named loop: what ``spendtap run --runner mitmdump`` executes. The lean runner
takes ``--event-loop`` itself.

This module imports neither click nor mitmproxy (``run_mitmdump`` imports mitmproxy
when it runs).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence

__all__ = [
    "DEFAULT_EVENT_LOOP",
    "EVENT_LOOPS",
    "EventLoopUnavailable",
    "loop_factory",
    "loop_name",
    "unavailable",
]

EVENT_LOOPS = ("uvloop", "asyncio")
# uvloop has no Windows build; there asyncio's loop is the only one.
DEFAULT_EVENT_LOOP = "asyncio" if sys.platform == "win32" else "uvloop"


class EventLoopUnavailable(Exception):
    """The event loop asked for cannot run here."""


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here (one line), or None if it can; imports nothing."""
    if name not in EVENT_LOOPS:
        return f"unknown event loop {name!r} (one of {', '.join(EVENT_LOOPS)})"
    if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
        return (
            "event loop uvloop: the uvloop package is not installed in "
            f"{sys.prefix} (pip install uvloop, or use --event-loop asyncio)"
        )
    return None


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What ``asyncio.Runner(loop_factory=...)`` takes for ``name`` (None: asyncio's own).

    Raises ``EventLoopUnavailable`` (one line) when it cannot run here."""
    problem = unavailable(name)
    if problem:
        raise EventLoopUnavailable(problem)
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as e:  # found but broken (a wheel for another platform)
        raise EventLoopUnavailable(f"event loop uvloop: cannot import uvloop: {e}") from e
    return uvloop.new_event_loop


def quiet_cancelled(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """An exception handler that lets a cancelled task pass without a word.

    At shutdown asyncio cancels the connection handlers still running; Python 3.12.1's
    stream protocol then reports each one as "Exception in callback ... CancelledError"
    with a traceback (later 3.12 releases check for cancellation first). A shutdown
    cancelling connections is no error. Anything else goes to the default handler."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def quiet_uvloop_policy():
    """uvloop's policy, its loops with ``quiet_cancelled`` until mitmproxy's master
    installs its own handler (and after it puts this one back)."""
    import uvloop

    class QuietPolicy(uvloop.EventLoopPolicy):
        def new_event_loop(self):
            loop = super().new_event_loop()
            loop.set_exception_handler(quiet_cancelled)
            return loop

    return QuietPolicy()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio`` (or the class of another loop), for the start-up log."""
    module = type(loop).__module__
    if module.startswith("uvloop"):
        return "uvloop"
    if module.startswith("asyncio"):
        return "asyncio"
    return f"{module}.{type(loop).__qualname__}"


def run_mitmdump(argv: Sequence[str]) -> int:
    """mitmdump with ``argv[1:]`` on the loop named by ``argv[0]``."""
    if not argv:
        print("usage: python -m spendtap.proxy.eventloop LOOP [MITMDUMP-ARGS...]", file=sys.stderr)
        return 2
    name, *args = argv
    try:
        factory = loop_factory(name)
    except EventLoopUnavailable as e:
        print(f"spendtap: {e}", file=sys.stderr)
        return 1
    if factory is not None:
        # mitmdump starts its loop with asyncio.run(), which asks the policy for one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # policies, Python >= 3.14
            asyncio.set_event_loop_policy(quiet_uvloop_policy())
    from mitmproxy.tools.main import mitmdump

    # Its usage and error lines name the program users know (and it reads sys.argv).
    sys.argv = ["mitmdump", *args]
    return mitmdump(list(args)) or 0


if __name__ == "__main__":
    sys.exit(run_mitmdump(sys.argv[1:]))
