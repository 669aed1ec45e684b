"""The PostgreSQL ledger against a real server: same answers as SQLite, and safe across instances.

Every test works in its own schema (``postgres_schema``); "two instances" are two PostgresLedger
objects with two connection pools on that schema, as two gateway processes would be.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from postgres import connect_to_schema, postgres_schema, postgres_url, schema_settings

from gateway.adapters.postgres_ledger import MIGRATIONS, LedgerClosedError, PostgresLedger
from gateway.adapters.sqlite_ledger import SqliteLedger
from gateway.core.cards import luhn_valid
from gateway.core.engine import Context
from gateway.core.model import Kind, Reference, Request, SettlementTotals, Txn, TxnStatus
from gateway.core.policy import Policy
from gateway.core.reasons import ISO87_CODES
from gateway.events import render_event
from gateway.ports import LedgerResult

__all__ = ["postgres_schema", "postgres_url"]  # fixtures used by the tests below

pytestmark = pytest.mark.postgres

MID = "MERCHANT0000001"
T1, T2 = "TERM0001", "TERM0002"
CARD_A, CARD_B = "4761739001010119", "4111111111111111"
START = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
KEY = b"test-pan-key"
POLICY = Policy(unreferenced_refund_terminals=frozenset({T2}))

Ledger = SqliteLedger | PostgresLedger


def _code(reason: str) -> str:
    return ISO87_CODES.get(reason, "96")


def _render(event: Any) -> tuple[str, str, bytes]:
    event_id = uuid.uuid4().hex
    topic, payload = render_event(event, event_id=event_id, instance_id="pg-test", time=START, topic_prefix="t")
    return event_id, topic, payload


def _ledger(url: str, schema: str, **kwargs: Any) -> PostgresLedger:
    return PostgresLedger(url, server_settings=schema_settings(schema), **kwargs)


class Till:
    """Builds requests of one merchant: STANs count up, the clock moves one second per request."""

    def __init__(self, policy: Policy = POLICY, start: datetime = START) -> None:
        self.now = start
        self.policy = policy
        self.stans = itertools.count(1)

    def ctx(self) -> Context:
        return Context(self.now, self.policy, KEY, _code)

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


def _de90(original: Request) -> Reference:
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
        result = await self.ledger.process(request, self.till.ctx(), _render)
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
        reference = _de90(self.sent[of])
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
            reference=Reference(same_stan=True) if by_stan else _de90(original),
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


async def test_issue_20_sequences_get_the_same_answers_balances_and_cases_as_the_sqlite_ledger(
    tmp_path: Path, postgres_url: str, postgres_schema: str
) -> None:
    till = partial(Till, replace(POLICY, cutoff=time(23, 30)))

    async def run(ledger: Ledger) -> tuple[Script, list[tuple[object, ...]], list[tuple[object, ...]], list[str]]:
        script = Script(ledger, till())
        await scripted_refund_controls_ii(script)
        cases: list[tuple[object, ...]] = [
            (c.kind, c.original_rrn == script.rrn("sale2"), c.details["reversed_amount"], c.details["refunded_amount"],
             c.details["credited_beyond"], [line["amount"] for line in c.details["refunds"]])  # type: ignore[attr-defined]
            for c in await ledger.list_exceptions()
        ]  # fmt: skip
        topics = [row.topic for row in await ledger.pending(1000)]
        return script, _stored(await ledger.all_txns()), cases, topics

    async with SqliteLedger(tmp_path / "ledger.db", synchronous="OFF") as sqlite:
        lite, lite_txns, lite_cases, lite_topics = await run(sqlite)
    async with _ledger(postgres_url, postgres_schema) as pg:
        post, pg_txns, pg_cases, pg_topics = await run(pg)

    assert post.trace == lite.trace
    assert (pg_txns, pg_cases, pg_topics) == (lite_txns, lite_cases, lite_topics)
    answers = {label: (code, reason) for label, code, reason, _, _ in post.trace}
    assert answers["late_refund_arrives"] == ("12", "reversed_before_arrival")
    assert answers["refund1_new_de7"] == ("00", "approved") and post.results["refund1_new_de7"].replayed
    assert answers["refund1_other_amount"] == ("94", "duplicate_conflict")
    assert answers["reverse_other_terminal"] == ("25", "reversal_unmatched")
    assert answers["reverse_by_stan_wrong_amount"] == ("25", "reversal_unmatched")
    assert answers["advice_over_refund"] == ("00", "approved")
    assert answers["void_after_cutoff"] == ("12", "batch_settled")
    assert answers["settle_across_the_cutoff"][0] == "00"
    assert answers["settle_again"][0] == "00"
    assert pg_cases == [("reversal_conflict", True, 5_000, 5_000, 5_000, [5_000])]
    assert sum(topic.endswith("/batch/closed") for topic in pg_topics) == 1
    assert sum(topic.endswith("/reversal/conflict") for topic in pg_topics) == 1


def _stored(txns: list[Txn]) -> list[tuple[object, ...]]:
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


async def _run_script(ledger: Ledger) -> tuple[Script, list[tuple[object, ...]], list[tuple[object, ...]], list[str]]:
    script = Script(ledger)
    await scripted_business_day(script)
    batches: list[tuple[object, ...]] = [
        (b.terminal_id, b.batch_no, b.state, b.debit_count, b.debit_amount, b.credit_count, b.credit_amount, b.result)
        for b in await ledger.list_batches()
    ]
    topics = [row.topic for row in await ledger.pending(1000)]
    return script, _stored(await ledger.all_txns()), batches, topics


async def test_a_scripted_business_day_gets_the_same_answers_and_balances_as_the_sqlite_ledger(
    tmp_path: Path, postgres_url: str, postgres_schema: str
) -> None:
    async with SqliteLedger(tmp_path / "ledger.db", synchronous="OFF") as sqlite:
        lite, lite_txns, lite_batches, lite_topics = await _run_script(sqlite)
    async with _ledger(postgres_url, postgres_schema) as pg:
        post, pg_txns, pg_batches, pg_topics = await _run_script(pg)

    assert post.trace == lite.trace
    assert pg_txns == lite_txns
    assert pg_batches == lite_batches
    assert pg_topics == lite_topics
    # and the script did exercise what it says (a few anchors, not the whole trace)
    expected = {
        "refund1": "00",
        "refund_too_much": "64",
        "refund_other_card": "14",
        "void2": "00",
        "void2_again": "12",
        "void_settled": "12",
        "complete1": "00",
        "complete_again": "12",
        "ghost_arrives": "12",
        "reverse_unknown": "25",
        "refund_rest_repeat": "00",
        "refund_rest_conflict": "94",
        "settle_t1": "00",
        "settle_t2": "95",
        "refund_out_of_window": "12",
    }
    answers = {label: code for label, code, _, _, _ in post.trace}
    assert {label: answers[label] for label in expected} == expected
    assert post.results["refund_rest_repeat"].replayed
    assert post.results["refund_rest_repeat"].rrn == post.results["refund_rest"].rrn


async def test_forty_concurrent_refunds_of_1000_through_two_instances_approve_exactly_ten_of_a_10000_sale(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema, max_size=10) as first,
        _ledger(postgres_url, postgres_schema, max_size=10) as second,
    ):
        sale = await first.process(till.sale(10_000), till.ctx(), _render)
        assert sale.response_code == "00"
        assert sale.rrn is not None
        refunds = [till.refund(sale.rrn, 1_000) for _ in range(40)]
        ctx = till.ctx()
        results = await asyncio.gather(
            *((first if n % 2 else second).process(request, ctx, _render) for n, request in enumerate(refunds))
        )
        original = await second.find_txn(MID, sale.rrn)
        txns = await first.all_txns()

    codes = sorted(result.response_code for result in results)
    assert codes == ["00"] * 10 + ["64"] * 30
    assert {r.reason for r in results if r.response_code == "64"} == {"exceeds_refundable"}
    assert original is not None
    assert original.refunded_amount == 10_000
    assert original.refundable == 0
    approved = [t for t in txns if t.kind is Kind.REFUND and t.status is TxnStatus.APPROVED]
    assert sum(t.amount for t in approved) == 10_000
    assert len(approved) == 10


async def test_the_same_retransmission_arriving_at_two_instances_at_once_is_recorded_once(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        sale = await first.process(till.sale(10_000), till.ctx(), _render)
        assert sale.rrn is not None
        refund = till.refund(sale.rrn, 2_500)
        repeat = replace(refund, mti="0201")
        ctx = till.ctx()
        copies = [refund, repeat] * 5
        results = await asyncio.gather(
            *((first if n % 2 else second).process(copy, ctx, _render) for n, copy in enumerate(copies))
        )
        txns = await second.all_txns()
        original = await first.find_txn(MID, sale.rrn)
        topics = [row.topic for row in await first.pending(100)]

    assert [t.kind for t in txns] == [Kind.PURCHASE, Kind.REFUND]
    assert {(r.response_code, r.rrn, r.approval_code) for r in results} == {("00", txns[1].rrn, txns[1].approval_code)}
    assert sorted(r.replayed for r in results) == [False] + [True] * 9
    assert original is not None
    assert original.refunded_amount == 2_500
    assert sorted(topic.split("/")[-2:] for topic in topics) == [["duplicate", "replayed"]] * 9 + [
        ["refund", "approved"]
    ]


async def test_a_reversal_racing_its_original_through_another_instance_never_leaves_the_original_standing(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        pairs = []
        for n in range(25):
            sale = till.sale(1_000 + n, stan=f"{500 + n:06d}")
            reversal = till.request(
                Kind.REVERSAL, "0400", "000000", sale.amount, reference=_de90(sale), stan=f"{800 + n:06d}"
            )
            pairs.append((sale, reversal))
        ctx = till.ctx()
        outcomes = await asyncio.gather(
            *(
                asyncio.gather(first.process(sale, ctx, _render), second.process(reversal, ctx, _render))
                for sale, reversal in pairs
            )
        )
        txns = {(t.kind, t.stan): t for t in await first.all_txns()}

    for (sale, reversal), (sale_result, reversal_result) in zip(pairs, outcomes, strict=True):
        stored_sale = txns[(Kind.PURCHASE, sale.stan)]
        if sale_result.response_code == "00":
            # the reversal came second and found it
            assert reversal_result.response_code == "00"
            assert stored_sale.status is TxnStatus.REVERSED
        else:
            # the reversal came first and left a tombstone that refused the late original
            assert (reversal_result.response_code, reversal_result.reason) == ("25", "reversal_unmatched")
            assert sale_result.reason == "reversed_before_arrival"
            assert txns[(Kind.REVERSAL, reversal.stan)].status is TxnStatus.UNMATCHED
        assert stored_sale.status is not TxnStatus.APPROVED


async def test_first_purchases_of_a_terminal_through_two_instances_open_exactly_one_batch(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        sales = [till.sale(100 + n) for n in range(30)]
        ctx = till.ctx()
        results = await asyncio.gather(
            *((first if n % 2 else second).process(sale, ctx, _render) for n, sale in enumerate(sales))
        )
        batches = await first.list_batches()
        txns = await second.all_txns()

    assert {r.response_code for r in results} == {"00"}
    assert [(b.terminal_id, b.batch_no, b.state.value, b.debit_count) for b in batches] == [(T1, "000001", "open", 30)]
    assert len({t.batch_id for t in txns}) == 1


async def test_a_settlement_racing_purchases_on_another_instance_counts_exactly_what_its_batch_holds(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        assert (await first.process(till.sale(1), till.ctx(), _render)).response_code == "00"
        sales = [till.sale(100 + n) for n in range(30)]
        settlement = till.request(Kind.SETTLEMENT, "0500", "920000", None, totals=SettlementTotals(0, 0, 0, 0))
        ctx = till.ctx()
        tasks = [asyncio.create_task(first.process(sale, ctx, _render)) for sale in sales[:15]]
        tasks.append(asyncio.create_task(second.process(settlement, ctx, _render)))
        tasks += [asyncio.create_task(first.process(sale, ctx, _render)) for sale in sales[15:]]
        await asyncio.gather(*tasks)
        batches = await second.list_batches()
        conn = await connect_to_schema(postgres_url, postgres_schema)
        try:
            stored = await conn.fetchval("SELECT ledger_totals FROM batches WHERE state = 'closed'")
        finally:
            await conn.close()

    # the settlement closed batch 1; purchases that came after it opened batch 2
    closed = batches[0]
    assert (closed.batch_no, closed.state.value) == ("000001", "closed")
    assert [(b.batch_no, b.state.value) for b in batches[1:]] in ([], [("000002", "open")])
    # the totals the settlement computed are those of every purchase that ended up in its batch
    assert stored == f"0,0,{closed.debit_count},{closed.debit_amount}"
    assert sum(b.debit_count for b in batches) == 31


def _card(n: int) -> str:
    """A distinct card number that passes the Luhn check."""
    body = f"476173{n:09d}"
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


@pytest.mark.parametrize(
    ("policy", "per_card", "declined"),
    [
        pytest.param(Policy(terminal_daily_refund_count=5), False, ("65", "refund_velocity_count"), id="terminal"),
        pytest.param(Policy(card_daily_refund_amount=500), True, ("61", "refund_velocity_amount"), id="card"),
    ],
)
async def test_daily_refund_limits_of_a_terminal_or_a_card_hold_across_instances(
    postgres_url: str, postgres_schema: str, policy: Policy, per_card: bool, declined: tuple[str, str]
) -> None:
    """Sixteen refunds of 100 against sixteen sales: on one terminal (other cards), or of one card (16 terminals)."""
    till = Till(policy=policy)
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        refunds = []
        for n in range(16):
            card, terminal = (CARD_A, f"TERM{n:04d}") if per_card else (_card(n), T1)
            sale = await first.process(till.sale(1_000, card=card, terminal=terminal), till.ctx(), _render)
            refunds.append(till.refund(sale.rrn, 100, card=card, terminal=terminal))
        ctx = till.ctx()
        results = await asyncio.gather(
            *((first if n % 2 else second).process(refund, ctx, _render) for n, refund in enumerate(refunds))
        )

    assert sorted(r.response_code for r in results) == ["00"] * 5 + [declined[0]] * 11
    assert {r.reason for r in results if r.response_code != "00"} == {declined[1]}


async def test_rrns_are_unique_twelve_digit_numbers_across_instances(postgres_url: str, postgres_schema: str) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        sales = [till.sale(100) for _ in range(40)]
        ctx = till.ctx()
        results = await asyncio.gather(
            *((first if n % 2 else second).process(sale, ctx, _render) for n, sale in enumerate(sales))
        )
    rrns = [r.rrn for r in results]
    assert all(rrn is not None and len(rrn) == 12 and rrn.isdigit() for rrn in rrns)
    assert len(set(rrns)) == 40


async def test_the_outbox_gives_pending_rows_in_id_order_marks_them_sent_prunes_and_reports_status(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    notified: list[int] = []
    async with _ledger(postgres_url, postgres_schema) as ledger:
        ledger.on_events = lambda: notified.append(1)
        empty = await ledger.status()
        sale = await ledger.process(till.sale(5_000), till.ctx(), _render)
        assert notified == []  # a plain purchase publishes nothing
        for amount in (1_000, 1_500, 2_000):
            await ledger.process(till.refund(sale.rrn, amount), till.ctx(), _render)
        assert len(notified) == 3

        rows = await ledger.pending(10)
        assert [row.id for row in rows] == sorted(row.id for row in rows)
        assert [row.topic.rsplit("/", 2)[-2:] for row in rows] == [["refund", "approved"]] * 3
        assert {row.ordering_key for row in rows} == {f"{MID}/{T1}/{sale.rrn}"}
        assert all(row.created_at.tzinfo is not None for row in rows)
        assert [row.id for row in await ledger.pending(2)] == [rows[0].id, rows[1].id]
        before = await ledger.status()

        sent_at = START + timedelta(minutes=5)
        await ledger.mark_sent([rows[0].id, rows[1].id], sent_at)
        assert [row.id for row in await ledger.pending(10)] == [rows[2].id]
        await ledger.record_error("broker unreachable", sent_at + timedelta(seconds=1))
        after = await ledger.outbox_status()

        assert await ledger.prune(sent_at) == 0  # sent AT that time, not before it
        assert await ledger.prune(sent_at + timedelta(seconds=1)) == 2
        remaining = await ledger.status()

    assert (empty.pending, empty.oldest_pending_at, empty.last_sent_at, empty.last_error) == (0, None, None, None)
    assert before.pending == 3
    assert before.oldest_pending_at == rows[0].created_at
    assert after.pending == 1
    assert after.oldest_pending_at == rows[2].created_at
    assert after.last_sent_at == sent_at
    assert (after.last_error, after.last_error_at) == ("broker unreachable", sent_at + timedelta(seconds=1))
    assert remaining.pending == 1


async def test_only_the_instance_holding_the_relay_lease_gets_pending_rows_until_it_closes(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    first = await _ledger(postgres_url, postgres_schema).open()
    try:
        async with _ledger(postgres_url, postgres_schema) as second:
            sale = await second.process(till.sale(5_000), till.ctx(), _render)
            await second.process(till.refund(sale.rrn, 1_000), till.ctx(), _render)
            assert len(await first.pending(10)) == 1
            assert await second.pending(10) == []
            assert first.relay_lease_held
            assert not second.relay_lease_held
            assert (await second.status()).pending == 1  # status is about the shared outbox
            await first.close()
            assert len(await second.pending(10)) == 1
            assert second.relay_lease_held
    finally:
        await first.close()


async def test_a_deadlock_rolls_the_request_back_and_runs_it_again(postgres_url: str, postgres_schema: str) -> None:
    """An outside session locks the batch, then the original, against a void that locked them the other way."""
    name = f"deadlock-{postgres_schema}"
    settings = {**schema_settings(postgres_schema), "application_name": name, "deadlock_timeout": "300ms"}
    try:
        ledger = await PostgresLedger(postgres_url, server_settings=settings).open()
    except asyncpg.InsufficientPrivilegeError:
        pytest.skip("setting deadlock_timeout needs a superuser")
    till = Till()
    other = await connect_to_schema(postgres_url, postgres_schema)
    try:
        await other.execute("SET deadlock_timeout = '10s'")
        sale_request = till.sale(4_000)
        sale = await ledger.process(sale_request, till.ctx(), _render)
        assert sale.rrn is not None
        stored = await ledger.find_txn(MID, sale.rrn)
        assert stored is not None
        void = till.request(Kind.VOID, "0200", "020000", 4_000, reference=Reference(rrn=sale.rrn))

        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM batches WHERE id = $1 FOR UPDATE", stored.batch_id)
        task = asyncio.create_task(ledger.process(void, till.ctx(), _render))
        await _until(
            lambda: other.fetchval(
                "SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                name,
            ),
            what="the void to wait for the batch",
            within=20.0,
        )
        # the void holds the sale's row and waits for the batch: close the cycle
        await asyncio.wait_for(other.execute("SELECT 1 FROM txns WHERE id = $1 FOR UPDATE", stored.id), 30)
        await tx.commit()
        result = await asyncio.wait_for(task, 30)
        after = await ledger.find_txn(MID, sale.rrn)
    finally:
        await other.close()
        await ledger.close()

    assert ledger.retries >= 1  # the deadlock victim was run again (a loaded machine may need two tries)
    assert result.response_code == "00"
    assert after is not None
    assert after.status is TxnStatus.VOIDED


async def _until(check: Callable[[], Awaitable[Any]], *, what: str, within: float = 5.0) -> None:
    """Poll ``check`` until it is true; fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_migrations_run_once_even_when_instances_start_together(postgres_url: str, postgres_schema: str) -> None:
    ledgers = [_ledger(postgres_url, postgres_schema) for _ in range(3)]
    await asyncio.gather(*(ledger.open() for ledger in ledgers))
    for ledger in ledgers:
        await ledger.close()
    async with _ledger(postgres_url, postgres_schema) as again:
        assert again.schema == postgres_schema
    conn = await connect_to_schema(postgres_url, postgres_schema)
    try:
        versions = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
        types = dict(
            await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = $1 AND table_name = 'txns' AND column_name IN ('amount', 'created_at')",
                postgres_schema,
            )
        )
    finally:
        await conn.close()
    assert [row["version"] for row in versions] == list(range(1, len(MIGRATIONS) + 1))
    assert types == {"amount": "bigint", "created_at": "timestamp with time zone"}


