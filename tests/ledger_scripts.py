"""Scripted business days for the ledger tests, the same for SQLite and PostgreSQL.

``Till`` builds requests of one merchant (STANs count up, the clock moves a second per request);
``Script`` runs labelled requests through a ledger and keeps what it answered; ``scripted_business_day``
and ``scripted_refund_controls_ii`` are the sequences both ledgers must answer alike; ``stored`` is what
a ledger keeps, without its own identifiers, so that two ledgers' records can be compared.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from postgres import schema_settings

from gateway.adapters.ledger import PostgresLedger, SqliteLedger
from gateway.core.engine import Context
from gateway.core.model import Kind, Reference, Request, SettlementTotals, Txn
from gateway.core.policy import Policy
from gateway.core.reasons import ISO87_CODES
from gateway.events import render_event
from gateway.ports import LedgerResult

MID = "MERCHANT0000001"
T1, T2 = "TERM0001", "TERM0002"
CARD_A, CARD_B = "4761739001010119", "4111111111111111"
START = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
KEY = b"test-pan-key"
POLICY = Policy(unreferenced_refund_terminals=frozenset({T2}))

Ledger = SqliteLedger | PostgresLedger


def code(reason: str) -> str:
    return ISO87_CODES.get(reason, "96")


def render(event: Any) -> tuple[str, str, bytes]:
    event_id = uuid.uuid4().hex
    topic, payload = render_event(event, event_id=event_id, instance_id="pg-test", time=START, topic_prefix="t")
    return event_id, topic, payload


class Till:
    """Builds requests of one merchant: STANs count up, the clock moves one second per request."""

    def __init__(self, policy: Policy = POLICY, start: datetime = START) -> None:
        self.now = start
        self.policy = policy
        self.stans = itertools.count(1)

    def ctx(self) -> Context:
        return Context(self.now, self.policy, KEY, code)

    def request(
        self,
        kind: Kind,
        mti: str,
        pc: str,
        amount: int | None,
        *,
        terminal: str = T1,
        card: str | None = CARD_A,
        reference: Reference | None = None,
        stan: str | None = None,
        **extra: Any,
    ) -> Request:
        self.now += timedelta(seconds=1)
        original_data = None
        if reference is not None and reference.stan is not None:
            original_data = f"{reference.mti}{reference.stan}{reference.transmission_time}".ljust(42, "0")
        return Request(
            kind=kind,
            mti=mti,
            processing_code=pc,
            stan=stan or f"{next(self.stans):06d}",
            transmission_time=self.now.strftime("%m%d%H%M%S"),
            merchant_id=MID,
            terminal_id=terminal,
            amount=amount,
            currency="840",
            pan=card,
            reference=reference,
            original_data=original_data,
            **extra,
        )

    def sale(self, amount: int, **kw: Any) -> Request:
        return self.request(Kind.PURCHASE, "0200", "000000", amount, **kw)

    def refund(self, rrn: str | None, amount: int, **kw: Any) -> Request:
        reference = Reference(rrn=rrn) if rrn is not None else None
        return self.request(Kind.REFUND, "0200", "200000", amount, reference=reference, **kw)


def de90(original: Request) -> Reference:
    return Reference(mti=original.mti, stan=original.stan, transmission_time=original.transmission_time)


class Script:
    """Runs a labelled sequence of requests through one ledger and keeps what it answered."""

    def __init__(self, ledger: Ledger, till: Till | None = None) -> None:
        self.ledger = ledger
        self.till = till or Till()
        self.sent: dict[str, Request] = {}
        self.results: dict[str, LedgerResult] = {}
        self.trace: list[tuple[str, str, str, bool, int]] = []

    async def send(self, label: str, request: Request) -> LedgerResult:
        result = await self.ledger.process(request, self.till.ctx(), render)
        self.sent[label], self.results[label] = request, result
        self.trace.append((label, result.response_code, result.reason, result.replayed, result.events))
        return result

    def rrn(self, label: str) -> str:
        rrn = self.results[label].rrn
        assert rrn is not None
        return rrn

    async def sale(self, label: str, amount: int, **kw: Any) -> LedgerResult:
        return await self.send(label, self.till.sale(amount, **kw))

    async def preauth(self, label: str, amount: int) -> LedgerResult:
        return await self.send(label, self.till.request(Kind.PREAUTH, "0100", "000000", amount))

    async def refund(self, label: str, of: str | None, amount: int, **kw: Any) -> LedgerResult:
        return await self.send(label, self.till.refund(self.rrn(of) if of else None, amount, **kw))

    async def void(self, label: str, of: str, amount: int, **kw: Any) -> LedgerResult:
        reference = Reference(rrn=self.rrn(of))
        return await self.send(label, self.till.request(Kind.VOID, "0200", "020000", amount, reference=reference, **kw))

    async def complete(self, label: str, of: str, amount: int) -> LedgerResult:
        reference = de90(self.sent[of])
        return await self.send(label, self.till.request(Kind.COMPLETION, "0220", "000000", amount, reference=reference))

    async def reverse(
        self,
        label: str,
        of: str,
        *,
        advice: bool = False,
        partial: int | None = None,
        terminal: str | None = None,
        by_stan: bool = False,
        amount: int | None = None,
    ) -> LedgerResult:
        original = self.sent[of]
        request = self.till.request(
            Kind.REVERSAL,
            "0420" if advice else "0400",
            original.processing_code,
            original.amount if amount is None else amount,
            terminal=terminal or original.terminal_id,
            reference=Reference(same_stan=True) if by_stan else de90(original),
            replacement_amount=partial,
            stan=original.stan if by_stan else None,
        )
        return await self.send(label, request)

    async def settle(self, label: str, terminal: str, totals: SettlementTotals) -> LedgerResult:
        request = self.till.request(Kind.SETTLEMENT, "0500", "920000", None, terminal=terminal, totals=totals)
        return await self.send(label, request)

    async def retransmit(self, label: str, of: str, **changes: Any) -> LedgerResult:
        first = self.sent[of]
        self.till.now += timedelta(seconds=1)
        return await self.send(label, replace(first, mti=first.mti[:3] + "1", **changes))


async def scripted_business_day(script: Script) -> None:
    """Purchases, refunds, voids, completions, reversals, retransmissions and settlement."""
    s = script
    await s.sale("sale1", 10_000)
    await s.refund("refund1", "sale1", 3_000)
    await s.refund("refund_too_much", "sale1", 8_000)
    await s.refund("refund_other_card", "sale1", 1_000, card=CARD_B)
    await s.refund("refund_rest", "sale1", 7_000)
    await s.refund("refund_nothing_left", "sale1", 1)
    await s.void("void_after_refund", "sale1", 10_000)
    await s.sale("sale2", 5_000)
    await s.void("void_wrong_amount", "sale2", 4_000)
    await s.void("void_other_terminal", "sale2", 5_000, terminal=T2)
    await s.void("void2", "sale2", 5_000)
    await s.void("void2_again", "sale2", 5_000)
    await s.refund("refund_voided", "sale2", 100)
    await s.preauth("preauth1", 20_000)
    await s.complete("complete_over_tolerance", "preauth1", 23_500)
    await s.complete("complete1", "preauth1", 22_000)
    await s.complete("complete_again", "preauth1", 1_000)
    await s.refund("refund_completion", "complete1", 2_000)
    await s.sale("sale3", 6_000)
    await s.reverse("reverse3", "sale3")
    await s.reverse("reverse3_again", "sale3")
    await s.refund("refund_reversed", "sale3", 100)
    ghost = s.till.sale(4_000, stan="000999")
    s.sent["ghost"] = ghost
    await s.reverse("reverse_before_arrival", "ghost", advice=True)
    await s.send("ghost_arrives", ghost)
    s.sent["phantom"] = s.till.sale(1_234, stan="000998")  # never sent
    await s.reverse("reverse_unknown", "phantom")
    await s.sale("sale4", 10_000)
    await s.reverse("reverse4_partial", "sale4", partial=6_000)
    await s.refund("refund4_too_much", "sale4", 7_000)
    await s.refund("refund4", "sale4", 6_000)
    await s.reverse("reverse_refund1", "refund1")
    await s.refund("refund1_again", "sale1", 3_000)
    await s.retransmit("refund_rest_repeat", "refund_rest")
    await s.retransmit("refund_rest_conflict", "refund_rest", amount=6_999)
    await s.refund("unreferenced_t1", None, 500)
    await s.refund("unreferenced_t2", None, 500, terminal=T2)
    await s.sale("sale5", 2_500)
    await s.settle("settle_t1", T1, SettlementTotals(4, 18_000, 4, 40_500))
    await s.settle("settle_t2", T2, SettlementTotals(0, 0, 1, 1))
    await s.void("void_settled", "sale5", 2_500)
    await s.refund("refund_next_day", "sale5", 1_000)
    await s.reverse("reverse_late", "sale5", advice=True)
    await s.sale("sale_new_batch", 700)
    s.till.now += timedelta(days=31)
    await s.refund("refund_out_of_window", "sale_new_batch", 100)


async def scripted_refund_controls_ii(script: Script) -> None:
    """Issue 20's sequences: corrections overtaken by their reversal, repeats with a new DE7, reversals
    from another terminal or by STAN alone, an advice over refunds, a cut-off crossed between requests."""
    s = script
    await s.sale("sale1", 10_000)
    late_refund = s.till.refund(s.rrn("sale1"), 2_000)
    s.sent["late_refund"] = late_refund
    await s.reverse("reverse_late_refund", "late_refund", advice=True)
    await s.send("late_refund_arrives", late_refund)
    await s.refund("refund1", "sale1", 4_000)
    await s.retransmit("refund1_new_de7", "refund1", transmission_time="1122235959")
    await s.retransmit("refund1_other_amount", "refund1", amount=4_001, transmission_time="1122235958")
    await s.reverse("reverse_other_terminal", "sale1", terminal=T2)
    await s.reverse("reverse_by_stan_wrong_amount", "sale1", by_stan=True, amount=9_999)
    await s.sale("sale2", 5_000)
    await s.refund("refund2", "sale2", 5_000)
    await s.reverse("advice_over_refund", "sale2", advice=True)
    await s.sale("sale3", 3_000)
    s.till.now = s.till.now.replace(hour=23, minute=30, second=1)  # the cut-off (23:30 UTC) just passed
    await s.void("void_after_cutoff", "sale3", 3_000)
    await s.refund("refund3", "sale3", 1_000)
    # before the cut-off: sale1 and sale3 (sale2 reversed), refund1 and refund2; after it: refund3
    await s.settle("settle_across_the_cutoff", T1, SettlementTotals(3, 10_000, 2, 13_000))
    await s.sale("sale4", 700)
    await s.settle("settle_again", T1, SettlementTotals(0, 0, 1, 700))


def stored(txns: list[Txn]) -> list[tuple[object, ...]]:
    """What the ledger keeps, without its own identifiers (ids, RRNs, approval codes)."""
    index = {txn.id: n for n, txn in enumerate(txns)}
    batches = {batch_id: n for n, batch_id in enumerate(sorted({t.batch_id for t in txns if t.batch_id}))}
    return [
        (
            t.kind,
            t.mti,
            t.stan,
            t.status,
            t.amount,
            t.effective_amount,
            t.refunded_amount,
            t.completed,
            t.response_code,
            t.reason,
            t.reversed_after_settlement,
            t.pan_masked,
            t.pan_hmac,
            t.created_at,
            index.get(t.original_id) if t.original_id else None,
            batches.get(t.batch_id) if t.batch_id else None,
            t.rrn is not None,
            t.approval_code is not None,
        )
        for t in txns
    ]


NewLedger = Callable[[], Ledger]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> NewLedger:
    if request.param == "sqlite":
        return lambda: SqliteLedger(tmp_path / "ledger.db", synchronous="OFF")
    url = request.getfixturevalue("postgres_url")
    settings = schema_settings(request.getfixturevalue("postgres_schema"))
    return lambda: PostgresLedger(url, server_settings=settings)
