"""Token budgets in the ledger: caps, reservations, and the reserve -> settle/release cycle.

A budget caps the tokens (prompt + completion) that a key or an account may
spend, either as a ``balance`` that never resets or over a rolling window
(``15m``, ``1h``, ``1d``, ``30d``...). A key is bound by its own budget and by
its account's; the tighter one wins.

Lifecycle of a budgeted request (the hook layer drives it from one worker
thread, never from the event loop):

1. ``reserve(flow_id, account, key, tokens, owner)`` before dispatch, with
   ``tokens = reservation_tokens(...)`` (a safe over-estimate of the prompt
   plus the request's output limit). In one ``BEGIN IMMEDIATE`` transaction
   it checks ``spent + reserved + tokens <= cap`` for the key's and the
   account's budget and, if both fit, records the reservation; otherwise it
   refuses (``Decision.allowed`` False, with the reason, binding scope and,
   for a window, ``retry_after_s``). Principals with no budget get no
   reservation at all.
2. Settle is the request's ledger row landing: a trigger (m007) deletes the
   reservation whose id is the row's id in the same transaction that inserts
   the row (``Ledger.insert_rows``, which the writer thread calls), whose usage
   triggers add to the budget's spend. No instant counts a request's tokens twice or not at
   all; a row with no usage simply releases the whole reservation.
3. ``release(flow_id)`` when no row will be written.
4. ``sweep(owner_alive, older_than_s)`` releases reservations nobody will
   settle: their owner process is gone, or they are older than any request.

Spend is always read from the ``requests`` table (a principal's
``prompt_tokens + completion_tokens`` with ``ts`` in the window, and at or
after the budget's ``since``), so rows and spend cannot disagree. A balance
reads the running total ``spent_since`` that the ledger's triggers keep in the
row's own transaction, so a reserve never scans a principal's history; a
window sums its rows by a range scan of a covering index.

Invariant: ``spent + reserved <= cap`` for every budget at every commit,
under any concurrency, also with several processes sharing one ledger file
(``BEGIN IMMEDIATE`` serializes writers across processes, and reads inside it
see the latest commit). Only two things can push a budget over: an operator
lowering the cap below current use (then nothing more is admitted until use
falls under it), and an upstream billing more than was reserved (the usage is
real, so it is counted, and the next reserve refuses).

Rolling windows: a row counts while ``ts > now - window``; it ages out exactly
``window`` after its ``ts`` (the request's start).

Exceptions::

    LedgerError (spendtap.store.ledger)
     +-- BudgetUnavailable     the ledger cannot decide now (locked past the busy
          |                    timeout, read-only, gone): answer 503, do not dispatch
          +-- BudgetBusy       locked or busy (on a ``never_wait`` store, at once):
                               asking again through a store that waits may pass

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from spendtap.metering.usage import INPUT_ONLY_APIS, OTHER
from spendtap.options import DEFAULT_FALLBACK_MAX_OUTPUT
from spendtap.store.errors import LedgerBusy, boundary_class, storage_boundary, storage_error
from spendtap.store.ledger import (
    LedgerError,
    LedgerNotFound,
    LedgerTables,
)
from spendtap.timeparse import normalize_ts, parse_datetime, parse_duration, ts_from_epoch

__all__ = [
    "BALANCE",
    "EPOCH_TS",
    "SCOPES",
    "UNBUDGETED",
    "Budget",
    "BudgetStatus",
    "BudgetUnavailable",
    "Budgets",
    "Decision",
    "check_cap",
    "check_principal",
    "counting_since",
    "format_window",
    "open_readonly",
    "open_reservation_count",
    "owner_alive",
    "parse_window",
    "process_owner",
    "prompt_tokens_upper_bound",
    "read_statuses",
    "reservation_split",
    "reservation_tokens",
]

SCOPES = ("key", "account")
BALANCE = "balance"
_COLUMN = {"key": "key", "account": "account"}
TOKENS, USD = "tokens", "usd"
UNITS = (TOKENS, USD)
NANOS_PER_USD = 10**9


@dataclass(frozen=True, slots=True)
class _Unit:
    """Where a kind of budget lives: token caps in ``budgets``, money caps (whole
    nano-dollars) in ``money_budgets``; what a row spends and a reservation holds."""

    table: str
    cap_column: str
    spend: str  # SQL: a request row's spend in this unit
    held: str  # column of ``reservations``


_UNITS = {
    TOKENS: _Unit("budgets", "cap_tokens",
                  "coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)", "tokens"),
    USD: _Unit("money_budgets", "cap_nusd", "coalesce(cost_nusd, 0)", "nusd"),
}  # fmt: skip


# A budget row of the key (:key) or of the account (:account).
_PRINCIPAL_MATCH = (
    "(scope = 'key' AND principal = :key) OR (scope = 'account' AND principal = :account)"
)


def _budgets_for_sql() -> str:
    """Every budget of a key (:key) and an account (:account), in both units: the unit, the
    budget's columns, the running total a balance reads, and what open reservations
    hold on it (through the reservations' key and account indexes)."""
    parts = []
    for unit, u in _UNITS.items():
        held = f"SELECT coalesce(sum({u.held}), 0) FROM reservations"
        parts.append(
            f"SELECT '{unit}', {_budget_columns(unit)}, spent_since, "
            f"CASE scope WHEN 'key' THEN ({held} WHERE key = :key) "
            f"ELSE ({held} WHERE account = :account) END "
            f"FROM {u.table} WHERE {_PRINCIPAL_MATCH}"
        )
    return " UNION ALL ".join(parts)


def _budgeted_sql() -> str:
    """A row if a key (:key) or an account (:account) has a budget in either unit."""
    return " UNION ALL ".join(
        f"SELECT 1 FROM {u.table} WHERE {_PRINCIPAL_MATCH}" for u in _UNITS.values()
    )


def format_amount(unit: str, amount: int | None) -> str:
    """``1234 tokens`` or ``$0.001234`` (money is kept in whole nano-dollars)."""
    if amount is None:
        return "?"
    if unit == USD:
        dollars = amount / NANOS_PER_USD
        return f"${dollars:,.2f}" if dollars >= 100 else f"${dollars:.6f}".rstrip("0").rstrip(".")
    return f"{amount} tokens"


# The largest cap SQLite's INTEGER holds (and more tokens or nano-dollars than any
# principal will ever spend: 9.2e18 tokens, or $9.2 billion).
MAX_CAP = 2**63 - 1

# When open reservations (not spend) are what blocks a windowed request, they
# settle or release as their requests end: ask the client to come back soon.
RESERVED_RETRY_S = 1.0

# Counting a new rolling window budget from the start of time means it sees
# the spend already in its window (a balance counts from when it is set).
EPOCH_TS = "1970-01-01T00:00:00.000Z"


class BudgetUnavailable(LedgerError):
    """The ledger cannot reserve now (locked, read-only, gone): refuse with 503."""


class BudgetBusy(BudgetUnavailable):
    """The ledger was locked or busy: on a ``never_wait`` store, raised without waiting."""


# -- windows ------------------------------------------------------------------------


def parse_window(text: str) -> int | None:
    """``"balance"`` -> None; ``"15m"``, ``"1h"``, ``"1d"``, ``"30d"``... -> seconds.

    Any duration of ``spendtap.timeparse.parse_duration`` from one second up
    is accepted (short windows are for tests and burst limits). Raises
    ``ValueError`` naming what would have been accepted.
    """
    s = text.strip().lower()
    if s == BALANCE:
        return None
    try:
        seconds = int(parse_duration(s).total_seconds())
    except ValueError:
        raise ValueError(
            f"invalid window {text!r}: expected balance or a duration such as 15m, 1h, 1d or 30d"
        ) from None
    if seconds < 1:
        raise ValueError(f"invalid window {text!r}: a rolling window is at least 1s")
    return seconds


def format_window(window_s: int | None) -> str:
    """The inverse of ``parse_window``: ``None`` -> ``balance``, ``3600`` -> ``1h``."""
    if window_s is None:
        return BALANCE
    out = ""
    rest = window_s
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out or "0s"


# -- records ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    """One budget as configured: ``window_s`` None is a balance. ``cap`` is in the
    budget's unit: tokens, or whole nano-dollars for a money cap (``unit`` usd)."""

    scope: str
    principal: str
    cap: int
    window_s: int | None
    since: str
    created_at: str
    updated_at: str
    unit: str = TOKENS

    @property
    def window(self) -> str:
        return format_window(self.window_s)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A budget's figures at one instant; ``remaining`` is never below 0.

    ``resets_at`` (ledger time text) is when the oldest spend in a rolling
    window ages out, None for a balance or a window with no spend.
    """

    budget: Budget
    spent: int
    reserved: int
    resets_at: str | None

    @property
    def remaining(self) -> int:
        return max(0, self.budget.cap - self.spent - self.reserved)

    def as_dict(self) -> dict[str, Any]:
        b = self.budget
        if b.unit == USD:  # dollars, exact (nano-dollars are stored)
            from decimal import Decimal

            def amount(n: int) -> Any:
                return Decimal(n).scaleb(-9).quantize(Decimal("1e-9"))
        else:

            def amount(n: int) -> Any:
                return n

        return {
            "scope": b.scope,
            "principal": b.principal,
            "unit": b.unit,
            "cap": amount(b.cap),
            "window": b.window,
            "spent": amount(self.spent),
            "reserved": amount(self.reserved),
            "remaining": amount(self.remaining),
            "resets_at": self.resets_at,
            "since": b.since,
            "updated_at": b.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of ``Budgets.reserve``.

    - allowed with ``reservation_id`` set: tokens reserved; settle or release it.
    - allowed with ``reservation_id`` None: no budget applies, nothing reserved.
    - refused: ``reason`` is ``balance`` or ``window``; ``scope``, ``principal``,
      ``cap``, ``window_s``, ``spent`` and ``reserved`` describe the binding
      budget. ``retry_after_s`` (windows only) is when the request would fit
      again, None when it never can (``too_large``: it alone exceeds the cap).
    """

    allowed: bool
    reservation_id: str | None = None
    tokens: int = 0
    reason: str | None = None
    scope: str | None = None
    principal: str | None = None
    cap: int | None = None
    window_s: int | None = None
    spent: int | None = None
    reserved: int | None = None
    retry_after_s: float | None = None
    too_large: bool = False
    unit: str = TOKENS  # of cap, spent, reserved and ``requested``
    requested: int | None = None  # what the request needs in ``unit``
    model: str | None = None  # set when a money cap meets a model with no price

    @property
    def budgeted(self) -> bool:
        """True when a budget applied (a reservation was made, or the request refused)."""
        return self.reservation_id is not None or not self.allowed


UNBUDGETED = Decision(allowed=True)


# -- the process that owns reservations ----------------------------------------------


def _proc_start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), if there is /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return fields[19].decode()
    except IndexError:
        return None


