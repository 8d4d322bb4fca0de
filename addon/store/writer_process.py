"""The ledger writer in a child process, fed through a pipe from the event loop.

Why a process: the writer thread (``spendtap.store.writer``) shares the interpreter
with mitmproxy's event loop, and sqlite3 gives up the GIL around every step, so each
commit costs a few GIL hand-offs with the busy loop (context switches, wake-ups): at
``stream-unpaced-c16`` the thread spent ~0.29 ms of CPU a request against ~0.05 ms of
SQLite work (bench/README.md, "The ledger writer in a process"). A child process
commits with an interpreter of its own; the loop pays one pipe write per loop
iteration and reads acknowledgements with the sockets it already polls.

The child (``python -c _BOOT``: this copy of the package, then ``child_main``) runs the same
``LedgerWriter``, so the failure policy does not change (busy retries, backoff, a
replaced file, a full disk, pricing on the writer). What crosses the pipes:

- parent → child: frames of rows already checked (``normalize_row``), each with its
  sequence number;
- child → parent: the sequence numbers committed (with each row's price, for the
  cost metrics), the writer's figures when they change, and its log lines (logged
  by the parent, so they read like every other spendtap line).

A row stays in the parent's memory until the child says it committed: if the child
dies it is started again and sent everything unacknowledged (``INSERT OR IGNORE``
keeps a row once). If the parent dies, the child sees the end of its input, commits
what it received and exits. The parent never blocks on the pipe: a write the pipe
cannot take now waits for the loop to say it is writable.

Frames are ``marshal`` (4-byte little-endian length, then the data): both ends are
this program, and rows hold only text, numbers and None.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from spendtap.store.ledger import normalize_row
from spendtap.store.writer import LedgerWriter, WriterFigures

__all__ = ["ProcessLedgerWriter", "WriterProcessError"]

_default_logger = logging.getLogger("spendtap.store.writer")

_LEN = 4
# How long the parent waits for a new child to open the ledger.
START_TIMEOUT_S = 30.0
# Restarts of a child that keeps dying are spaced out up to this.
RESTART_MAX_S = 5.0
# After its input ends, the child has this long to commit what it holds.
CLOSE_TIMEOUT_S = 30.0

# Rows a frame at most (a child started again is sent its backlog in pieces).
ROWS_A_FRAME = 4096
# What the child reads from its pipe at once.
_READ_SIZE = 1 << 16

_COMMITTED, _STATUS, _LOG, _READY, _FAILED = "c", "s", "l", "r", "e"

# The child runs this very copy of spendtap, loaded from its folder as the entry script
# loads a bare checkout (``addon/spendtap.py``): installed or not, the same code.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOT = """\
import importlib.util, os, sys
pkg = sys.argv[1]
spec = importlib.util.spec_from_file_location(
    "spendtap", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
module = importlib.util.module_from_spec(spec)
sys.modules["spendtap"] = module
spec.loader.exec_module(module)
from spendtap.store.writer_process import child_main
sys.exit(child_main(sys.argv[2:]))
"""


class WriterProcessError(Exception):
    """The writer process could not be started (or did not open the ledger)."""


def _frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return len(data).to_bytes(_LEN, "little") + data


def _rows_frames(entries: Iterable[tuple]) -> bytes:
    """Frames of ``(seq, row)`` for queue entries, ``ROWS_A_FRAME`` rows at most each."""
    out = bytearray()
    rows = [(entry[0], entry[1]) for entry in entries]
    for i in range(0, len(rows), ROWS_A_FRAME):
        out += _frame(rows[i : i + ROWS_A_FRAME])
    return bytes(out)


def _wait_for(fd: int, event: int, timeout: float | None) -> bool:
    """Whether ``fd`` is ready for ``event`` within ``timeout`` seconds (None: however
    long it takes; poll, not select: a busy proxy's descriptors go past select's limit
    of 1024)."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def _read_until(fd: int, deadline: float, buf: bytearray) -> Iterator[Any]:
    """The messages read from ``fd`` (blocking, ``buf`` holding a partial frame) until
    its end or ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        if not _wait_for(fd, select.POLLIN, left):
            continue
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not data:
            return
        buf += data
        yield from _frames(buf)


def _frames(buf: bytearray) -> list[Any]:
    """Take every whole frame off the front of ``buf``."""
    out = []
    pos = 0
    while len(buf) - pos >= _LEN:
        n = int.from_bytes(buf[pos : pos + _LEN], "little")
        if len(buf) - pos - _LEN < n:
            break
        out.append(marshal.loads(bytes(buf[pos + _LEN : pos + _LEN + n])))
        pos += _LEN + n
    del buf[:pos]
    return out


class ProcessLedgerWriter(WriterFigures):
    """``LedgerWriter``'s interface (what the proxy uses of it), writing through a child.

    ``submit`` must be called on the event loop's thread once ``start`` ran there
    (the hooks do); ``close`` may block (at shutdown).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        prices: str | None = None,
        max_pending: int = 200_000,
        max_buffered_bytes: int = 8 << 20,
        logger: logging.Logger | None = None,
        stuck_after_s: float = 30.0,
        after_commit: Callable[[list[dict]], None] | None = None,
        python: str | None = None,
    ):
        self.path = os.fspath(path)
        self.prices = prices
        self.max_pending = max_pending
        self.max_buffered_bytes = max_buffered_bytes
        self.stuck_after_s = stuck_after_s
        self.after_commit = after_commit
        self.log = logger or _default_logger
        self.python = python or sys.executable

        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: subprocess.Popen | None = None
        self._out = bytearray()  # bytes the pipe has not taken yet
        self._in = bytearray()
        # Rows submitted in this loop iteration, then rows sent and not acknowledged:
        # (seq, row, on_commit, submitted_at).
        self._batch: list[tuple[int, dict, Callable[[], None] | None, float]] = []
        self._pending: deque[tuple[int, dict, Callable[[], None] | None, float]] = deque()
        self._scheduled = False
        self._ready = False
        self._sent_upto = 0  # the last sequence number framed for the current child
        self._next_seq = 1
        self._closing = False
        self._restart_after = 0.0
        self._restarts = 0

        self._rows_written = 0
        self._batches_written = 0
        self._dropped_rows = 0
        self._callback_errors = 0
        self._child_write_errors = 0
        self._child_dropped = 0
        self._child_failing = False
        self._earlier_write_errors = 0
        self._earlier_dropped = 0
        self._last_commit_at: float | None = None
        self._lost_child = False

    # -- figures (``WriterFigures``: the rest) ------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._batch)

    @property
    def write_errors(self) -> int:
        return self._child_write_errors

    @property
    def dropped_rows(self) -> int:
        return self._dropped_rows + self._child_dropped

    @property
    def failing(self) -> bool:
        return self._child_failing or self._lost_child

    # -- the parent's side ----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the child and wait until it has opened the ledger.

        Raises ``WriterProcessError`` if it cannot be started or does not say it is
        ready within ``START_TIMEOUT_S`` (its reason when it gave one).
        """
        self._loop = loop or asyncio.get_running_loop()
        self._spawn()

    def _spawn(self) -> None:
        self._attach(self._ready_child(), ready=True)

    def _ready_child(self) -> subprocess.Popen:
        """A new child that has opened the ledger (``WriterProcessError`` if none does)."""
        proc = self._launch()
        try:
            self._wait_ready(proc)
        except BaseException:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(5)
            raise
        return proc

    def _launch(self) -> subprocess.Popen:
        args = [self.python, "-c", _BOOT, _PACKAGE_DIR, self.path]
        if self.prices:
            args += ["--prices", self.prices]
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=self._child_env(),
            )
        except OSError as e:
            raise WriterProcessError(f"cannot start the ledger writer process: {e}") from e
        return proc

    @staticmethod
    def _child_env() -> dict[str, str]:
        # The parent's import path (an embedding may have added to it), never the
        # working directory; the package itself is loaded from this one's folder.
        path = [p for p in sys.path if p and os.path.isdir(p)]
        return {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": os.pathsep.join(path)}

    def _attach(self, proc: subprocess.Popen, *, ready: bool) -> None:
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(proc.stdout.fileno(), False)
        self._proc = proc
        self._ready = ready
        self._in.clear()
        self._out.clear()
        self._sent_upto = 0  # a new child has been sent nothing
        self._loop.add_reader(proc.stdout.fileno(), self._on_readable)

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for message in _read_until(proc.stdout.fileno(), deadline, bytearray()):
            if message[0] == _READY:
                return
            if message[0] == _FAILED:
                raise WriterProcessError(message[1])
            if message[0] == _LOG:
                self.log.log(message[1], message[2])
        if time.monotonic() < deadline:  # the end of its output, before it was ready
            raise WriterProcessError(
                f"the ledger writer process exited at start (code {proc.wait(5)})"
            )
        raise WriterProcessError("the ledger writer process did not open the ledger in time")

    def submit(self, row: Mapping[str, Any], on_commit: Callable[[], None] | None = None) -> None:
        """Queue one row; ``on_commit`` runs on the loop once the child committed it.

        Never blocks and never raises: an invalid row, or one submitted after
        ``close``, is counted in ``dropped_rows`` and logged.
        """
        try:
            prepared = normalize_row(row)
        except Exception as e:
            self._dropped_rows += 1
            self.log.warning("spendtap ledger: dropped an invalid row: %s", e)
            return
        if self._closing or self._loop is None:
            self._dropped_rows += 1
            self.log.warning("spendtap ledger: a row arrived after the writer closed; dropped")
            return
        self._batch.append((self._next_seq, prepared, on_commit, time.monotonic()))
        self._next_seq += 1
        if not self._scheduled:
            self._scheduled = True
            # The rows of one loop iteration go in one write, at the start of the next.
            self._loop.call_soon(self._send_batch)

    def _send_batch(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        if not batch:
            return
        self._pending.extend(batch)
        over = len(self._pending) - self.max_pending
        if over > 0:
            for _ in range(over):
                self._pending.popleft()
            self._dropped_rows += over
            self.log.warning(
                "spendtap ledger: %d rows are waiting for %s; dropped the oldest %d",
                self.max_pending,
                self.path,
                over,
            )
        if self._proc is None:
            self._restart_soon()
            return
        self._send_pending()

    def _send_pending(self) -> None:
        """Frame the rows not sent to this child yet, while the bytes the pipe has not
        taken stay under ``max_buffered_bytes`` (a child that reads nothing must not grow
        the proxy's memory beyond ``max_pending`` rows: the rest wait, bounded, in
        ``_pending`` and go once the pipe drains)."""
        if self._proc is None or not self._ready:
            return  # sent with the rest once the new child is ready
        fresh = []
        for entry in reversed(self._pending):  # the newest first: stop at the sent ones
            if entry[0] <= self._sent_upto:
                break
            fresh.append(entry)
        fresh.reverse()
        for i in range(0, len(fresh), ROWS_A_FRAME):
            if len(self._out) >= self.max_buffered_bytes:
                break
            part = fresh[i : i + ROWS_A_FRAME]
            self._out += _rows_frames(part)
            self._sent_upto = part[-1][0]
        self._write_out()

    def _write_out(self) -> None:
        proc = self._proc
        if proc is None or not self._out:
            return
        fd = proc.stdin.fileno()
        try:
            sent = os.write(fd, self._out)
        except BlockingIOError:
            sent = 0
        except OSError:  # the child is gone: its output's end says so and restarts it
            self._out.clear()
            self._loop.remove_writer(fd)
            return
        del self._out[:sent]
        if self._out:
            self._loop.add_writer(fd, self._write_out)
            return
        self._loop.remove_writer(fd)
        if self._pending and self._pending[-1][0] > self._sent_upto:
            self._send_pending()  # rows held back while the pipe was full

    def _on_readable(self) -> None:
        proc = self._proc
        if proc is None:
            return  # detached after this callback was queued
        try:
            data = os.read(proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._child_gone()
            return
        self._in += data
        try:
            messages = _frames(self._in)
        except Exception as e:  # a bug on one side: never loop on the same bytes
            self.log.error("spendtap ledger: unreadable message from the writer process: %r", e)
            self._in.clear()
            proc.kill()  # the end of its output follows: started again, sent the rest
            return
        self._handle(messages)

    def _handle(self, messages: list[Any]) -> None:
        for message in messages:
            kind = message[0]
            if kind == _COMMITTED:
                self._committed(message[1])
                self._status(message[2])
            elif kind == _STATUS:
                self._status(message[1])
            elif kind == _LOG:
                self.log.log(message[1], message[2])
            elif kind == _READY:
                self._restarted()
            elif kind == _FAILED:
                self.log.warning("spendtap ledger: %s", message[1])

    def _status(self, figures: tuple[int, int, bool]) -> None:
        errors, dropped, self._child_failing = figures
        # Counters (they feed Prometheus counters): earlier children's figures included.
        self._child_write_errors = self._earlier_write_errors + errors
        self._child_dropped = self._earlier_dropped + dropped

    def _committed(self, prices: list[tuple[int, int | None, str | None]]) -> None:
        if not prices:
            return
        priced = {seq: (cost, source) for seq, cost, source in prices}
        upto = prices[-1][0]
        done = []
        # The child commits in the order it was sent: everything up to the last
        # sequence number is committed, or was given up by the child (counted there).
        while self._pending and self._pending[0][0] <= upto:
            entry = self._pending.popleft()
            price = priced.get(entry[0])
            if price is not None:
                entry[1]["cost_nusd"], entry[1]["price_source"] = price
            done.append(entry)
        self._rows_written += len(done)
        self._batches_written += 1
        self._last_commit_at = time.time()
        self._call_back(done)

    def _detach(self, wait_s: float = 5.0, *, late: bool = False) -> int | None:
        """Let go of the child: its pipes closed, its exit waited for ``wait_s`` seconds,
        then killed (and, ``late``, logged as not stopping in time). Its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(proc.stdout.fileno())
            self._loop.remove_writer(proc.stdin.fileno())
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                pipe.close()
        try:
            return proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            if late:
                self.log.error("spendtap ledger: the writer process did not stop in time")
            proc.kill()
            return proc.wait(5)

    def _child_gone(self) -> None:
        code = self._detach()
        self._earlier_write_errors = self._child_write_errors
        self._earlier_dropped = self._child_dropped
        self._child_failing = False
        if self._closing:
            return
        self._lost_child = True
        self.log.warning(
            "spendtap ledger: the writer process exited (code %s); starting it again, "
            "%d rows to write",
            code,
            len(self._pending),
        )
        self._restart_soon()

    def _restart_soon(self) -> None:
        delay = max(0.0, self._restart_after - time.monotonic())
        if delay:
            self._loop.call_later(delay, self._restart)
        else:
            self._loop.call_soon(self._restart)

    def _restart(self) -> None:
        if self._proc is not None or self._closing:
            return
        self._restarts += 1
        self._restart_after = time.monotonic() + min(RESTART_MAX_S, 0.1 * 2**self._restarts)
        try:
            proc = self._launch()
        except WriterProcessError as e:
            self.log.warning("spendtap ledger: %s; trying again", e)
            self._restart_soon()
            return
        # Not waited for here (the loop goes on): its ready message sends the rows.
        self._attach(proc, ready=False)

    def _restarted(self) -> None:
        self._ready = True
        self._lost_child = False
        self.log.warning("spendtap ledger: the writer process is back")
        # Everything not acknowledged, in order; a row the old child did commit is
        # ignored by the ledger (its id is there).
        self._sent_upto = 0
        self._send_pending()

    def close(self, timeout: float) -> bool:
        """Send what is queued, let the child commit it (at most ``timeout`` seconds), stop it.

        Blocks (shutdown). Returns True if every accepted row was committed; rows left
        unwritten are counted in ``dropped_rows`` and logged.
        """
        if self._closing:
            return not self._pending
        self._closing = True
        deadline = time.monotonic() + timeout
        self._pending.extend(self._batch)
        self._batch = []
        proc = self._proc
        if proc is not None:
            self._loop.remove_reader(proc.stdout.fileno())
            self._loop.remove_writer(proc.stdin.fileno())
        if proc is not None and self._ready:
            # What this child has not been sent: this iteration's rows, and any held
            # back while its pipe was full.
            self._out += _rows_frames(e for e in self._pending if e[0] > self._sent_upto)
        else:
            # No child ready to take rows (one died and is not back, or is still
            # starting, holding nothing): a fresh one is sent everything unacknowledged.
            if proc is not None:
                proc.kill()
                self._detach()
            proc = None
            if self._pending:
                try:
                    proc = self._ready_child()
                except WriterProcessError as e:
                    self.log.error("spendtap ledger: %s", e)
                else:
                    self._proc = proc
                    self._out = bytearray(_rows_frames(self._pending))
        if proc is not None:
            self._send_all(proc, deadline)
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the end of its input: commit, then exit
            # Its acknowledgements until it exits (the end of its output) or time is up.
            self._handle(list(_read_until(proc.stdout.fileno(), deadline, self._in)))
            self._detach(max(0.1, deadline - time.monotonic()), late=True)
        left = len(self._pending)
        if left:
            self._dropped_rows += left
            self.log.error(
                "spendtap ledger: closing with %d rows not written to %s", left, self.path
            )
            self._pending.clear()
        return left == 0

    def _send_all(self, proc: subprocess.Popen, deadline: float) -> None:
        """Write what is left of ``_out``, waiting for the pipe no later than ``deadline``
        (a child that reads nothing must not hold the shutdown)."""
        fd = proc.stdin.fileno()
        view = memoryview(bytes(self._out))
        self._out.clear()
        while view and (left := deadline - time.monotonic()) > 0:
            if not _wait_for(fd, select.POLLOUT, left):
                continue
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue
            except OSError:
                return  # the child is gone: what it did not acknowledge is counted