async def test_a_schema_newer_than_this_release_is_refused(postgres_url: str, postgres_schema: str) -> None:
    async with _ledger(postgres_url, postgres_schema):
        pass
    conn = await connect_to_schema(postgres_url, postgres_schema)
    try:
        await conn.execute("INSERT INTO schema_version (version, description) VALUES ($1, 'from the future')", 99)
    finally:
        await conn.close()
    with pytest.raises(RuntimeError, match="version 99"):
        await _ledger(postgres_url, postgres_schema).open()


async def test_the_url_may_name_the_schema_as_a_server_setting(postgres_url: str, postgres_schema: str) -> None:
    separator = "&" if "?" in postgres_url else "?"
    async with PostgresLedger(f"{postgres_url}{separator}search_path={postgres_schema}") as ledger:
        assert ledger.schema == postgres_schema


async def test_the_cutoff_sweep_closes_batches_opened_before_it_with_an_event_each(
    postgres_url: str, postgres_schema: str
) -> None:
    policy = replace(POLICY, cutoff=time(23, 30))  # UTC; START is 09:00
    till = Till(policy)
    async with _ledger(postgres_url, postgres_schema) as ledger:
        await ledger.process(till.sale(100), till.ctx(), _render)
        await ledger.process(till.sale(100, terminal=T2), till.ctx(), _render)
        assert await ledger.close_batches(policy, START + timedelta(hours=1), _render) == 0
        after = START.replace(hour=23, minute=31)
        assert await ledger.close_batches(policy, after, _render) == 2
        assert await ledger.close_batches(policy, after, _render) == 0  # once only
        batches = await ledger.list_batches()
        assert await ledger.list_batches(open_only=True) == []
        assert (await ledger.status()).pending == 2  # one pos.batch.closed each
    assert {(b.terminal_id, b.state.value, b.result) for b in batches} == {
        (T1, "closed", "cutoff"),
        (T2, "closed", "cutoff"),
    }


