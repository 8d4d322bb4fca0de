"""The single writer thread that batches request rows into the ledger.

mitmproxy's event loop must never wait on SQLite, so hooks hand finished rows
to ``LedgerWriter.submit``, which only appends to an in-memory queue (under a
lock held for microseconds) and never raises. One background thread owns its
own ledger connection: it takes everything queued (up to ``batch_size``;
``max_delay_s``, 0 by default, can make it wait for a batch to fill), inserts
it in one transaction, commits, then calls each row's ``on_commit``. With no
wait this is group commit: rows that arrive while one transaction commits
form the next one, so batches grow with load and a lone row is not delayed
(the end of a response waits for its row's commit).

Settling budgets: the ledger's triggers delete, in that same transaction,
the budget reservation whose id is a row's id (the flow id), and add the row's
tokens to its budgets' spend. So a request's usage
becomes spend at the very commit that drops its reservation, and a row with no
usage releases its whole reservation. A row this writer drops never settles:
its reservation stays open until ``Budgets.sweep`` releases it.

Failure policy (metering never breaks a proxied call; every failure to meter is
counted and logged):

- A failed write (database locked beyond the busy timeout, read-only or full
  disk, the file deleted or replaced, any ``StorageError``) keeps the rows in
  memory and retries with capped exponential backoff (0.05 s doubling to 2 s).
  The connection is reopened before a retry, so a deleted ledger is recreated
  as soon as its path is usable again.
- One warning per failure episode, not per row or attempt; one line when
  writes recover. ``write_errors`` counts failed attempts.
- At most ``max_pending`` rows are held; past that the oldest are dropped,
  counted in ``dropped_rows`` and logged once per episode.
- An accepted row is never lost while the process lives and the disk becomes
  writable again. ``INSERT OR IGNORE`` on the flow id makes a retry of a batch
  whose commit did land harmless.
- A row that is not a valid ledger row is refused at ``submit`` (counted in
  ``dropped_rows``, logged), so no bad row can wedge the queue.
- Deleting the file under an open SQLite connection does not make writes fail
  (they land in the unlinked inode), so the writer checks that the path still
  names the file it opened before and after each commit, and writes the batch
  again into the new file if not.
- Exceptions from ``on_commit`` callbacks are logged and counted in
  ``callback_errors``, never fatal.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

from spendtap.store.ledger import Ledger, LedgerBusy, LedgerError, RowRefused, normalize_row

__all__ = ["LedgerWriter"]

_default_logger = logging.getLogger("spendtap.store.writer")

# Errors in the rows themselves: retrying the same batch would fail forever.
_ROW_ERRORS = (RowRefused, ValueError, TypeError)


class _FileReplaced(Exception):
    """The ledger path no longer names the file the connection has open."""


class WriterFigures:
    """What both writers (this thread, ``writer_process``'s child) show the metrics, and
    how both run a committed batch's callbacks.

    ``_pending`` holds ``(seq, row, on_commit, submitted_at)`` for every row accepted
    and not yet committed, oldest first.
    """

    stuck_after_s: float
    after_commit: Callable[[list[dict]], None] | None
    log: logging.Logger
    _pending: deque
    _rows_written: int
    _batches_written: int
    _callback_errors: int
    _last_commit_at: float | None

    @property
    def rows_written(self) -> int:
        """Rows committed (a duplicate id, which the ledger ignores, counts too)."""
        return self._rows_written

    @property
    def batches_written(self) -> int:
        return self._batches_written

    @property
    def callback_errors(self) -> int:
        return self._callback_errors

    @property
    def last_commit_at(self) -> float | None:
        """Unix time of the last successful commit, None before the first."""
        return self._last_commit_at

    @property
    def stuck(self) -> bool:
        """True when a row has waited more than ``stuck_after_s`` to be committed."""
        try:
            oldest = self._pending[0][3]
        except IndexError:
            return False
        return time.monotonic() - oldest > self.stuck_after_s

    def _call_back(self, batch: list) -> None:
        """Each committed row's ``on_commit``, then ``after_commit`` with the rows."""
        for entry in batch:
            callback = entry[2]
            if callback is None:
                continue
            try:
                callback()
            except Exception:
                self._callback_errors += 1
                self.log.warning("spendtap ledger: an on_commit callback failed", exc_info=True)
        # After the responses waiting on these rows are released: cost metrics.
        if self.after_commit is not None:
            try:
                self.after_commit([entry[1] for entry in batch])
            except Exception:
                self._callback_errors += 1
                self.log.warning("spendtap ledger: after-commit callback failed", exc_info=True)


class LedgerWriter(WriterFigures):
    """Batches rows into the ledger at ``path`` from one background thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_size: int = 512,
        max_delay_s: float = 0.0,
        max_pending: int = 200_000,
        logger: logging.Logger | None = None,
        busy_timeout_s: float = 5.0,
        stuck_after_s: float = 30.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        price_row: Callable[[dict], None] | None = None,
        after_commit: Callable[[list[dict]], None] | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.path = os.fspath(path)
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self.max_pending = max_pending
        self.busy_timeout_s = busy_timeout_s
        self.stuck_after_s = stuck_after_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.log = logger or _default_logger
        # Pricing runs here, on the writer's thread, never on the event loop: it sets a
        # row's cost_nusd and price_source before its first write attempt.
        self.price_row = price_row
        self.after_commit = after_commit
        self._warned_pricing = False

        self._cond = threading.Condition()
        # (seq, row, on_commit, submitted_at): rows leave only once committed or dropped.
        self._pending: deque[tuple[int, dict, Callable[[], None] | None, float]] = deque()
        self._next_seq = 0
        self._closing = False
        self._close_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._in_callbacks = False
        self._dropping = False
        self._warned_closed = False
        self._abandoned = 0

        self._ledger: Ledger | None = None
        self._file_id: tuple[int, int] | None = None

        self._rows_written = 0
        self._batches_written = 0
        self._write_errors = 0
        self._dropped_rows = 0
        self._callback_errors = 0
        self._last_commit_at: float | None = None
        self._failing_since: float | None = None

    # -- figures --------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Rows accepted and not yet committed (including a batch being retried)."""
        return len(self._pending)

    @property
    def write_errors(self) -> int:
        """Failed write attempts (each retry of a failing batch counts)."""
        return self._write_errors

    @property
    def dropped_rows(self) -> int:
        """Rows given up: invalid, past ``max_pending``, after close, or unwritten at close."""
        return self._dropped_rows

    @property
    def failing(self) -> bool:
        """True while writes fail (from the first failure until a commit succeeds)."""
        return self._failing_since is not None

    # -- the caller's side ----------------------------------------------------

    def start(self) -> None:
        """Open (create, migrate) the ledger on the writer thread and start writing.

        Raises what opening raised (``LedgerError``, ``OSError``),
        so a bad path or a corrupt file fails at start.
        """
        if self._thread is not None:
            raise RuntimeError("LedgerWriter already started")
        opened = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(opened, failure), name="spendtap-ledger-writer", daemon=True
        )
        self._thread.start()
        opened.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    def submit(self, row: Mapping[str, Any], on_commit: Callable[[], None] | None = None) -> None:
        """Queue one row; ``on_commit`` runs on the writer thread once it is committed.

        Never blocks on SQLite and never raises: an invalid row, or a row submitted
        after ``close``, is counted in ``dropped_rows`` and logged.
        """
        try:
            prepared = normalize_row(row)
        except Exception as e:
            self._dropped_rows += 1
            self.log.warning("spendtap ledger: dropped an invalid row: %s", e)
            return
        try:
            dropped = 0
            with self._cond:
                if self._closing:
                    self._dropped_rows += 1
                    warn_closed = not self._warned_closed
                    self._warned_closed = True
                else:
                    warn_closed = False
                    self._pending.append((self._next_seq, prepared, on_commit, time.monotonic()))
                    self._next_seq += 1
                    while len(self._pending) > self.max_pending:
                        self._pending.popleft()
                        dropped += 1
                    self._dropped_rows += dropped
                    start_dropping = dropped and not self._dropping
                    if dropped:
                        self._dropping = True
                    self._cond.notify_all()
            if warn_closed:
                self.log.warning("spendtap ledger: a row arrived after the writer closed; dropped")
            elif dropped and start_dropping:
                self.log.warning(
                    "spendtap ledger: %d rows are waiting for %s; dropping the oldest",
                    self.max_pending,
                    self.path,
                )
        except Exception:  # never raise into the proxy
            self._dropped_rows += 1

    def flush(self, timeout: float) -> bool:
        """Wait until every row submitted before this call is committed (or dropped).

        Returns False if that did not happen within ``timeout`` seconds.
        """
        with self._cond:
            target = self._next_seq - 1
            return self._cond.wait_for(
                lambda: (
                    (not self._pending or self._pending[0][0] > target) and not self._in_callbacks
                ),
                timeout,
            )

    def close(self, timeout: float) -> bool:
        """Drain the queue (for at most ``timeout`` seconds), then stop the thread.

        Returns True if every accepted row was committed. Rows still unwritten
        at the deadline are counted in ``dropped_rows`` and logged.
        """
        with self._cond:
            if not self._closing:
                self._closing = True
                self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            left = len(self._pending)
            if left:
                self._dropped_rows += left
                self._pending.clear()
                self.log.error("spendtap ledger: writer never started; %d rows not written", left)
            return left == 0
        # A write in progress may wait out its busy timeout past the deadline.
        thread.join(timeout + self.busy_timeout_s + 1.0)
        if thread.is_alive():
            self.log.error(
                "spendtap ledger: writer did not stop in time; %d rows not written",
                len(self._pending),
            )
            return False
        return not self._pending and not self._abandoned

    # -- the writer thread ----------------------------------------------------

    def _open(self) -> None:
        ledger = Ledger(self.path, busy_timeout_s=self.busy_timeout_s)
        # Autocommit: a batch that fits one INSERT is its own transaction, without the
        # BEGIN and COMMIT steps (each a GIL hand-off with the event loop).
        ledger.db.conn.isolation_level = None
        try:
            st = os.stat(self.path)
        except OSError:
            ledger.close()
            raise
        self._ledger = ledger
        self._file_id = (st.st_dev, st.st_ino)

    def _drop_connection(self) -> None:
        if self._ledger is not None:
            with contextlib.suppress(Exception):
                self._ledger.close()
        self._ledger = None
        self._file_id = None

    def _check_file(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise _FileReplaced(f"the ledger file is gone ({e.strerror})") from None
        if (st.st_dev, st.st_ino) != self._file_id:
            raise _FileReplaced("the ledger file was replaced")

    def _run(self, opened: threading.Event, failure: list[BaseException]) -> None:
        try:
            self._open()
        except BaseException as e:
            failure.append(e)
            opened.set()
            return
        opened.set()
        try:
            self._loop()
        except BaseException:  # a bug; say so loudly rather than die silently
            self.log.exception("spendtap ledger: the writer thread crashed")
            raise
        finally:
            self._drop_connection()

    def _stopping(self) -> bool:
        """Closing, and nothing left to write or no time left to write it: give up what is
        left (counted and logged) and say so."""
        if not self._closing or (self._pending and time.monotonic() < self._close_deadline):
            return False
        left = len(self._pending)
        if left:
            self._dropped_rows += left
            self._abandoned += left
            self._pending.clear()
            self.log.error(
                "spendtap ledger: closing with %d rows not written to %s", left, self.path
            )
        return True

    def _take_batch(self, healthy: bool) -> list | None:
        """Wait for rows and return the next batch, or None when it is time to stop."""
        with self._cond:
            if healthy or not self._pending:
                self._cond.wait_for(lambda: self._pending or self._closing)
            if self._stopping():
                self._cond.notify_all()
                return None
            if (
                self.max_delay_s > 0
                and healthy
                and not self._closing
                and len(self._pending) < self.batch_size
            ):
                self._cond.wait_for(
                    lambda: len(self._pending) >= self.batch_size or self._closing,
                    self.max_delay_s,
                )
            return list(islice(self._pending, self.batch_size))

    def _loop(self) -> None:
        backoff = 0.0
        attempts = 0
        while True:
            batch = self._take_batch(healthy=self._failing_since is None)
            if batch is None:
                return
            if not batch:
                continue
            if self.price_row is not None:
                self._price(batch)
            error = self._write(batch)
            if error is None:
                if self._failing_since is not None:
                    self.log.warning(
                        "spendtap ledger: writes to %s recovered after %.1f s (%d failed attempts)",
                        self.path,
                        time.monotonic() - self._failing_since,
                        attempts,
                    )
                    self._failing_since = None
                    attempts = 0
                    backoff = 0.0
                self._committed(batch)
                continue
            self._write_errors += 1
            attempts += 1
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                self.log.warning(
                    "spendtap ledger: cannot write to %s (%s); keeping rows in memory and retrying",
                    self.path,
                    error,
                )
            backoff = min(self.backoff_max_s, backoff * 2) if backoff else self.backoff_initial_s
            self._sleep(backoff)

    def _sleep(self, seconds: float) -> None:
        """Back off, waking early (once) when close is requested, never past its deadline."""
        with self._cond:
            was_closing = self._closing
            end = time.monotonic() + seconds
            if was_closing:
                end = min(end, self._close_deadline)
            while (left := end - time.monotonic()) > 0:
                if self._closing and not was_closing:
                    return
                self._cond.wait(left)

    def _price(self, batch: list) -> None:
        for entry in batch:
            row = entry[1]
            if "_priced" in row:
                continue
            try:
                self.price_row(row)
            except Exception as e:  # a price must never cost a row
                row["cost_nusd"] = None
                row["price_source"] = "none"
                if not self._warned_pricing:
                    self._warned_pricing = True
                    self.log.warning("spendtap ledger: cannot price row %s: %s", row.get("id"), e)
            row["_priced"] = True

    def _write(self, batch: list) -> str | None:
        """Insert one batch; None on success, else a short reason."""
        try:
            if self._ledger is None:
                self._open()
            # The file is checked after the commit only (a stat gives up the GIL too): a
            # batch written to a file deleted or replaced just before is written again
            # to the new one, where INSERT OR IGNORE keeps it once.
            try:
                self._ledger.insert_rows([entry[1] for entry in batch], normalized=True)
            except _ROW_ERRORS:
                self._write_one_by_one(batch)
            # Deleted or replaced during the commit: the rows went to a dead inode.
            self._check_file()
            return None
        except (LedgerError, OSError, _FileReplaced) as e:
            # Locked: the connection is fine and the same write may pass in a moment.
            if not isinstance(e, LedgerBusy):
                self._drop_connection()  # reopen (recreating a deleted ledger) next time
            return str(e) or type(e).__name__

    def _write_one_by_one(self, batch: list) -> None:
        """A batch a row of which SQLite refuses: write the others, drop that one."""
        for entry in batch:
            try:
                self._ledger.insert_rows([entry[1]], normalized=True)
            except _ROW_ERRORS as e:
                self._dropped_rows += 1
                self.log.warning("spendtap ledger: dropped row %s: %s", entry[1].get("id"), e)

    def _committed(self, batch: list) -> None:
        upto = batch[-1][0]
        with self._cond:
            removed = 0
            while self._pending and self._pending[0][0] <= upto:
                self._pending.popleft()
                removed += 1
            # Rows dropped for space while this batch was being written were written after all.
            self._dropped_rows -= len(batch) - removed
            if self._dropping and len(self._pending) < self.max_pending:
                self._dropping = False
            self._rows_written += len(batch)
            self._batches_written += 1
            self._last_commit_at = time.time()
            self._in_callbacks = True
        try:
            self._call_back(batch)
        finally:
            with self._cond:
                self._in_callbacks = False
                self._cond.notify_all()
