"""Issue 24 in the ledger, on both databases: requests the acquirer host decides are recorded pending
(reserving what they take), concluded by the host's answer or its absence in a second transaction, and
what the host may hold is queued for it (reversals, advices) in the same transaction.

The network is not here (tests/e2e/test_upstream.py drives the gateway between the emulator and
iso-host): each test plays the host's answer by calling ``conclude``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

from ledger_scripts import MID, POLICY, T1, NewLedger, Till, new_ledger, render
from postgres import postgres_schema, postgres_url

from gateway.core.host import host_saf_message, upstream_stan
from gateway.core.model import Kind, Reference, TxnStatus
from gateway.core.upstream import HostAnswer, NoAnswer
from gateway.protocol.host import host_message

__all__ = ["new_ledger", "postgres_schema", "postgres_url"]  # fixtures

FORWARD = frozenset({Kind.PURCHASE, Kind.PREAUTH, Kind.VOID, Kind.REFUND, Kind.COMPLETION})
UPSTREAM = replace(POLICY, forward=FORWARD)


def _till(**policy: object) -> Till:
    return Till(replace(UPSTREAM, **policy))  # type: ignore[arg-type]


async def _approved_sale(ledger: object, till: Till, amount: int = 10_000) -> str:
    pending = await ledger.process(till.sale(amount), till.ctx(), render)  # type: ignore[attr-defined]
    assert pending.forward and pending.txn_id is not None
    done = await ledger.conclude(pending.txn_id, None, HostAnswer("00", "H00001"), till.ctx(), render)  # type: ignore[attr-defined]
    assert done.response_code == "00" and done.rrn is not None
    return str(done.rrn)


async def test_a_sale_is_pending_until_the_host_answers_and_the_host_code_is_the_answer(new_ledger: NewLedger) -> None:
    till = _till()
    async with new_ledger() as ledger:
        approved = await ledger.process(till.sale(5_000), till.ctx(), render)
        declined = await ledger.process(till.sale(6_000), till.ctx(), render)
        assert approved.txn_id is not None and declined.txn_id is not None
        pending = {t.id: t for t in await ledger.all_txns()}
        yes = await ledger.conclude(approved.txn_id, None, HostAnswer("00", "AB12CD"), till.ctx(), render)
        no = await ledger.conclude(declined.txn_id, None, HostAnswer("51"), till.ctx(), render)
        after = {t.id: t for t in await ledger.all_txns()}
        batches = await ledger.list_batches()

    assert approved.forward and approved.approval_code is None
    assert approved.host is not None and approved.host.stan == upstream_stan(str(approved.rrn))
    assert {t.status for t in pending.values()} == {TxnStatus.PENDING}
    assert (yes.response_code, yes.approval_code, yes.rrn) == ("00", "AB12CD", approved.rrn)
    assert (no.response_code, no.reason) == ("51", "upstream_declined")
    assert after[approved.txn_id].status is TxnStatus.APPROVED and after[approved.txn_id].approval_code == "AB12CD"
    assert after[declined.txn_id].status is TxnStatus.DECLINED and after[declined.txn_id].response_code == "51"
    assert [(b.debit_count, b.debit_amount) for b in batches] == [(1, 5_000)]  # the declined one counts nothing


async def test_forty_concurrent_refunds_reserve_exactly_the_refundable_amount_while_the_host_decides(
    new_ledger: NewLedger,
) -> None:
    till = _till()
    async with new_ledger() as ledger:
        rrn = await _approved_sale(ledger, till)
        ctx = till.ctx()
        refunds = await asyncio.gather(*(ledger.process(till.refund(rrn, 1_000), ctx, render) for _ in range(40)))
        forwarded = [r for r in refunds if r.forward]
        # the host declines two of them: their reservation goes back, and two more refunds fit
        for n, result in enumerate(forwarded):
            assert result.txn_id is not None
            answer = HostAnswer("05") if n < 2 else HostAnswer("00", f"R{n:05d}")
            await ledger.conclude(result.txn_id, till.refund(rrn, 1_000), answer, till.ctx(), render)
        more = [await ledger.process(till.refund(rrn, 1_000), till.ctx(), render) for _ in range(3)]
        original = await ledger.find_txn(MID, rrn)

    assert len(forwarded) == 10
    assert sorted(r.response_code for r in refunds if not r.forward) == ["64"] * 30
    assert [r.forward for r in more] == [True, True, False]
    assert more[2].response_code == "64"
    assert original is not None and original.refunded_amount == 8_000  # 10 forwarded - 2 declined


async def test_no_answer_gives_91_and_queues_a_reversal_that_names_what_the_host_got(new_ledger: NewLedger) -> None:
    till = _till()
    async with new_ledger() as ledger:
        sale = await ledger.process(till.sale(2_500), till.ctx(), render)
        assert sale.txn_id is not None and sale.host is not None
        final = await ledger.conclude(sale.txn_id, None, NoAnswer(sent=True), till.ctx(), render)
        queued = await ledger.saf_items()
        topics = [row.topic for row in await ledger.pending(10)]
        item = queued[0]
        await ledger.saf_attempted(item.id, till.now)
        await ledger.saf_finished(queued[0], "acknowledged", till.now, response_code="00", render=render)
        left = await ledger.saf_items()
        everything = await ledger.saf_items(queued_only=False)
        topics_after = [row.topic for row in await ledger.pending(10)]
        txn = (await ledger.all_txns())[0]

    assert (final.response_code, final.reason, final.queued) == ("91", "upstream_timeout", 1)
    assert [(i.action, i.txn.id, i.state) for i in queued] == [("reverse", sale.txn_id, "queued")]
    assert txn.status is TxnStatus.DECLINED
    reversal = host_message(host_saf_message(item, till.now))
    assert reversal.mti == "0420"
    assert reversal.fields[90].startswith(f"0200{sale.host.stan}{sale.host.transmission_time}")
    assert reversal.fields[37] == sale.rrn and 2 not in reversal.fields
    assert [t.rsplit("/", 2)[-2:] for t in topics] == [["upstream", "reversal_queued"]]
    assert left == [] and [(i.state, i.attempts, i.response_code) for i in everything] == [("acknowledged", 1, "00")]
    assert [t.rsplit("/", 2)[-2:] for t in topics_after][-1] == ["upstream", "reversal_acknowledged"]


async def test_the_host_down_declines_with_91_or_stands_in_and_queues_an_advice(new_ledger: NewLedger) -> None:
    async with new_ledger() as ledger:
        till = _till()
        down = await ledger.process(till.sale(100), till.ctx(), render)
        assert down.txn_id is not None
        declined = await ledger.conclude(down.txn_id, till.sale(100), NoAnswer(sent=False), till.ctx(), render)
        standin = _till(standin_when_down=True, standin_max_amount=1_000)
        small, big = till.sale(500, stan="000900"), till.sale(5_000, stan="000901")
        results = []
        for request in (small, big):
            pending = await ledger.process(request, standin.ctx(), render)
            assert pending.txn_id is not None
            results.append(await ledger.conclude(pending.txn_id, request, NoAnswer(sent=False), standin.ctx(), render))
        queued = await ledger.saf_items()

    assert (declined.response_code, declined.reason, declined.queued) == ("91", "upstream_unavailable", 0)
    assert (results[0].response_code, results[0].queued) == ("00", 1) and results[0].approval_code
    assert (results[1].response_code, results[1].reason) == ("61", "over_limit")
    assert [(i.action, i.txn.stan) for i in queued] == [("advise", "000900")]


async def test_a_terminal_reversal_of_a_pending_request_wins_over_the_host_approving_it_later(
    new_ledger: NewLedger,
) -> None:
    till = _till()
    async with new_ledger() as ledger:
        rrn = await _approved_sale(ledger, till)
        refund = till.refund(rrn, 4_000)
        pending = await ledger.process(refund, till.ctx(), render)
        assert pending.txn_id is not None
        named = Reference(mti="0200", stan=refund.stan, transmission_time=refund.transmission_time)
        reversal = till.request(Kind.REVERSAL, "0400", "200000", 4_000, reference=named)
        reversed_ = await ledger.process(reversal, till.ctx(), render)
        late = await ledger.conclude(pending.txn_id, refund, HostAnswer("00", "LATE01"), till.ctx(), render)
        original = await ledger.find_txn(MID, rrn)
        record = next(t for t in await ledger.all_txns() if t.id == pending.txn_id)
        queued = await ledger.saf_items()

    assert (reversed_.response_code, reversed_.queued) == ("00", 1)
    assert record.status is TxnStatus.REVERSED
    assert late.response_code == "91"  # what the ledger says (reversed): not the host's late approval
    assert original is not None and original.refunded_amount == 0
    assert [(i.action, i.txn.id) for i in queued] == [("reverse", pending.txn_id)]


async def test_a_void_waits_for_nothing_pending_and_a_reversal_0400_is_refused_while_a_refund_is_pending(
    new_ledger: NewLedger,
) -> None:
    till = _till()
    async with new_ledger() as ledger:
        rrn = await _approved_sale(ledger, till)
        sale = (await ledger.all_txns())[0]
        pending = await ledger.process(till.refund(rrn, 1_000), till.ctx(), render)
        void = await ledger.process(
            till.request(Kind.VOID, "0200", "020000", 10_000, reference=Reference(rrn=rrn)), till.ctx(), render
        )
        reversal = await ledger.process(
            till.request(Kind.REVERSAL, "0400", "000000", 10_000,
                         reference=Reference(mti="0200", stan=sale.stan, transmission_time=sale.transmission_time)),
            till.ctx(), render,
        )  # fmt: skip
    assert pending.forward
    assert (void.response_code, void.reason) == ("12", "has_later_activity")
    assert (reversal.response_code, reversal.reason) == ("12", "has_later_activity")


async def test_records_left_pending_by_a_stop_are_concluded_at_start_as_unanswered(new_ledger: NewLedger) -> None:
    till = _till()
    async with new_ledger() as ledger:
        rrn = await _approved_sale(ledger, till)
        await ledger.process(till.refund(rrn, 3_000), till.ctx(), render)  # the gateway stops here
    async with new_ledger() as ledger:  # the next start
        left = await ledger.pending_records()
        for record in left:
            await ledger.conclude(record.id, None, NoAnswer(sent=True), till.ctx(), render)
        original = await ledger.find_txn(MID, rrn)
        queued = await ledger.saf_items()
        again = await ledger.process(till.refund(rrn, 10_000), till.ctx(), render)
    assert [(r.kind, r.status) for r in left] == [(Kind.REFUND, TxnStatus.PENDING)]
    assert [(i.action, i.txn.id) for i in queued] == [("reverse", left[0].id)]
    assert original is not None and original.refunded_amount == 0
    assert again.forward  # the whole amount is refundable again


async def test_a_repeat_of_a_pending_request_is_told_09_and_names_the_pending_record(new_ledger: NewLedger) -> None:
    till = _till()
    async with new_ledger() as ledger:
        sale = till.sale(700)
        first = await ledger.process(sale, till.ctx(), render)
        till.now += timedelta(seconds=5)
        repeat = await ledger.process(replace(sale, mti="0201"), till.ctx(), render)
    assert first.forward
    assert (repeat.response_code, repeat.reason, repeat.txn_id, repeat.forward) == (
        "09", "upstream_pending", first.txn_id, False
    )


async def test_the_queue_lease_is_held_by_one_ledger_at_a_time(new_ledger: NewLedger) -> None:
    async with new_ledger() as first, new_ledger() as second:
        assert await first.hold_lease("saf_lease", "a", 30)
        assert not await second.hold_lease("saf_lease", "b", 30)
        await first.release_lease("saf_lease", "a")
        assert await second.hold_lease("saf_lease", "b", 30)
    assert T1  # the till's terminal (imported for the scripts)