async def test_the_database_holds_no_full_card_number(postgres_url: str, postgres_schema: str) -> None:
    script_ledger = _ledger(postgres_url, postgres_schema)
    async with script_ledger:
        await scripted_business_day(Script(script_ledger))
    conn = await connect_to_schema(postgres_url, postgres_schema)
    try:
        txns = await conn.fetch("SELECT t::text FROM txns t")
        outbox = await conn.fetch("SELECT payload FROM outbox")
    finally:
        await conn.close()
    dumped = "\n".join(row[0] for row in txns) + "\n".join(bytes(row[0]).decode() for row in outbox)
    assert "476173******0119" in dumped
    assert CARD_A not in dumped
    assert CARD_B not in dumped


async def test_a_closed_ledger_refuses_work(postgres_url: str, postgres_schema: str) -> None:
    ledger = _ledger(postgres_url, postgres_schema)
    till = Till()
    with pytest.raises(LedgerClosedError):
        await ledger.process(till.sale(100), till.ctx(), _render)
    await ledger.open()
    await ledger.close()
    with pytest.raises(LedgerClosedError):
        await ledger.pending(10)
    with pytest.raises(LedgerClosedError):
        await ledger.status()


def test_two_changes_to_one_record_in_one_plan_are_written_as_if_applied_in_sequence() -> None:
    from gateway.adapters.postgres_ledger import _merge_changes
    from gateway.core.decide import TxnChange

    merged = _merge_changes(
        (
            TxnChange(7, refunded_delta=300, completed=True),
            TxnChange(3, status=TxnStatus.VOIDED),
            TxnChange(7, status=TxnStatus.REVERSED, refunded_delta=-100, effective_amount=50),
        )
    )
    assert merged == [
        TxnChange(7, status=TxnStatus.REVERSED, refunded_delta=200, effective_amount=50, completed=True),
        TxnChange(3, status=TxnStatus.VOIDED),
    ]