# -- the child ------------------------------------------------------------------------


class _PipeLog(logging.Handler):
    """The child's log lines, sent to the parent to log."""

    def __init__(self, send: Callable[[Any], None]):
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.send((_LOG, record.levelno, record.getMessage()))


class _PipeFedWriter(LedgerWriter):
    """``LedgerWriter`` run on the child's main thread, its queue filled from the pipe.

    The thread writer's loop, policy and all, with ``_take_batch`` reading the input
    instead of waiting for another thread: no second thread, so no GIL hand-offs in
    the child either.
    """

    def __init__(self, path: str, in_fd: int, report: Callable[[], None], **kw: Any):
        super().__init__(path, **kw)
        self.in_fd = in_fd
        self.report = report
        self._buf = bytearray()
        self._input_done = False

    def run(self) -> bool:
        """Write until the input ends and the rows are committed; True if all were.

        The ledger is open already (``_open``, before the child says it is ready).
        """
        try:
            self._loop()
        except BaseException:  # a bug: say so (the parent logs it and starts another)
            self.log.exception("spendtap ledger: the writer process crashed")
            raise
        finally:
            self._drop_connection()
        return not self._pending and not self._abandoned

    def _read_input(self, timeout: float | None) -> None:
        if not _wait_for(self.in_fd, select.POLLIN, timeout):
            return
        # 64 KiB: a larger read buffer comes from mmap, and costs an mmap, an mremap and
        # a munmap every wake-up (one row a wake-up at low load); a backlog takes more reads.
        data = os.read(self.in_fd, _READ_SIZE)
        if not data:
            # The parent closed our input, or died: commit what we have, then stop.
            self._input_done = True
            self._closing = True
            self._close_deadline = time.monotonic() + CLOSE_TIMEOUT_S
            return
        self._buf += data
        now = time.monotonic()
        for rows in _frames(self._buf):
            for seq, row in rows:
                row["_seq"] = seq
                self._pending.append((seq, row, None, now))

    def _take_batch(self, healthy: bool) -> list | None:
        if not self._input_done:
            # Nothing to write: sleep until rows (or the end of the input) arrive; the
            # figures change only while rows are written, so an idle child never wakes.
            # Otherwise only take what has arrived.
            self._read_input(None if not self._pending else 0)
        self.report()
        if self._stopping():
            return None
        return list(islice(self._pending, self.batch_size))


