"""The recording addon: where finished rows go, priced.

It owns the prices (``spendtap.pricing``), the ledger and its single writer (a child
process, ``spendtap.store.writer_process``, or with ``spendtap_ledger_process=false`` a
thread, ``spendtap.store.writer``) and the optional JSONL access log. The ledger is created
and migrated when it is configured, so a bad path stops the sidecar before it listens
anywhere (the metrics port comes later in the addon list).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mitmproxy import ctx, exceptions

from spendtap.paths import default_db_path
from spendtap.pricing import PriceFileError, Pricer
from spendtap.proxy.accesslog import AccessLog
from spendtap.proxy.failclosed import SpendtapAddon
from spendtap.store.ledger import Ledger, LedgerError, StorageError
from spendtap.store.writer import LedgerWriter
from spendtap.store.writer_process import ProcessLedgerWriter, WriterProcessError

logger = logging.getLogger("spendtap")


class Recording(SpendtapAddon):
    name = "spendtap-recording"
    OPTIONS = ("spendtap_db", "spendtap_prices", "spendtap_access_log", "spendtap_ledger_process")

    def __init__(self, fail_closed, monitoring) -> None:
        super().__init__(fail_closed)
        # Committed rows' costs go to the metrics (read through it: they may be rebuilt).
        self.monitoring = monitoring
        self.pricer: Pricer | None = None
        self.writer: LedgerWriter | ProcessLedgerWriter | None = None
        self.db_path: str | None = None
        self._writer_for: tuple | None = None  # what the writer was made for
        self.access_log: AccessLog | None = None
        # Called after each committed batch, on whichever thread learns of the commit.
        self.commit_listeners: list[Callable[[], None]] = []

    def reconfigure(self, updated: set[str]) -> None:
        if "spendtap_prices" in updated or self.pricer is None:
            self._configure_prices()
        # The writer process prices rows with a price file of its own reading: a new
        # one starts a new process (``_configure_ledger`` keeps a writer that fits).
        if {"spendtap_db", "spendtap_ledger_process", "spendtap_prices"} & updated or (
            self.writer is None
        ):
            self._configure_ledger()
        if "spendtap_access_log" in updated:
            self._configure_access_log()

    def _configure_prices(self) -> None:
        path = ctx.options.spendtap_prices
        try:
            self.pricer = Pricer.from_path(path or None)
        except PriceFileError as e:
            raise exceptions.OptionsError(f"spendtap_prices: {e}") from e
        if path:
            models = len(self.pricer.price_file.exact) + len(self.pricer.price_file.globs)
            logger.info(f"spendtap: prices from {path} ({models} entries), then the catalogue")

    def _configure_ledger(self) -> None:
        path = ctx.options.spendtap_db or str(default_db_path())
        process = ctx.options.spendtap_ledger_process
        wanted = (path, process, ctx.options.spendtap_prices if process else None)
        if wanted == self._writer_for and self.writer is not None:
            return
        try:
            Ledger(path).close()  # create and migrate now, so a bad path fails at start
        except Exception as e:  # LedgerError (worded), OSError or StorageError (SQLite's words)
            worded = isinstance(e, LedgerError) and not isinstance(e, StorageError)
            message = f"spendtap_db: {e}" if worded else f"spendtap_db: {path}: {e}"
            raise exceptions.OptionsError(message) from e
        if self.writer is not None:
            self.writer.close(timeout=10)
            self.writer = None
        how = "from a thread"
        if process:
            self.writer = self._writer_process(path)
            how = "from a writer process" if self.writer is not None else how
        if self.writer is None:
            self.writer = LedgerWriter(
                path, logger=logger, price_row=self._price_row, after_commit=self._after_commit
            )
            self.writer.start()
        self.db_path = path
        self._writer_for = wanted
        logger.info(f"spendtap: metering to ledger {path} ({how})")

    def _writer_process(self, path: str) -> ProcessLedgerWriter | None:
        """The writer process, or None (and a warning) where it cannot run: the
        thread writer meters the same, with the event loop's GIL to share."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # not inside mitmproxy's loop (an embedding that configures early)
        writer = ProcessLedgerWriter(
            path,
            prices=ctx.options.spendtap_prices or None,
            logger=logger,
            after_commit=self._after_commit,
        )
        try:
            writer.start(loop)
        except WriterProcessError as e:
            logger.warning(f"spendtap: {e}; writing the ledger from a thread instead")
            return None
        return writer

    def _configure_access_log(self) -> None:
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        path = ctx.options.spendtap_access_log
        if path:
            try:
                self.access_log = AccessLog(path)
            except OSError as e:
                raise exceptions.OptionsError(f"spendtap_access_log: {e}") from e

    def _price_row(self, row: dict) -> None:
        # The writer's thread: the pricer in use when the row is written.
        self.pricer.apply(row)

    def _after_commit(self, rows: list[dict]) -> None:
        """Committed rows: their costs to the metrics, then the listeners."""
        metrics = self.monitoring.metrics
        if metrics is not None:
            for row in rows:
                metrics.observe_cost(row)
        for listener in self.commit_listeners:
            listener()

    def submit(self, row: dict, on_commit=None) -> bool:
        """Queue a row for the ledger; False when there is no writer to take it."""
        if self.writer is None:
            return False
        self.writer.submit(row, on_commit)
        return True

    def log_access(self, row: dict) -> None:
        if self.access_log is not None:
            self.access_log.write(row)

    def done(self) -> None:
        # After the flow hooks' done (earlier in the list) submitted the rows in flight.
        if self.writer is not None:
            self.writer.close(timeout=30)
        if self.access_log is not None:
            self.access_log.close()