async def test_a_reversal_left_unmatched_by_another_sqlite_ledger_refuses_the_late_original(tmp_path: Path) -> None:
    """The SQLite ledger skips the tombstone lookup for terminals without unmatched reversals; that
    knowledge is dropped whenever another process committed (here: the ledger that recorded one)."""
    till = Till()
    async with (
        SqliteLedger(tmp_path / "shared.db", synchronous="OFF") as first,
        SqliteLedger(tmp_path / "shared.db", synchronous="OFF") as second,
    ):
        warm = await first.process(till.sale(1_000), till.ctx(), _render)
        assert warm.response_code == "00"  # the first ledger has looked: no unmatched reversal anywhere
        sale = till.sale(2_000, stan="000200")
        reversal = till.request(Kind.REVERSAL, "0400", "000000", sale.amount, reference=_de90(sale), stan="000300")
        unmatched = await second.process(reversal, till.ctx(), _render)
        assert (unmatched.response_code, unmatched.reason) == ("25", "reversal_unmatched")
        late = await first.process(sale, till.ctx(), _render)
        assert late.reason == "reversed_before_arrival"
        # and within one ledger: its own unmatched reversal refuses the next late original at once
        sale2 = till.sale(3_000, stan="000400")
        reversal2 = till.request(Kind.REVERSAL, "0400", "000000", sale2.amount, reference=_de90(sale2), stan="000500")
        assert (await first.process(reversal2, till.ctx(), _render)).reason == "reversal_unmatched"
        assert (await first.process(sale2, till.ctx(), _render)).reason == "reversed_before_arrival"