def child_main(argv: list[str]) -> int:
    from spendtap.pricing import Pricer

    # The parent decides when this process stops (the end of its input): a Ctrl-C or a
    # service manager's SIGTERM to the whole group must not kill rows in flight.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    path = argv[0]
    prices = argv[argv.index("--prices") + 1] if "--prices" in argv else None
    out_fd = sys.stdout.fileno()
    in_fd = sys.stdin.fileno()
    # Nothing else may write to the parent's pipe.
    sys.stdout = sys.stderr

    parent_gone = False

    def send(message: Any) -> None:
        nonlocal parent_gone
        if parent_gone:
            return
        view = memoryview(_frame(message))
        try:
            while view:
                view = view[os.write(out_fd, view) :]
        except OSError:
            # The parent is gone (it exited, or was killed): nobody to tell, but the rows
            # it sent are still committed; the end of the input follows.
            parent_gone = True

    log = logging.getLogger("spendtap.writer-process")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(_PipeLog(send))
    reported: tuple[int, int, bool] | None = None

    def figures() -> tuple[int, int, bool]:
        return (writer.write_errors, writer.dropped_rows, writer.failing)

    def report() -> None:
        nonlocal reported
        now = figures()
        if now != reported:
            reported = now
            send((_STATUS, now))

    def after_commit(rows: list[dict]) -> None:
        nonlocal reported
        now = reported = figures()
        send(
            (
                _COMMITTED,
                [(r["_seq"], r.get("cost_nusd"), r.get("price_source")) for r in rows],
                now,
            )
        )

    try:
        pricer = Pricer.from_path(prices)
        writer = _PipeFedWriter(
            path, in_fd, report, logger=log, price_row=pricer.apply, after_commit=after_commit
        )
        writer._open()
    except Exception as e:
        send((_FAILED, f"the ledger writer process cannot open {path}: {e}"))
        return 2
    send((_READY,))
    return 0 if writer.run() else 1


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