_START = _proc_start_ticks(os.getpid()) or f"t{int(time.time())}"


def process_owner() -> str:
    """``host:pid:start`` naming this process (the start time guards against pid reuse)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_START}"


def owner_alive(owner: str) -> bool:
    """Whether the process an owner string names may still be running.

    Another host's processes cannot be checked here: they count as alive (use
    an age limit for them). On this host a process is gone when its pid does
    not exist or now belongs to a process that started at another time.
    """
    try:
        host, pid_text, start = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return True  # not ours to judge
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return start == _START
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    except OSError:
        return True
    actual = _proc_start_ticks(pid)
    if actual is None or start.startswith("t"):
        return True  # no /proc to compare start times: the pid exists
    return actual == start


# -- the prompt estimate -------------------------------------------------------------

# Tokens charged per image, audio or file part instead of counting its bytes:
# above the largest per-image figures of the hosted APIs (Anthropic about
# 1,600 for a 1.15 MP image, OpenAI high detail up to a few thousand).
MEDIA_PART_TOKENS = 4096
# Per JSON object or array: covers the role and message framing tokens the
# chat templates add (OpenAI documents 3-4 per message).
STRUCTURE_TOKENS = 4
BASE_TOKENS = 16
# UTF-8 bytes per token. Large-vocabulary BPE tokenizers (cl100k, o200k, the
# Llama 3 and Qwen families) average 3.5-4.5 bytes per token on English and
# code, about 3 on CJK text and 2-3 on digits, hex and base64-like noise, so
# counting one token per 2 bytes over-estimates normal text by 1.5x to 2x.
# Only byte-level fallback (a token per byte, for text a small vocabulary does
# not know) can exceed it: pass bytes_per_token=1 for a bound that holds for
# any byte-level tokenizer whatever the text.
BYTES_PER_TOKEN = 2.0

_MEDIA_TYPES = {"image", "image_url", "input_image", "input_audio", "audio", "document", "file"}
_MEDIA_KEYS = {"image_url", "input_audio", "file_data", "image", "audio"}
_SKIP_KEYS = {"model", "stream", "stream_options", "metadata", "user", "store"}


def _walk(value: Any, counts: list[int], depth: int = 0) -> None:
    """Accumulate [text bytes, structures, media parts] of a request document."""
    if depth > 64:
        counts[0] += len(json.dumps(value, ensure_ascii=False).encode())
        return
    if isinstance(value, str):
        if value.startswith("data:") and ";base64," in value[:128]:
            counts[2] += 1
        else:
            counts[0] += len(value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, dict):
        counts[1] += 1
        if value.get("type") in _MEDIA_TYPES and depth > 0:
            counts[2] += 1
            return
        for k, v in value.items():
            if depth == 0 and k in _SKIP_KEYS:
                continue
            if k in _MEDIA_KEYS and not isinstance(v, str | int | float):
                counts[2] += 1
                continue
            counts[0] += len(str(k).encode("utf-8", "surrogatepass"))
            _walk(v, counts, depth + 1)
    elif isinstance(value, list):
        counts[1] += 1
        for item in value:
            _walk(item, counts, depth + 1)
    elif value is not None and not isinstance(value, bool):
        counts[0] += len(str(value))


def prompt_tokens_upper_bound(
    body: bytes | None,
    api: str | None = None,
    *,
    bytes_per_token: float = BYTES_PER_TOKEN,
    media_part_tokens: int = MEDIA_PART_TOKENS,
) -> int:
    """A safe over-estimate of the input tokens of a request body, for reservations.

    Not ``spendtap.metering.estimate.estimate_prompt_tokens`` (the best guess recorded when a
    server reports no usage): this one must never be below the truth. It counts the
    UTF-8 bytes of every string, key and number of the JSON document (but not
    ``model``, ``stream`` and similar settings), one token per ``bytes_per_token``
    bytes rounded up, plus ``STRUCTURE_TOKENS`` per object and array and
    ``BASE_TOKENS``. Images, audio and files (parts typed so, or base64 ``data:``
    URLs) count ``media_part_tokens`` each instead of their encoded size. A body that
    is not a JSON object counts all its bytes. ``api`` is accepted for API-specific
    rules; the walk above suits them all.
    Never raises.
    """
    del api
    body = body or b""
    try:
        doc = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return BASE_TOKENS + math.ceil(len(body) / bytes_per_token)
    counts = [0, 0, 0]
    try:
        _walk(doc, counts)
    except (RecursionError, ValueError, TypeError):
        return BASE_TOKENS + math.ceil(len(body) / bytes_per_token)
    return (
        BASE_TOKENS
        + math.ceil(counts[0] / bytes_per_token)
        + STRUCTURE_TOKENS * counts[1]
        + media_part_tokens * counts[2]
    )


def reservation_split(
    body: bytes | None,
    api: str | None,
    max_output_tokens: int | None,
    *,
    fallback_max_output: int = DEFAULT_FALLBACK_MAX_OUTPUT,
    bytes_per_token: float = BYTES_PER_TOKEN,
) -> tuple[int, int]:
    """What a request reserves, as (prompt estimate, output limit) in tokens.

    ``max_output_tokens`` is the request's ``max_completion_tokens`` /
    ``max_tokens`` / ``max_output_tokens`` (``RequestInfo.max_output_tokens``);
    without one, ``fallback_max_output``. Embeddings generate nothing; an
    ``other`` API (not an inference call) reserves nothing at all. A money cap
    prices this split at the model's input and output rates.
    """
    if api == OTHER:
        return 0, 0
    prompt = prompt_tokens_upper_bound(body, api, bytes_per_token=bytes_per_token)
    if api in INPUT_ONLY_APIS:
        return prompt, 0
    output = max_output_tokens if max_output_tokens is not None else fallback_max_output
    return prompt, max(0, output)


def reservation_tokens(
    body: bytes | None,
    api: str | None,
    max_output_tokens: int | None,
    *,
    fallback_max_output: int = DEFAULT_FALLBACK_MAX_OUTPUT,
    bytes_per_token: float = BYTES_PER_TOKEN,
) -> int:
    """What a request reserves in tokens: the prompt estimate plus its output limit
    (see ``reservation_split``)."""
    return sum(
        reservation_split(
            body, api, max_output_tokens,
            fallback_max_output=fallback_max_output, bytes_per_token=bytes_per_token,
        )
    )  # fmt: skip


# -- spend queries (shared with the metrics collector's read-only connection) ---------


def _epoch(now: float | datetime | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return parse_datetime(normalize_ts(now)).timestamp()
    return float(now)


def _ts_epoch(ts: str) -> float:
    return parse_datetime(ts).timestamp()


def _budget_from_row(row: tuple, unit: str = TOKENS) -> Budget:
    return Budget(*row, unit=unit)


def _budget_columns(unit: str) -> str:
    return f"scope, principal, {_UNITS[unit].cap_column}, window_s, since, created_at, updated_at"


def _window_bounds(budget: Budget, now: float) -> tuple[str, str]:
    """(exclusive start of the window, inclusive since) as ledger text."""
    assert budget.window_s is not None
    return ts_from_epoch(now - budget.window_s), budget.since


def _spent(conn: sqlite3.Connection, budget: Budget, now: float) -> int:
    column = _COLUMN[budget.scope]
    unit = _UNITS[budget.unit]
    if budget.window_s is None:
        row = conn.execute(
            f"SELECT spent_since FROM {unit.table} WHERE scope = ? AND principal = ?",
            (budget.scope, budget.principal),
        ).fetchone()
        return row[0] if row else 0
    start, since = _window_bounds(budget, now)
    return conn.execute(
        f"SELECT coalesce(sum({unit.spend}), 0) FROM requests "
        f"WHERE {column} = ? AND ts > ? AND ts >= ?",
        (budget.principal, start, since),
    ).fetchone()[0]


def _reserved(conn: sqlite3.Connection, budget: Budget) -> int:
    column = _COLUMN[budget.scope]
    return conn.execute(
        f"SELECT coalesce(sum({_UNITS[budget.unit].held}), 0) FROM reservations WHERE {column} = ?",
        (budget.principal,),
    ).fetchone()[0]


def _window_rows(conn: sqlite3.Connection, budget: Budget, now: float) -> Iterator[tuple[str, int]]:
    """(ts, spend in the budget's unit) of the spend in a window, oldest first."""
    column = _COLUMN[budget.scope]
    spend = _UNITS[budget.unit].spend
    start, since = _window_bounds(budget, now)
    yield from conn.execute(
        f"SELECT ts, {spend} FROM requests "
        f"WHERE {column} = ? AND ts > ? AND ts >= ? AND {spend} > 0 ORDER BY ts",
        (budget.principal, start, since),
    )


def _resets_at(conn: sqlite3.Connection, budget: Budget, now: float) -> str | None:
    if budget.window_s is None:
        return None
    for ts, _tokens in _window_rows(conn, budget, now):
        return ts_from_epoch(_ts_epoch(ts) + budget.window_s)
    return None


def _status(conn: sqlite3.Connection, budget: Budget, now: float) -> BudgetStatus:
    return BudgetStatus(
        budget=budget,
        spent=_spent(conn, budget, now),
        reserved=_reserved(conn, budget),
        resets_at=_resets_at(conn, budget, now),
    )


def _all_budgets(conn: sqlite3.Connection) -> list[Budget]:
    out = []
    for unit in UNITS:
        rows = conn.execute(
            f"SELECT {_budget_columns(unit)} FROM {_UNITS[unit].table} "
            "ORDER BY scope DESC, principal"
        ).fetchall()
        out.extend(_budget_from_row(r, unit) for r in rows)
    # Keys first, then accounts, each by principal; tokens before dollars.
    return sorted(out, key=lambda b: (b.scope != "key", b.principal, b.unit != TOKENS))


@storage_boundary
def read_statuses(
    conn: sqlite3.Connection, now: float | datetime | None = None
) -> list[BudgetStatus]:
    """Every budget's status, read over any connection to a ledger (read-only is fine)."""
    t = _epoch(now)
    return [_status(conn, b, t) for b in _all_budgets(conn)]


@storage_boundary
def open_reservation_count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM reservations").fetchone()[0]


# -- the store ------------------------------------------------------------------------


def check_principal(scope: str, principal: str) -> None:
    """A budget's scope and principal, checked alike by both stores."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be key or account, not {scope!r}")
    if not isinstance(principal, str) or not principal:
        raise ValueError("a budget needs a non-empty principal")


def check_reservation(reservation_id: str, tokens: int) -> None:
    """A reservation's id and tokens, checked alike by both stores."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a whole number >= 0, not {tokens!r}")
    if not reservation_id:
        raise ValueError("a reservation needs an id")


def check_cap(cap: int, window_s: int | None, unit: str = TOKENS) -> None:
    """A cap (tokens, or whole nano-dollars) and a window (None: a balance), checked alike
    by both stores (the largest cap is what both databases' integers hold)."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        what = "nano-dollars" if unit == USD else "tokens"
        raise ValueError(f"cap must be a whole number of {what} >= 0, not {cap!r}")
    if cap > MAX_CAP:
        raise ValueError(f"cap must be at most {MAX_CAP}, not {cap}")
    if window_s is not None and (
        isinstance(window_s, bool) or not isinstance(window_s, int) or window_s <= 0
    ):
        raise ValueError(f"window must be None (a balance) or seconds > 0, not {window_s!r}")


def counting_since(old: Budget | None, window_s: int | None, *, reset: bool, now_ts: str) -> str:
    """Where a budget being set counts spend from: ``now`` for a reset and for a new
    balance (or a budget turned into one), the epoch for a new rolling window (its spend
    already in the window counts), else where it counted from before."""
    if reset or (window_s is None and (old is None or old.window_s is not None)):
        return now_ts
    return EPOCH_TS if old is None else old.since


_BUDGETS_FOR_SQL = _budgets_for_sql()
_BUDGETED_SQL = _budgeted_sql()
_PRINCIPALS_SQL = " UNION ALL ".join(
    f"SELECT scope, principal, '{unit}' FROM {u.table}" for unit, u in _UNITS.items()
)


@boundary_class
class Budgets(LedgerTables):
    """Budgets and reservations in the ledger at ``path``.

    Owns one SQLite connection (WAL, busy timeout ``busy_timeout_s``, or none after
    ``never_wait``). Meant to be used from one thread; a lock makes other threads
    safe but serialized. ``create`` False opens only an existing ledger
    (``LedgerNotFound`` otherwise). Reading and management methods raise
    ``LedgerError`` (SQLite's failures as ``StorageError``); ``reserve`` and
    ``release`` turn database failures into ``BudgetUnavailable``.
    """

    def __repr__(self) -> str:
        return f"<Budgets {self.path}>"

    def never_wait(self) -> None:
        """Make this store answer at once or fail, for a caller that must not block (the
        event loop): a locked ledger raises ``BudgetBusy`` (``reserve``) instead of
        waiting out the busy timeout, and this connection never checkpoints the
        write-ahead log (a checkpoint writes and syncs the database file; the ledger
        writer's connection does it)."""
        with self._lock:
            self._conn.execute("PRAGMA busy_timeout = 0")
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.busy_timeout_s = 0.0

    # -- configuration --------------------------------------------------------------

    @staticmethod
    def _check(scope: str, principal: str, unit: str = TOKENS) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be tokens or usd, not {unit!r}")
        check_principal(scope, principal)

    def set(
        self,
        scope: str,
        principal: str,
        cap: int,
        window_s: int | None,
        *,
        reset: bool = False,
        now: float | datetime | None = None,
        unit: str = TOKENS,
    ) -> Budget:
        """Create or change a budget; returns it. ``unit`` usd makes it a money cap:
        ``cap`` is then in whole nano-dollars (a principal may have one of each).

        Changing the cap or window keeps the spend counted so far. A new
        balance (or a budget turned into a balance) counts spend from ``now``;
        a new rolling window counts the spend already in its window.
        ``reset`` starts counting afresh from ``now`` for either kind.
        """
        self._check(scope, principal, unit)
        check_cap(cap, window_s, unit)
        now_ts = ts_from_epoch(_epoch(now))
        table = _UNITS[unit]
        with self._write() as conn:
            old = self._get(conn, scope, principal, unit)
            since = counting_since(old, window_s, reset=reset, now_ts=now_ts)
            column = _COLUMN[scope]
            # A one-off count of the rows since `since`; the triggers keep it from here on.
            spent_since = conn.execute(
                f"SELECT coalesce(sum({table.spend}), 0) FROM requests "
                f"WHERE {column} = ? AND ts >= ?",
                (principal, since),
            ).fetchone()[0]
            conn.execute(
                f"""
                INSERT INTO {table.table} (scope, principal, {table.cap_column}, window_s, since,
                                     spent_since, created_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (scope, principal) DO UPDATE SET
                    {table.cap_column} = excluded.{table.cap_column},
                    window_s = excluded.window_s,
                    since = excluded.since,
                    spent_since = excluded.spent_since,
                    updated_at = excluded.updated_at
                """,
                (scope, principal, cap, window_s, since, spent_since, now_ts, now_ts),
            )
            budget = self._get(conn, scope, principal, unit)
        assert budget is not None
        return budget

    def remove(self, scope: str, principal: str, unit: str = TOKENS) -> bool:
        """Delete a budget; False if there was none. Its open reservations stay until settled."""
        self._check(scope, principal, unit)
        with self._write() as conn:
            cur = conn.execute(
                f"DELETE FROM {_UNITS[unit].table} WHERE scope = ? AND principal = ?",
                (scope, principal),
            )
            return cur.rowcount > 0

    @staticmethod
    def _get(
        conn: sqlite3.Connection, scope: str, principal: str, unit: str = TOKENS
    ) -> Budget | None:
        row = conn.execute(
            f"SELECT {_budget_columns(unit)} FROM {_UNITS[unit].table} "
            "WHERE scope = ? AND principal = ?",
            (scope, principal),
        ).fetchone()
        return _budget_from_row(row, unit) if row else None

    def get(self, scope: str, principal: str, unit: str = TOKENS) -> Budget | None:
        with self._lock:
            return self._get(self._conn, scope, principal, unit)

    def list(self) -> list[Budget]:
        """Every budget: keys first, then accounts, each by principal."""
        with self._lock:
            return _all_budgets(self._conn)

    def principals(self) -> list[tuple[str, str, str]]:
        """(scope, principal, unit) of every budget, unordered: who is budgeted, in one
        light statement (the gate's question)."""
        with self._lock:
            return self._conn.execute(_PRINCIPALS_SQL).fetchall()

    def status(
        self,
        scope: str,
        principal: str,
        now: float | datetime | None = None,
        unit: str = TOKENS,
    ) -> BudgetStatus | None:
        """Cap, spent, reserved, remaining and resets-at of one budget (None if there is none)."""
        t = _epoch(now)
        with self._lock:
            self._conn.execute("BEGIN")  # one snapshot for every figure
            try:
                budget = self._get(self._conn, scope, principal, unit)
                return None if budget is None else _status(self._conn, budget, t)
            finally:
                self._conn.execute("COMMIT")

    def statuses(self, now: float | datetime | None = None) -> list[BudgetStatus]:
        """The status of every budget, from one snapshot."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                return read_statuses(self._conn, now)
            finally:
                self._conn.execute("COMMIT")

    # -- reserve / release / sweep --------------------------------------------------

    @staticmethod
    def _budgets_for(
        conn: sqlite3.Connection, account: str | None, key: str | None, now: float
    ) -> list[tuple[Budget, int, int]]:
        """The key's and account's budgets of every unit, each with what is spent on it
        at ``now`` and held by open reservations. A balance's figures come in the same
        statement (its running total and a sum over the reservations' index); a window
        sums its rows. This runs inside the reserve transaction, which holds the
        ledger's write lock: the fewer statements the better."""
        out = []
        for row in conn.execute(_BUDGETS_FOR_SQL, {"key": key, "account": account}):
            budget = _budget_from_row(row[1:8], row[0])
            spent = row[8] if budget.window_s is None else _spent(conn, budget, now)
            out.append((budget, spent, row[9]))
        return out

    def reserve(
        self,
        reservation_id: str,
        account: str | None,
        key: str | None,
        tokens: int,
        owner: str,
        now: float | datetime | None = None,
        *,
        nusd: int | None = None,
        model: str | None = None,
        check_first: bool = True,
    ) -> Decision:
        """Reserve ``tokens`` (and ``nusd`` dollars, in nano-dollars) for a request
        against its key's and account's token and money budgets.

        ``check_first`` looks for a budget before taking the write lock, for callers
        whose principals mostly have none; a caller that only asks for principals it
        knows are budgeted (the gate) passes False and saves the look.

        ``nusd`` is the price of the same over-estimate (``model``'s rates); None when
        the model has no known price, which a money cap refuses (``reason``
        ``unpriced``): a request it cannot price is never let through for free.

        Returns ``UNBUDGETED`` (allowed, nothing reserved) when neither has a
        budget. Otherwise checks both in one ``BEGIN IMMEDIATE`` transaction and
        either records the reservation (id ``reservation_id``, normally the flow
        id, which is also the id of the request's ledger row) or refuses.
        Raises ``ValueError`` for a bad argument or an id already reserved, and
        ``BudgetUnavailable`` when the ledger cannot answer.
        """
        check_reservation(reservation_id, tokens)
        if nusd is not None and (isinstance(nusd, bool) or not isinstance(nusd, int) or nusd < 0):
            raise ValueError(f"nusd must be a whole number >= 0 or None, not {nusd!r}")
        if account is None and key is None:
            return UNBUDGETED
        t = _epoch(now)
        try:
            if check_first:
                # Outside any write transaction: most principals have no budget.
                with self._lock:
                    named = {"key": key, "account": account}
                    if self._conn.execute(_BUDGETED_SQL, named).fetchone() is None:
                        return UNBUDGETED
            with self._write() as conn:
                budgets = self._budgets_for(conn, account, key, t)
                if not budgets:
                    return UNBUDGETED  # none (or removed since it was looked for)
                refusals = []
                money = False
                for budget, spent, reserved in budgets:
                    if budget.unit == USD:
                        money = True
                        if nusd is None:
                            refusals.append(_unpriced(budget, model))
                            continue
                    need = nusd if budget.unit == USD else tokens
                    if spent + reserved + need > budget.cap:
                        refusals.append(self._refusal(conn, budget, spent, reserved, need, t))
                if refusals:
                    return _binding(refusals)
                conn.execute(
                    "INSERT INTO reservations (id, account, key, tokens, nusd, created_at, owner) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (reservation_id, account, key, tokens, (nusd or 0) if money else 0,
                     ts_from_epoch(t), owner),
                )  # fmt: skip
        except sqlite3.IntegrityError:
            raise ValueError(f"reservation {reservation_id!r} is already open") from None
        except sqlite3.Error as e:
            kind = BudgetBusy if isinstance(storage_error(e), LedgerBusy) else BudgetUnavailable
            raise kind(f"cannot reserve in the ledger {self.path}: {e}") from e
        return Decision(allowed=True, reservation_id=reservation_id, tokens=tokens)

    @staticmethod
    def _refusal(
        conn: sqlite3.Connection,
        budget: Budget,
        spent: int,
        reserved: int,
        tokens: int,
        now: float,
    ) -> Decision:
        too_large = tokens > budget.cap
        retry: float | None = None
        if budget.window_s is not None and not too_large:
            if spent + tokens <= budget.cap:
                retry = RESERVED_RETRY_S  # open reservations block, not spend
            else:
                # Wait until enough spend has aged out (all of it, if reservations
                # must also go: then they are the rest of the wait).
                need = min(spent, spent + reserved + tokens - budget.cap)
                freed = 0
                for ts, amount in _window_rows(conn, budget, now):
                    freed += amount
                    if freed >= need:
                        retry = max(0.0, _ts_epoch(ts) + budget.window_s - now)
                        break
                if retry is None:  # spend changed under us (cannot inside the lock)
                    retry = RESERVED_RETRY_S
                elif spent + reserved + tokens - budget.cap > spent:
                    retry = max(retry, RESERVED_RETRY_S)
        return Decision(
            allowed=False,
            reason="balance" if budget.window_s is None else "window",
            scope=budget.scope,
            principal=budget.principal,
            cap=budget.cap,
            window_s=budget.window_s,
            spent=spent,
            reserved=reserved,
            tokens=tokens,
            retry_after_s=retry,
            too_large=too_large,
            unit=budget.unit,
            requested=tokens,
        )

    def release(self, reservation_id: str) -> bool:
        """Drop a reservation without usage; False if it was not open (settled, swept)."""
        try:
            with self._write() as conn:
                cur = conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
                return cur.rowcount > 0
        except sqlite3.Error as e:
            raise BudgetUnavailable(f"cannot release in the ledger {self.path}: {e}") from e

    def reservations(self) -> list[dict[str, Any]]:
        """Open reservations, oldest first: id, account, key, tokens, nusd, created_at, owner."""
        with self._lock:
            cur = self._conn.execute(
                "SELECT id, account, key, tokens, nusd, created_at, owner FROM reservations "
                "ORDER BY created_at, id"
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur]

    def sweep(
        self,
        owner_alive: Callable[[str], bool] | None = owner_alive,
        older_than_s: float | None = None,
        now: float | datetime | None = None,
    ) -> int:
        """Release stale reservations; returns how many.

        Stale: ``owner_alive(owner)`` is False (the process that made it is
        gone, so it will never settle), or it was made more than
        ``older_than_s`` seconds before ``now``. Either test may be None.

        A reservation whose owner died belongs to a request the crash cut short:
        its ledger row will never come, so one is written in the same
        transaction, marked (outcome ``upstream_error``, no usage, an error
        saying why), so the request is not silently missing. One released for
        age alone gets no row: its request may still be running and write its
        own.
        """
        t = _epoch(now)
        cutoff = ts_from_epoch(t - older_than_s) if older_than_s is not None else None
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id, owner, created_at, account, key FROM reservations"
            ).fetchall()
            verdicts: dict[str, bool] = {}
            stale = []
            orphans = []
            for rid, owner, created_at, account, key in rows:
                if owner_alive is not None:
                    if owner not in verdicts:
                        verdicts[owner] = bool(owner_alive(owner))
                    if not verdicts[owner]:
                        stale.append((rid,))
                        orphans.append((rid, created_at, account, key, _ORPHAN_ERROR))
                        continue
                if cutoff is not None and created_at < cutoff:
                    stale.append((rid,))
            conn.executemany("DELETE FROM reservations WHERE id = ?", stale)
            conn.executemany(_ORPHAN_ROW_SQL, orphans)
        return len(stale)


_ORPHAN_ERROR = "the sidecar process ended before this request finished (crash or kill)"
_ORPHAN_ROW_SQL = (
    "INSERT OR IGNORE INTO requests (id, ts, account, key, outcome, usage_source, error) "
    "VALUES (?, ?, ?, ?, 'upstream_error', 'none', ?)"
)


def _unpriced(budget: Budget, model: str | None) -> Decision:
    """A money cap meets a model with no known price: refused (waiting never helps)."""
    return Decision(
        allowed=False,
        reason="unpriced",
        scope=budget.scope,
        principal=budget.principal,
        cap=budget.cap,
        window_s=budget.window_s,
        unit=USD,
        model=model,
    )


def _binding(refusals: list[Decision]) -> Decision:
    """The refusal to report: one no wait cures (unpriced, balance), else the longest wait."""
    for reason in ("unpriced", "balance"):
        final = [d for d in refusals if d.reason == reason]
        if final:
            return final[0]
    return max(
        refusals,
        key=lambda d: math.inf if d.retry_after_s is None else d.retry_after_s,
    )


@storage_boundary
def open_readonly(path: str | os.PathLike[str], busy_timeout_s: float = 1.0) -> sqlite3.Connection:
    """A read-only connection to an existing ledger (``LedgerNotFound`` if there is none)."""
    p = Path(path)
    if not p.exists():
        raise LedgerNotFound(f"ledger not found: {p}")
    from urllib.parse import quote

    uri = "file:" + quote(str(p.absolute()), safe="/") + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    return conn
