"""Property test: any interleaving of set-cap, reserve, settle, release and time keeps the cap."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from spendtap.store.budgets import EPOCH_TS, Budgets
from spendtap.store.ledger import Ledger
from spendtap.timeparse import parse_datetime, ts_from_epoch

T0 = int(parse_datetime("2025-01-31T12:00:00Z").timestamp())
OWNER = "model-host:1:1"
PRINCIPALS = [("acme", "k1"), ("acme", "k2"), ("beta", "k3"), ("beta", None), (None, "k4")]
BUDGETS = [("key", "k1"), ("key", "k2"), ("key", "k4"), ("account", "acme"), ("account", "beta")]
WINDOWS = [None, 60, 600]


class BudgetMachine(RuleBasedStateMachine):
    """Drives the real Budgets and Ledger and an independent model side by side."""

    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spendtap-props-"))
        path = self.dir / "ledger.db"
        self.budgets = Budgets(path)
        self.ledger = Ledger(path)
        self.now = T0
        self.seq = 0
        # model
        self.rows: list[tuple[int, str | None, str | None, int]] = []
        self.open: dict[str, tuple[str | None, str | None, int, bool]] = {}
        self.config: dict[tuple[str, str], tuple[int, int | None, str]] = {}
        self.ceiling: dict[tuple[str, str], int] = {}

    def teardown(self) -> None:
        self.budgets.close()
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the model ---------------------------------------------------------------------

    def _matches(self, budget: tuple[str, str], account, key) -> bool:
        scope, principal = budget
        return (key if scope == "key" else account) == principal

    def model_spent(self, budget) -> int:
        _cap, window, since = self.config[budget]
        total = 0
        for ts, account, key, tokens in self.rows:
            if not self._matches(budget, account, key) or ts_from_epoch(ts) < since:
                continue
            if window is not None and ts <= self.now - window:
                continue
            total += tokens
        return total

    def model_reserved(self, budget) -> int:
        return sum(
            tokens
            for account, key, tokens, reserved in self.open.values()
            if reserved and self._matches(budget, account, key)
        )

    def usage(self, budget) -> int:
        return self.model_spent(budget) + self.model_reserved(budget)

    def raise_ceiling(self) -> None:
        """An operator's change (or unreserved spend) may leave a budget over its cap."""
        for budget, (cap, _w, _s) in self.config.items():
            self.ceiling[budget] = max(cap, self.usage(budget))

    # -- rules ---------------------------------------------------------------------------

    @rule(
        budget=st.sampled_from(BUDGETS),
        cap=st.integers(0, 2000),
        window=st.sampled_from(WINDOWS),
        reset=st.booleans(),
    )
    def set_cap(self, budget, cap, window, reset):
        self.budgets.set(*budget, cap, window, reset=reset, now=self.now)
        old = self.config.get(budget)
        now_ts = ts_from_epoch(self.now)
        if reset or (window is None and (old is None or old[1] is not None)):
            since = now_ts
        elif old is None:
            since = EPOCH_TS
        else:
            since = old[2]
        self.config[budget] = (cap, window, since)
        self.raise_ceiling()

    @rule(budget=st.sampled_from(BUDGETS))
    def remove(self, budget):
        assert self.budgets.remove(*budget) == (budget in self.config)
        self.config.pop(budget, None)
        self.ceiling.pop(budget, None)

    @rule(target=reservations, who=st.sampled_from(PRINCIPALS), tokens=st.integers(0, 800))
    def reserve(self, who, tokens):
        account, key = who
        self.seq += 1
        rid = f"r{self.seq}"
        applying = [b for b in self.config if self._matches(b, account, key)]
        fits = all(self.usage(b) + tokens <= self.config[b][0] for b in applying)
        decision = self.budgets.reserve(rid, account, key, tokens, OWNER, self.now)
        assert decision.allowed == fits, (decision, applying)
        if not decision.allowed:
            # A refusal names a budget that really would have been exceeded.
            binding = (decision.scope, decision.principal)
            assert self.usage(binding) + tokens > self.config[binding][0]
            return rid  # refused: its row (no usage) settles nothing
        reserved = decision.reservation_id is not None
        assert reserved == bool(applying)
        self.open[rid] = (account, key, tokens, reserved)
        return rid

    @rule(rid=consumes(reservations), share=st.one_of(st.none(), st.floats(0, 1)))
    def settle(self, rid, share):
        """The request's row lands through the writer's transaction code (insert_rows)."""
        entry = self.open.pop(rid, None)
        account, key, tokens, reserved = entry if entry else (None, None, 0, False)
        used = None if share is None else int(tokens * share)
        row = {"id": rid, "ts": ts_from_epoch(self.now), "account": account, "key": key}
        if used is not None:
            prompt = used // 2
            row |= {"prompt_tokens": prompt, "completion_tokens": used - prompt}
        self.ledger.insert_rows([row])
        if used:
            self.rows.append((self.now, account, key, used))
        if entry and not reserved:
            self.raise_ceiling()  # unreserved: it had no budget when it started

    @rule(rid=consumes(reservations))
    def release(self, rid):
        entry = self.open.pop(rid, None)
        assert self.budgets.release(rid) == bool(entry and entry[3])

    @rule(seconds=st.integers(0, 700))
    def advance(self, seconds):
        self.now += seconds

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def spent_plus_reserved_within_cap(self):
        for budget, (cap, _window, _since) in self.config.items():
            status = self.budgets.status(*budget, self.now)
            assert status is not None
            assert status.spent == self.model_spent(budget)
            assert status.reserved == self.model_reserved(budget)
            usage = status.spent + status.reserved
            assert usage <= self.ceiling.get(budget, cap)
            # Nothing but an operator or unreserved spend ever lifts usage over the cap.
            self.ceiling[budget] = max(cap, usage)


BudgetMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBudgetInterleavings = BudgetMachine.TestCase
