"""Never proxy unmetered: the state every spendtap addon defers to, and their common base.

``FailClosed`` holds the one "refuse to meter" state of the sidecar. It checks the
``--set`` values mitmproxy deferred for spendtap before any of spendtap's options is
registered (a value mitmproxy fails to parse would make it drop the whole script and
keep proxying unmetered; see ``spendtap.options.take_deferred``), and it turns a
setting spendtap cannot honour into a stop at start, or into a refusal (503) of every
request where nothing could stop the process.

``SpendtapAddon`` is the base of the other addons (see ``spendtap.proxy.addons``): each
declares its own share of the option table in ``load``, reacts to its options in
``configure`` and hands every problem to ``FailClosed``: at start it stops the sidecar,
at run time mitmproxy rolls the change back and the old settings stay. The values
themselves are checked against the table by ``FailClosed``, first in the list.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions

from spendtap.options import BY_NAME, OptionError, take_deferred
from spendtap.proxy.noreload import stop_reloading

logger = logging.getLogger("spendtap")


class FailClosed:
    name = "spendtap-failclosed"

    def __init__(self) -> None:
        # A setting that could not be honoured: every request is refused (503).
        self.misconfiguration: str | None = None
        self.is_running = False

    def load(self, loader) -> None:
        # Before any spendtap option is registered: mitmproxy applies deferred values once
        # their addon has loaded, and drops the script if one fails to parse.
        problems = take_deferred(loader.master.options.deferred)
        if problems:
            self.refuse_to_meter("; ".join(problems))

    def configure(self, updated: set[str]) -> None:
        # First in the list: every changed value is checked against the table before any
        # addon acts on one, so a change with one bad value changes nothing.
        try:
            for name in sorted(updated):
                if name in BY_NAME:
                    BY_NAME[name].validate(getattr(ctx.options, name))
        except OptionError as e:
            self.reject(str(e))

    def running(self) -> None:
        self.is_running = True
        if stop_reloading(self):
            logger.info(
                "spendtap: the entry script is loaded once (mitmdump's reload on change is "
                "off: restart the sidecar to upgrade it)"
            )

    def reject(self, problem: str) -> None:
        """An addon cannot honour a setting (called from its ``configure``)."""
        if self.is_running:
            # A change at run time: mitmproxy rolls it back, the old settings stay.
            raise exceptions.OptionsError(problem)
        self.refuse_to_meter(problem)

    def refuse_to_meter(self, problem: str) -> None:
        """A setting spendtap cannot honour: stop mitmdump, and never proxy unmetered.

        An error logged during start-up makes mitmdump exit 1 (its errorcheck addon);
        wherever nothing stops the process, every request gets a 503 naming the
        problem and nothing reaches the upstream.
        """
        self.misconfiguration = problem
        logger.error(f"spendtap: {problem}")
        if not self.is_running and getattr(ctx.options, "server", False):
            # Not even listen: mitmdump may load scripts while its servers come up, and
            # a client that connects before errorcheck exits would see a reset and a
            # traceback in the log. With no server there is nothing to connect to.
            ctx.options.update(server=False)

    def client_connected(self, client) -> None:
        if self.misconfiguration is not None and not self.is_running:
            # Start-up failed and mitmdump is about to exit: close the connection now,
            # before it is half-way through a request when the process goes.
            client.error = "spendtap is misconfigured"


class SpendtapAddon:
    """One concern of spendtap's: its options from the table, and its reaction to them.

    Subclasses name their options in ``OPTIONS`` (each option has one owner) and
    build what they decide in ``reconfigure``, which is not called once the sidecar
    is misconfigured (nothing more is set up then: every request is refused anyway).
    """

    name = "spendtap-addon"
    OPTIONS: tuple[str, ...] = ()

    def __init__(self, fail_closed: FailClosed) -> None:
        self.fail_closed = fail_closed

    def load(self, loader) -> None:
        for name in self.OPTIONS:
            option = BY_NAME[name]
            loader.add_option(option.name, option.type, option.default, option.help, option.choices)

    def configure(self, updated: set[str]) -> None:
        if self.fail_closed.misconfiguration is not None:
            return
        try:
            self.reconfigure(updated)
        except (OptionError, exceptions.OptionsError) as e:
            self.fail_closed.reject(str(e))

    def reconfigure(self, updated: set[str]) -> None:
        """Build what the changed options (``updated``) decide; by default nothing."""
