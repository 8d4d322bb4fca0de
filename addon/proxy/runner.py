"""The lean runner: mitmproxy's ``Master`` with only the addons a sidecar needs.

``mitmdump -s addon/spendtap.py`` starts every default addon of mitmproxy (about forty:
replay, saving, map-local, sticky cookies, the browser launcher, ...), and mitmproxy
calls every hook on every addon of its chain, whether the addon has the hook or not
(a generator walk, a ``getattr`` and a context manager per addon, then the same again
for the ``update`` hook after every flow hook). A sidecar needs a handful of them.

``python -m spendtap.proxy.runner`` (what ``spendtap run --runner lean`` executes)
takes the options ``spendtap run`` gives mitmdump and starts:

- mitmproxy's own: ``Core`` (option checks), ``Block`` (``block_global``),
  ``ProxyAuth``, ``Proxyserver``, ``DnsResolver``, ``NextLayer``, ``TlsConfig``,
  ``UpstreamAuth`` (upstream mode), ``DisableH2C``, ``UpdateAltSvc`` (reverse mode),
  ``Dumper`` (``flow_detail``, ``-v``), ``ErrorCheck`` (an error logged at start-up
  exits 1) and the terminal log;
- the addons the entry script ``addon/spendtap.py`` exposes (``addons``), in the
  place mitmdump's script loader would hold them;

and dispatches each hook only to the addons that define it
(``spendtap.proxy.dispatch.HookCache``). Options of
mitmproxy addons it does not load are refused at start, in one line.

``--event-loop uvloop`` runs it on uvloop's event loop (what ``spendtap run`` passes by
default; ``spendtap.proxy.eventloop``).

Signals as mitmdump: SIGTERM and SIGINT shut down gracefully (the ``done`` hook
finalizes the flows in flight and drains the ledger writer).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import exceptions, hooks, master, optmanager
from mitmproxy import options as mitm_options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    dns_resolver,
    dumper,
    errorcheck,
    next_layer,
    proxyauth,
    proxyserver,
    tlsconfig,
    update_alt_svc,
    upstream_auth,
)

from spendtap.proxy.dispatch import HookCache
from spendtap.proxy.eventloop import (
    EVENT_LOOPS,
    EventLoopUnavailable,
    loop_factory,
    quiet_cancelled,
)

logger = logging.getLogger("spendtap.runner")

ENTRY_SCRIPT = Path(__file__).resolve().parent.parent / "spendtap.py"


class LeanMaster(master.Master):
    def __init__(self, opts: mitm_options.Options) -> None:
        super().__init__(opts, with_termlog=True)
        # Swap in the caching manager before any addon (the termlog above) is used.
        cached = HookCache(self)
        for addon in self.addons.chain:
            cached.chain.append(addon)
        cached.lookup.update(self.addons.lookup)
        self.addons = cached
        self.addons.add(
            core.Core(),
            block.Block(),
            proxyauth.ProxyAuth(),
            proxyserver.Proxyserver(),
        )
        # mitmdump's script loader sits here, between the proxy server and next_layer.
        self._script_slot = len(self.addons.chain)
        self.addons.add(
            dns_resolver.DnsResolver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            upstream_auth.UpstreamAuth(),
            disable_h2c.DisableH2C(),
            update_alt_svc.UpdateAltSvc(),
            dumper.Dumper(),
            errorcheck.ErrorCheck(),
        )

    def add_sidecar(self, addons: Sequence[object]) -> None:
        """The entry script's addons, where mitmdump's script loader would hold them,
        configured with every option (as the script loader does)."""
        slot = self._script_slot
        for addon in addons:
            self.addons.insert(slot, addon)
            slot += 1
        for addon in addons:
            self.addons.invoke_addon_sync(addon, hooks.ConfigureHook(set(self.options.keys())))


def entry_addons() -> list[object]:
    """The ``addons`` list of ``addon/spendtap.py``, the script ``mitmdump -s`` loads."""
    spec = importlib.util.spec_from_file_location("spendtap_entry_script", ENTRY_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.addons)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spendtap.proxy.runner",
        description="spendtap's lean runner: mitmproxy with only the addons a sidecar needs.",
    )
    p.add_argument("--mode", "-m", action="append", dest="mode", metavar="MODE")
    p.add_argument("--listen-host", dest="listen_host")
    p.add_argument("--listen-port", "-p", dest="listen_port", type=int)
    p.add_argument("--set", action="append", dest="setoptions", default=[], metavar="OPTION=VALUE")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--event-loop", choices=EVENT_LOOPS, default="asyncio", help="the proxy's event loop"
    )
    return p


def _configure_logging() -> None:
    # As mitmproxy.tools.main.run does.
    logging.getLogger().setLevel(logging.DEBUG)
    for name, level in (("tornado", logging.WARNING), ("asyncio", logging.WARNING),
                        ("hpack", logging.WARNING), ("quic", logging.WARNING)):  # fmt: skip
        logging.getLogger(name).setLevel(level)


async def _main(args: argparse.Namespace) -> LeanMaster:
    _configure_logging()
    opts = mitm_options.Options()
    lean = LeanMaster(opts)
    try:
        opts.set(*args.setoptions, defer=True)
        optmanager.load_paths(
            opts,
            os.path.join(opts.confdir, "config.yaml"),
            os.path.join(opts.confdir, "config.yml"),
        )
        given = {k: v for k, v in vars(args).items() if k in opts and v is not None}
        if args.quiet:
            given |= {"termlog_verbosity": "error", "flow_detail": 0}
        if args.verbose:
            given |= {"termlog_verbosity": "debug", "flow_detail": 2}
        opts.update(**given)
    except exceptions.OptionsError as e:
        print(f"spendtap: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        lean.add_sidecar(entry_addons())
    except Exception as e:  # the addon could not even load: one line, exit 1
        print(f"spendtap: cannot load the addon: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    unknown = sorted(opts.deferred)
    if unknown:
        # mitmdump would ignore them silently; here they name an addon it does not load.
        logger.error(
            f"spendtap: option(s) {', '.join(unknown)} unknown to the lean runner "
            "(not a spendtap option, nor one of the mitmproxy addons it loads); "
            "use --runner mitmdump for them"
        )

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: loop.call_soon_threadsafe(lean.shutdown))
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.call_soon_threadsafe(lean.shutdown))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await lean.run()
    # asyncio.run now cancels the connections still open; Python 3.12's stream protocol
    # then reports each cancelled handler as "Exception in callback ... CancelledError"
    # with a traceback. A shutdown cancelling connections is no error: keep the log clean.
    loop.set_exception_handler(quiet_cancelled)
    return lean


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        factory = loop_factory(args.event_loop)
    except EventLoopUnavailable as e:
        print(f"spendtap: {e}", file=sys.stderr)
        return 1
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
