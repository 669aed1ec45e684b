"""A state machine over the real SQLite ledger driving the pure engine.

Random sequences of purchases, pre-auths, completions, voids, refunds, reversals (full, partial,
requests and advices), settlements and retransmissions. After every step:

- no refund was ever approved beyond the original's refundable balance at that moment, and the sum
  of approved refunds never exceeds the original's effective amount (unless a reversal *advice*,
  which cannot be refused, was applied over later activity: then the ledger flags it);
- REVERSED records stay reversed; VOIDED ones stay voided unless their void was reversed;
- a retransmission changes nothing and gets the first answer;
- the balances the ledger stores equal a fold over its records.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from gateway.adapters.sqlite_ledger import SqliteLedger
from gateway.core.engine import Context
from gateway.core.model import Kind, Reference, Request, SettlementTotals, Txn, TxnStatus
from gateway.core.policy import Policy
from gateway.core.reasons import ISO87_CODES
from gateway.events import render_event
from gateway.ports import LedgerResult

CARDS = ("4761739001010119", "4111111111111111")
MID = "MERCHANT0000001"
TERMINALS = ("TERM0001", "TERM0002")
AMOUNTS = st.integers(min_value=0, max_value=12_000)


def _code(reason: str) -> str:
    return ISO87_CODES.get(reason, "96")


def _render(event: object) -> tuple[str, str, bytes]:
    event_id = uuid.uuid4().hex
    topic, payload = render_event(
        event,  # type: ignore[arg-type]
        event_id=event_id,
        instance_id="sm",
        time=datetime(2026, 11, 22, tzinfo=UTC),
        topic_prefix="sm",
    )
    return event_id, topic, payload


class LedgerMachine(RuleBasedStateMachine):
    approved = Bundle("approved")
    sent = Bundle("sent")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.ledger = SqliteLedger(Path(self.dir.name) / "sm.db", synchronous="OFF")
        self.loop.run_until_complete(self.ledger.open())
        self.now = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
        self.stan = itertools.count(1)
        self.policy = Policy(unreferenced_refund_terminals=frozenset({"TERM0002"}))
        self.reversed_ids: set[int] = set()
        #: originals on which a reversal advice was applied over refunds or a completion
        self.flagged: set[int] = set()
        self.requests: list[tuple[Request, LedgerResult]] = []

    def teardown(self) -> None:
        self.loop.run_until_complete(self.ledger.close())
        self.loop.close()
        self.dir.cleanup()

    # ------------------------------------------------------------------ helpers

    def _txns(self) -> list[Txn]:
        return self.loop.run_until_complete(self.ledger.all_txns())

    def _send(self, request: Request) -> LedgerResult:
        self.now += timedelta(seconds=1)
        ctx = Context(self.now, self.policy, b"key", _code)
        return self.loop.run_until_complete(self.ledger.process(request, ctx, _render))

    def _request(
        self,
        kind: Kind,
        mti: str,
        pc: str,
        amount: int | None,
        card: str,
        terminal: str,
        reference: Reference | None = None,
        **extra: object,
    ) -> Request:
        return Request(
            kind=kind,
            mti=mti,
            processing_code=pc,
            stan=f"{next(self.stan):06d}",
            transmission_time=self.now.strftime("%m%d%H%M%S"),
            merchant_id=MID,
            terminal_id=terminal,
            amount=amount,
            currency="840",
            pan=card,
            reference=reference,
            **extra,  # type: ignore[arg-type]
        )

    def _by_rrn(self, rrn: str) -> Txn:
        return next(t for t in self._txns() if t.rrn == rrn)

    # ------------------------------------------------------------------ rules

    @rule(
        target=approved,
        amount=st.integers(1, 10_000),
        card=st.sampled_from(CARDS),
        terminal=st.sampled_from(TERMINALS),
        preauth=st.booleans(),
    )
    def sale(self, amount: int, card: str, terminal: str, preauth: bool) -> str:
        kind, mti = (Kind.PREAUTH, "0100") if preauth else (Kind.PURCHASE, "0200")
        request = self._request(kind, mti, "000000", amount, card, terminal)
        result = self._send(request)
        assert result.response_code == "00" and result.rrn is not None
        self.requests.append((request, result))
        return result.rrn

    @rule(target=approved, rrn=approved, amount=AMOUNTS, same_card=st.booleans())
    def refund(self, rrn: str, amount: int, same_card: bool) -> str:
        before = self._by_rrn(rrn)
        card = CARDS[0] if same_card else CARDS[1]
        request = self._request(Kind.REFUND, "0200", "200000", amount, card, before.terminal_id, Reference(rrn=rrn))
        result = self._send(request)
        self.requests.append((request, result))
        if result.response_code == "00":
            # approved only within what was refundable at that moment
            assert 0 < amount <= before.refundable
        elif result.reason == "exceeds_refundable":
            assert amount > before.refundable
        return result.rrn or rrn

    @rule(rrn=approved, exact=st.booleans())
    def void(self, rrn: str, exact: bool) -> None:
        before = self._by_rrn(rrn)
        amount = before.effective_amount if exact else before.effective_amount + 1
        request = self._request(Kind.VOID, "0200", "020000", amount, CARDS[0], before.terminal_id, Reference(rrn=rrn))
        result = self._send(request)
        self.requests.append((request, result))
        if result.response_code == "00":
            assert before.status is TxnStatus.APPROVED and before.refunded_amount == 0 and not before.completed

    @rule(target=approved, rrn=approved, amount=st.integers(1, 13_000))
    def complete(self, rrn: str, amount: int) -> str:
        before = self._by_rrn(rrn)
        request = self._request(
            Kind.COMPLETION,
            "0220",
            "000000",
            amount,
            CARDS[0],
            before.terminal_id,
            Reference(mti=before.mti, stan=before.stan, transmission_time=before.transmission_time),
        )
        result = self._send(request)
        self.requests.append((request, result))
        if result.response_code == "00":
            assert before.kind is Kind.PREAUTH and not before.completed
            assert amount * 100 <= before.effective_amount * 115
        return result.rrn or rrn

    @rule(rrn=approved, advice=st.booleans(), partial=st.none() | st.integers(1, 10_000))
    def reverse(self, rrn: str, advice: bool, partial: int | None) -> None:
        before = self._by_rrn(rrn)
        mti = "0420" if advice else "0400"
        request = self._request(
            Kind.REVERSAL,
            mti,
            before.processing_code,
            before.amount,
            CARDS[0],
            before.terminal_id,
            Reference(mti=before.mti, stan=before.stan, transmission_time=before.transmission_time),
            replacement_amount=partial,
        )
        result = self._send(request)
        self.requests.append((request, result))
        if advice:
            assert result.response_code == "00"  # advices are never refused
        after = self._by_rrn(rrn)
        if after.status is TxnStatus.REVERSED:
            self.reversed_ids.add(after.id)
        if advice and (before.refunded_amount > 0 or before.completed) and before.status is TxnStatus.APPROVED:
            self.flagged.add(before.id)

    @rule(terminal=st.sampled_from(TERMINALS))
    def settle(self, terminal: str) -> None:
        request = self._request(
            Kind.SETTLEMENT, "0500", "920000", None, CARDS[0], terminal, totals=SettlementTotals(0, 0, 0, 0)
        )
        result = self._send(request)
        assert result.response_code in ("00", "95")

    @rule(index=st.integers(min_value=0))
    def retransmit(self, index: int) -> None:
        if not self.requests:
            return
        request, first = self.requests[index % len(self.requests)]
        before = [(t.id, t.status, t.refunded_amount, t.effective_amount, t.completed) for t in self._txns()]
        repeat = replace(request, mti=request.mti[:3] + ("1" if request.mti[3] == "0" else request.mti[3]))
        result = self._send(repeat)
        after = [(t.id, t.status, t.refunded_amount, t.effective_amount, t.completed) for t in self._txns()]
        assert after == before
        assert (result.response_code, result.rrn) == (first.response_code, first.rrn)
        assert result.replayed

    # ------------------------------------------------------------------ invariants

    @invariant()
    def balances_equal_a_fold_over_the_records(self) -> None:
        txns = self._txns()
        by_id = {t.id: t for t in txns}
        for txn in txns:
            if txn.kind not in (Kind.PURCHASE, Kind.COMPLETION):
                continue
            refunds = [r for r in txns if r.kind is Kind.REFUND and r.original_id == txn.id]
            folded = sum(r.effective_amount for r in refunds if r.status is TxnStatus.APPROVED)
            assert txn.refunded_amount == folded
            if txn.id not in self.flagged and txn.status is TxnStatus.APPROVED:
                assert txn.refunded_amount <= txn.effective_amount
        for txn in txns:
            if txn.kind is Kind.PREAUTH:
                completions = [
                    c
                    for c in txns
                    if c.kind is Kind.COMPLETION and c.original_id == txn.id and c.status is TxnStatus.APPROVED
                ]
                assert txn.completed == bool(completions)
                assert len(completions) <= 1
        for txn_id in self.reversed_ids:
            assert by_id[txn_id].status is TxnStatus.REVERSED
        for txn in txns:
            if txn.status is TxnStatus.VOIDED:
                voids = [
                    v
                    for v in txns
                    if v.kind is Kind.VOID and v.original_id == txn.id and v.status is TxnStatus.APPROVED
                ]
                assert len(voids) == 1


LedgerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerStateMachine = pytest.mark.timeout(600)(LedgerMachine.TestCase)
