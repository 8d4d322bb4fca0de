"""Who is asking, and may they: principals and budget admission, off the event loop.

The hook layer asks two questions per request, both answered here without
mitmproxy: ``principal`` (principal headers a trusted peer vouches for, a bearer
key, or both) and ``admit`` (reserve the request's tokens against its budgets,
or refuse it).

Who may name a principal (see ``spendtap.proxy.trust``): headers count only when the
``TrustPolicy`` vouches for the request's TCP peer (and gateway secret). A key
pays for itself: from anyone else, a valid bearer key is charged whatever
headers come with it. ``require_auth`` is met by a known key or by vouched-for
headers, nothing else. With key swap on, a presented secret must be a known
spendtap key (else 401), and that request's credential is replaced upstream.
Reservations are made on the event loop itself, in one short SQLite transaction
through a connection that never waits (``Budgets.never_wait``): when the ledger is
locked (the ledger writer committing, another process), the loop goes on and the
reservation is tried again after a short sleep, up to the busy timeout. A large body
(over ``LOOP_RESERVE_MAX_BODY``) is estimated on the gate's worker thread; key look-ups,
releases, sweeps and a long list of budgeted principals run there too (a short one,
read once a second, is read on the loop: a thread hop costs it more). So the event loop
never waits on the ledger, and never walks a large body.

Failure policy: when the ledger cannot reserve (locked past the busy timeout,
unwritable, gone), a budgeted request is refused with 503 (fail closed) unless
``fail_open`` is set, in which case it is dispatched unreserved and counted.

In a fleet (``fleet`` given, ``--central``), budgets and reservations live in
PostgreSQL: reservations go in batches (those that arrive while earlier batches are
out, ``spendtap.proxy.batching``) on a small pool of worker threads, and the set of
budgeted principals comes from the fleet's background view, so a principal
without a budget never waits on PostgreSQL, even while it is down. Until that
view has been read once, every principal's request asks PostgreSQL (and is
refused with 503 if it cannot answer, unless ``fail_open``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from spendtap.metering.request import RequestInfo, clean_principal
from spendtap.options import DEFAULT_FALLBACK_MAX_OUTPUT, PRINCIPAL_SOURCES
from spendtap.pricing import Pricer, TokenSplit
from spendtap.proxy.batching import Batcher
from spendtap.proxy.refusals import Refusal, budget_refusal, invalid_api_key, service_unavailable
from spendtap.proxy.trust import TrustPolicy
from spendtap.store.budgets import (
    USD,
    BudgetBusy,
    Budgets,
    BudgetUnavailable,
    owner_alive,
    process_owner,
    reservation_split,
)
from spendtap.store.errors import LedgerError
from spendtap.store.fleet import Fleet
from spendtap.store.keys import Keys, extract_secret, fingerprint

KEY_CACHE_S = 5.0  # how long a resolved (or unknown) key is remembered
# How long the set of budgeted principals is reused: a budget set with the CLI
# takes effect within this time, and unbudgeted traffic never waits on SQLite.
BUDGETED_CACHE_S = 1.0
# A list of budgets this short (as last read) is read again on the event loop itself:
# a few microseconds a budget against a thread hop's wake-ups (bench/README.md, perf7).
# Longer lists, and the first, are read on the worker thread.
LOOP_LIST_MAX_BUDGETS = 256
# The largest request body a reservation is estimated from on the event loop (the
# estimate parses and walks the body); larger ones are estimated on the worker thread.
LOOP_RESERVE_MAX_BODY = 32 << 10
# A reservation that finds the ledger locked sleeps this long, then twice as long each
# time up to the maximum, until the busy timeout.
BUSY_FIRST_PAUSE_S = 0.0005
BUSY_MAX_PAUSE_S = 0.02
# The fleet's reservations go in batches, one out at a time: the requests that arrive
# while it is out go together in the next (one PostgreSQL round trip and transaction for
# all). Only a batch out longer than this (a lock wait, a slow server) lets another go
# beside it, up to the maximum. Under load a batch's round trip often passes 5 ms (the
# worker thread waits for the GIL); overlapping from there served 9 % fewer requests a
# second at json-c16 than from 20 ms (bench/README.md, "The fleet's reservations").
CENTRAL_OVERLAP_AFTER_S = 0.02
CENTRAL_BATCHES_IN_FLIGHT = 4


@dataclass(slots=True)
class Admission:
    refusal: Refusal | None = None  # answer with this instead of dispatching
    reason: str | None = None  # balance, window, unavailable, invalid_api_key, fail_open
    reservation_id: str | None = None


ADMITTED = Admission()


@dataclass(slots=True)
class Principal:
    """Who a request is, and what the hook layer must do to its headers."""

    account: str | None = None
    key: str | None = None
    refusal: Refusal | None = None  # 401: answer with this instead of dispatching
    # Principal headers came from a peer nobody vouched for: ignored, and to be
    # removed before the request goes upstream.
    untrusted_claim: bool = False
    # The request presented a known spendtap key: send the operator's credential.
    swap_credential: bool = False


class Gate:
    def __init__(
        self,
        path: str,
        *,
        enforce: bool = True,
        principal_source: str = "headers",
        account_header: str = "x-helexa-account-id",
        key_header: str = "x-helexa-key-id",
        require_auth: bool = False,
        fallback_max_output: int = DEFAULT_FALLBACK_MAX_OUTPUT,
        fail_open: bool = False,
        trust: TrustPolicy | None = None,
        key_swap: bool = False,
        fleet: Fleet | None = None,
        pricer: Pricer | None = None,
    ):
        if principal_source not in PRINCIPAL_SOURCES:
            raise ValueError(
                f"principal source must be one of {', '.join(PRINCIPAL_SOURCES)}, "
                f"not {principal_source!r}"
            )
        self.enforce = enforce
        self.principal_source = principal_source
        self.account_header = account_header
        self.key_header = key_header
        self.require_auth = require_auth
        self.fallback_max_output = fallback_max_output
        self.fail_open = fail_open
        self.trust = trust if trust is not None else TrustPolicy.from_settings("", None)
        self.key_swap = key_swap
        # Prices a reservation for money caps (the same over-estimate as in tokens).
        self.pricer = pricer if pricer is not None else Pricer()
        self.owner = process_owner()
        # The worker thread: key look-ups, the list of budgets, releases, sweeps and the
        # estimate of a large body, serialized here and never run on the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spendtap-budgets")
        self._budgets = self._executor.submit(Budgets, path).result()
        # The event loop's own connection, for reservations: it never waits on a lock
        # (``_reserve_here`` sleeps and tries again instead).
        self._loop_budgets = Budgets(path)
        self._loop_budgets.never_wait()
        self._keys = self._executor.submit(Keys, path).result()
        self._key_cache: dict[str, tuple[float, tuple[str, str] | None]] = {}
        self._budgeted: frozenset[tuple[str, str]] = frozenset()
        self._money: frozenset[tuple[str, str]] = frozenset()  # principals with a money cap
        self._budgeted_until = 0.0
        self._budget_rows = LOOP_LIST_MAX_BUDGETS + 1  # how many, as last read
        self.fleet = fleet
        self._central = (
            ThreadPoolExecutor(max_workers=8, thread_name_prefix="spendtap-central")
            if fleet is not None
            else None
        )
        self._central_reservations = (
            Batcher(self._reserve_central_batch, self._central,
                    max_in_flight=CENTRAL_BATCHES_IN_FLIGHT,
                    overlap_after_s=CENTRAL_OVERLAP_AFTER_S)
            if fleet is not None
            else None
        )  # fmt: skip

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- who ---------------------------------------------------------------------

    async def principal(self, headers: Mapping[str, str], api: str, peer: str | None) -> Principal:
        """Name the request's principal; ``peer`` is the client's TCP address."""
        # Each look-up walks every header field: once each.
        account = headers.get(self.account_header)
        key = headers.get(self.key_header)
        claimed = bool((account or "").strip() or (key or "").strip())
        vouched = claimed and self.trust.vouches(peer, headers)
        found = Principal(untrusted_claim=claimed and not vouched)
        if vouched and self.principal_source in ("headers", "both"):
            found.account = clean_principal(account)
            found.key = clean_principal(key)
        if self.principal_source in ("bearer", "both"):
            secret = extract_secret(headers)
            named = found.account is not None or found.key is not None
            if secret and (not named or self.key_swap):
                resolved = await self._resolve_key(secret)
                if resolved is None and self.key_swap:
                    # An unknown secret must not be forwarded, nor served on our credential.
                    return Principal(refusal=invalid_api_key(api), untrusted_claim=claimed)
                if resolved is not None:
                    found.swap_credential = self.key_swap
                    if not named:
                        found.account, found.key = resolved
        if self.require_auth and found.account is None and found.key is None:
            found.refusal = invalid_api_key(api)
        return found

    async def _resolve_key(self, secret: str | None) -> tuple[str, str] | None:
        if not secret:
            return None
        fp = fingerprint(secret)  # the cache never holds a secret
        now = time.monotonic()
        hit = self._key_cache.get(fp)
        if hit is not None and hit[0] > now:
            return hit[1]
        resolved = await self._run(self._keys.resolve, secret)
        if resolved is None and self.fleet is not None:
            # Keys registered centrally resolve on every node.
            try:
                resolved = await asyncio.get_running_loop().run_in_executor(
                    self._central, self.fleet.resolve_key, secret
                )
            except Exception:
                if hit is not None:
                    return hit[1]  # PostgreSQL is away: the last answer stands
                raise
        if len(self._key_cache) > 10_000:
            self._key_cache.clear()
        self._key_cache[fp] = (now + KEY_CACHE_S, resolved)
        return resolved

    # -- may they ----------------------------------------------------------------

    async def admit(
        self,
        flow_id: str,
        body: bytes | None,
        info: RequestInfo,
        account: str | None,
        key: str | None,
        node: str | None = None,
    ) -> Admission:
        """Reserve the request's tokens (and dollars, under a money cap), or say why it
        must be refused. ``node`` is the upstream's host:port (a provider's API host
        selects that provider's prices)."""
        if not self.enforce or (account is None and key is None):
            return ADMITTED  # anonymous requests are never budgeted
        try:
            if self.fleet is not None:
                # The fleet's view of who has a budget, read in the background.
                budgeted = self.fleet.budgeted()
                if budgeted is not None and not _names(budgeted, account, key):
                    return ADMITTED
                decision = await self._reserve_central(flow_id, body, info, account, key)
            else:
                # The cached budgeted set first: an unbudgeted request (most traffic) costs
                # no body walk at all.
                budgeted = await self._budgeted_principals()
                if not _names(budgeted, account, key):
                    return ADMITTED
                money = _names(self._money, account, key)
                decision = await self._reserve_here(flow_id, body, info, account, key, node, money)
        except BudgetUnavailable:
            if self.fail_open:
                return Admission(reason="fail_open")
            return Admission(service_unavailable(info.api), "unavailable")
        if decision is None:
            return ADMITTED  # nothing to reserve (not an inference call)
        if not decision.allowed:
            return Admission(budget_refusal(info.api, decision), decision.reason)
        return Admission(reservation_id=decision.reservation_id)

    def _amounts(self, body, info: RequestInfo, node, money: bool) -> tuple[int, int | None]:
        """What a request reserves: (tokens, nano-dollars or None when not priced)."""
        prompt, output = reservation_split(
            body, info.api, info.max_output_tokens, fallback_max_output=self.fallback_max_output
        )
        nusd = None
        if money and info.model and prompt + output > 0:
            price = self.pricer.price(info.model, TokenSplit(prompt, output), node=node)
            nusd = price.cost_nusd if price is not None else None
        return prompt + output, nusd

    async def _reserve_central(self, flow_id, body, info: RequestInfo, account, key):
        """The fleet's reservation, in PostgreSQL: batched with the other requests' that
        arrive while earlier batches are out (one round trip and transaction for all)."""
        tokens, _ = await self._estimate(self._central, body, info, None, False)
        if tokens <= 0:
            return None
        return await self._central_reservations.submit((flow_id, account, key, tokens))

    async def _estimate(self, executor, body, info: RequestInfo, node, money: bool):
        """``_amounts`` on the event loop for a small body, on ``executor`` for a large one
        (the estimate parses and walks the body)."""
        if body is None or len(body) <= LOOP_RESERVE_MAX_BODY:
            return self._amounts(body, info, node, money)
        return await asyncio.get_running_loop().run_in_executor(
            executor, self._amounts, body, info, node, money
        )

    def _reserve_central_batch(self, items: list) -> list:
        """A batch of the fleet's reservations (on a central worker thread)."""
        return self.fleet.reserve_many(items, self.owner)

    async def _reserve_here(self, flow_id, body, info: RequestInfo, account, key, node, money):
        """Reserve in the ledger from the event loop, without ever blocking it.

        One short transaction on a connection that never waits: a thread hop and the GIL
        hand-offs of a worker's transaction cost the loop more than the transaction
        itself (bench/README.md, "Reservations on the event loop"), and a worker holding
        the write lock while it waits for the GIL makes everyone else wait too. A
        locked ledger (the ledger writer committing, another process) is tried again
        after a short sleep, for as long as the busy timeout; a large body is estimated
        on the worker thread (the estimate parses and walks it).
        """
        tokens, nusd = await self._estimate(self._executor, body, info, node, money)
        if tokens <= 0:
            return None  # nothing to reserve (not an inference call)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budgets.busy_timeout_s
        pause = BUSY_FIRST_PAUSE_S
        while True:
            try:
                # Only asked for principals in the budgeted set: no look before the lock.
                return self._loop_budgets.reserve(
                    flow_id, account, key, tokens, self.owner, nusd=nusd, model=info.model,
                    check_first=False,
                )  # fmt: skip
            except BudgetBusy:
                if loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, BUSY_MAX_PAUSE_S)

    async def _budgeted_principals(self) -> frozenset[tuple[str, str]]:
        now = time.monotonic()
        if now >= self._budgeted_until:
            rows = None
            if self._budget_rows <= LOOP_LIST_MAX_BUDGETS:
                try:
                    rows = self._loop_budgets.principals()
                except LedgerError:
                    rows = None  # locked, or failing: the worker thread asks (and waits)
            if rows is None:
                rows = await self._run(self._budgets.principals)
            self._budget_rows = len(rows)
            self._budgeted = frozenset((scope, who) for scope, who, _ in rows)
            self._money = frozenset((scope, who) for scope, who, unit in rows if unit == USD)
            self._budgeted_until = now + BUDGETED_CACHE_S
        return self._budgeted

    def release(self, reservation_id: str) -> None:
        """Release a reservation no row will settle (fire and forget, off the loop)."""
        if self.fleet is not None:
            self._central.submit(_quietly, self.fleet.store.release, reservation_id)
            return
        self._executor.submit(_quietly, self._budgets.release, reservation_id)

    async def sweep(self, older_than_s: float | None) -> int:
        """Release reservations whose owner is gone, or older than any live request."""
        if self.fleet is not None:
            # Other hosts' owners are judged by their leases (the shipper sweeps those).
            return await asyncio.get_running_loop().run_in_executor(
                self._central, self.fleet.store.sweep, None, older_than_s
            )
        return await self._run(self._budgets.sweep, owner_alive, older_than_s)

    def sweep_now(self, older_than_s: float | None = None) -> int:
        if self.fleet is not None:
            return 0  # the shipper releases this node's previous life once its rows shipped
        return self._executor.submit(self._budgets.sweep, owner_alive, older_than_s).result()

    def close(self) -> None:
        def _close():
            self._budgets.close()
            self._keys.close()

        self._executor.submit(_quietly, _close).result()
        _quietly(self._loop_budgets.close)
        self._executor.shutdown(wait=True)
        if self._central is not None:
            self._central.shutdown(wait=True)


def _names(budgeted: frozenset[tuple[str, str]], account: str | None, key: str | None) -> bool:
    return ("key", key) in budgeted or ("account", account) in budgeted


def _quietly(fn, *args):
    try:
        return fn(*args)
    except Exception:  # a failed release is swept later; nothing to raise to
        return None
