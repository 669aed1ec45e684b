"""The ledger's contract, run against both ledgers: what a gateway relies on whichever database it uses.

Each test gets ``new_ledger``: a factory of unopened ledgers sharing one store (a SQLite file in the
test's directory, or a PostgreSQL schema of the test's own), so that "two ledgers" are two gateway
processes on one database. The answers of both ledgers to the same scripts are compared record by
record in test_postgres_ledger.py; here each must keep the rules on its own.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import time, timedelta

import pytest
from ledger_scripts import (
    CARD_A,
    CARD_B,
    MID,
    POLICY,
    START,
    T1,
    T2,
    NewLedger,
    Script,
    Till,
    new_ledger,
    render,
    scripted_business_day,
    scripted_refund_controls_ii,
)
from postgres import postgres_schema, postgres_url

from gateway.adapters.ledger import LedgerClosedError
from gateway.core.model import Kind, Request, SettlementTotals, UploadLine

__all__ = ["new_ledger", "postgres_schema", "postgres_url"]  # fixtures


async def test_a_business_day_gets_the_answers_the_rules_give(new_ledger: NewLedger) -> None:
    async with new_ledger() as ledger:
        script = Script(ledger)
        await scripted_business_day(script)
        original = await ledger.find_txn(MID, script.rrn("sale1"))
        batches = await ledger.list_batches(terminal=T1)

    answers = {label: (code, reason) for label, code, reason, _, _ in script.trace}
    assert answers["refund1"] == ("00", "approved")
    assert answers["refund_too_much"] == ("64", "exceeds_refundable")
    assert answers["refund_other_card"] == ("14", "pan_mismatch")
    assert answers["void_after_refund"][0] == "12"
    assert answers["void_wrong_amount"] == ("64", "amount_mismatch")
    assert answers["void_other_terminal"][0] == "12"
    assert answers["void2_again"][0] == "12"
    assert answers["complete_over_tolerance"] == ("64", "amount_mismatch")
    assert answers["complete_again"][0] == "12"
    assert answers["ghost_arrives"] == ("12", "reversed_before_arrival")
    assert answers["reverse_unknown"] == ("25", "reversal_unmatched")
    assert answers["refund4_too_much"][0] == "64" and answers["refund4"][0] == "00"  # 6,000 left after a partial
    assert answers["refund1_again"][0] == "00"  # its first refund was reversed
    assert answers["refund_rest_repeat"] == ("00", "approved") and script.results["refund_rest_repeat"].replayed
    assert script.results["refund_rest_repeat"].rrn == script.rrn("refund_rest")
    assert answers["refund_rest_conflict"] == ("94", "duplicate_conflict")
    assert answers["unreferenced_t1"][0] != "00" and answers["unreferenced_t2"][0] == "00"
    assert answers["settle_t1"][0] == "00" and answers["settle_t2"][0] == "95"
    assert answers["void_settled"] == ("12", "batch_settled")
    assert answers["refund_out_of_window"][0] == "12"
    assert original is not None and original.refunded_amount == 10_000 and original.refundable == 0
    assert [(b.batch_no, b.state.value) for b in batches] == [("000001", "closed"), ("000002", "open")]


async def test_issue_20_sequences_get_the_answers_the_rules_give(new_ledger: NewLedger) -> None:
    async with new_ledger() as ledger:
        script = Script(ledger, Till(replace(POLICY, cutoff=time(23, 30))))
        await scripted_refund_controls_ii(script)
        cases = await ledger.list_exceptions()

    answers = {label: (code, reason) for label, code, reason, _, _ in script.trace}
    assert answers["late_refund_arrives"] == ("12", "reversed_before_arrival")
    assert answers["refund1_new_de7"] == ("00", "approved") and script.results["refund1_new_de7"].replayed
    assert answers["refund1_other_amount"] == ("94", "duplicate_conflict")
    assert answers["reverse_other_terminal"] == ("25", "reversal_unmatched")
    assert answers["reverse_by_stan_wrong_amount"] == ("25", "reversal_unmatched")
    assert answers["void_after_cutoff"] == ("12", "batch_settled")
    assert answers["settle_across_the_cutoff"][0] == "00"
    assert [(case.kind, case.original_rrn) for case in cases] == [("reversal_conflict", script.rrn("sale2"))]


async def test_the_outbox_gives_pending_rows_in_id_order_marks_them_sent_prunes_and_reports_status(
    new_ledger: NewLedger,
) -> None:
    till = Till()
    notified: list[int] = []
    async with new_ledger() as ledger:
        ledger.on_events = lambda: notified.append(1)
        empty = await ledger.status()
        sale = await ledger.process(till.sale(5_000), till.ctx(), render)
        assert notified == []  # a plain purchase publishes nothing
        for amount in (1_000, 1_500, 2_000):
            await ledger.process(till.refund(sale.rrn, amount), till.ctx(), render)
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


async def test_one_ledger_of_two_on_a_store_relays_until_it_closes(new_ledger: NewLedger) -> None:
    till = Till()
    first = await new_ledger().open()
    try:
        async with new_ledger() as second:
            sale = await second.process(till.sale(5_000), till.ctx(), render)
            await second.process(till.refund(sale.rrn, 1_000), till.ctx(), render)
            assert len(await first.pending(10)) == 1
            assert await second.pending(10) == []
            assert (await second.status()).pending == 1  # status is about the shared outbox
            await first.close()
            assert len(await second.pending(10)) == 1
    finally:
        await first.close()


async def test_the_cutoff_sweep_closes_batches_opened_before_it_with_an_event_each(new_ledger: NewLedger) -> None:
    policy = replace(POLICY, cutoff=time(23, 30))  # UTC; START is 09:00
    till = Till(policy)
    async with new_ledger() as ledger:
        await ledger.process(till.sale(100), till.ctx(), render)
        await ledger.process(till.sale(100, terminal=T2), till.ctx(), render)
        assert await ledger.close_batches(policy, START + timedelta(hours=1), render) == 0
        after = START.replace(hour=23, minute=31)
        assert await ledger.close_batches(policy, after, render) == 2
        assert await ledger.close_batches(policy, after, render) == 0  # once only
        batches = await ledger.list_batches()
        assert await ledger.list_batches(open_only=True) == []
        assert (await ledger.status()).pending == 2  # one pos.batch.closed each
        # the terminal's next 0500 reconciles the swept batch and answers by its totals
        till.now = after
        settle = till.request(Kind.SETTLEMENT, "0500", "920000", None, totals=SettlementTotals(0, 0, 1, 100))
        settled = await ledger.process(settle, till.ctx(), render)
    assert {(b.terminal_id, b.state.value, b.result) for b in batches} == {
        (T1, "closed", "cutoff"),
        (T2, "closed", "cutoff"),
    }
    assert settled.response_code == "00"


async def test_a_closed_ledger_refuses_work(new_ledger: NewLedger) -> None:
    ledger = new_ledger()
    till = Till()
    with pytest.raises(LedgerClosedError):
        await ledger.process(till.sale(100), till.ctx(), render)
    await ledger.open()
    await ledger.close()
    with pytest.raises(LedgerClosedError):
        await ledger.pending(10)
    with pytest.raises(LedgerClosedError):
        await ledger.status()


async def test_rrns_are_unique_and_a_clean_restart_continues_them(new_ledger: NewLedger) -> None:
    till = Till()
    async with new_ledger() as ledger:
        first = [(await ledger.process(till.sale(100), till.ctx(), render)).rrn for _ in range(5)]
    async with new_ledger() as ledger:
        after = (await ledger.process(till.sale(100), till.ctx(), render)).rrn
    rrns = [*first, after]
    assert all(rrn is not None and len(rrn) == 12 and rrn.isdigit() for rrn in rrns)
    assert len(set(rrns)) == 6
    assert int(str(after)) > int(str(first[-1]))


async def test_no_full_card_number_is_stored(new_ledger: NewLedger) -> None:
    async with new_ledger() as ledger:
        await scripted_business_day(Script(ledger))
        txns = await ledger.all_txns()
        events = await ledger.pending(1000)
    dumped = repr(txns) + "".join(bytes(row.payload).decode() for row in events)
    assert "476173******0119" in dumped
    assert CARD_A not in dumped
    assert CARD_B not in dumped


async def test_records_keep_the_terminals_batch_number_and_a_sign_on_learns_the_batch_to_use(
    new_ledger: NewLedger,
) -> None:
    till = Till()
    settlement = SettlementTotals(credit_count=0, credit_amount=0, debit_count=1, debit_amount=1000)
    async with new_ledger() as ledger:
        before_any = await ledger.batch_to_use(MID, T1, POLICY, till.now)
        await ledger.process(till.sale(1000, terminal_batch="000001"), till.ctx(), render)
        while_open = await ledger.batch_to_use(MID, T1, POLICY, till.now)
        settle = till.request(Kind.SETTLEMENT, "0500", "", None, card=None, totals=settlement, terminal_batch="000001")
        assert (await ledger.process(settle, till.ctx(), render)).response_code == "00"
        after_settlement = await ledger.batch_to_use(MID, T1, POLICY, till.now)
        other_terminal = await ledger.batch_to_use(MID, T2, POLICY, till.now)
        await ledger.process(till.sale(500, terminal_batch=after_settlement), till.ctx(), render)
        txns = await ledger.all_txns()
        batches = await ledger.list_batches(terminal=T1)

    assert (before_any, while_open, after_settlement, other_terminal) == ("000001", "000001", "000002", "000001")
    assert [txn.terminal_batch for txn in txns] == ["000001", "000001", "000002"]
    assert [batch.batch_no for batch in batches] == ["000001", "000002"]


def upload(till: Till, *lines: UploadLine, complete: bool = False) -> Request:
    """A batch upload's lines (or its end) for the terminal batch 000001."""
    return till.request(Kind.BATCH_UPLOAD, "0320", "", None, card=None, terminal_batch="000001",
                        uploads=lines, upload_complete=complete)  # fmt: skip


async def test_a_batch_upload_is_kept_masked_and_its_end_lists_the_differences(new_ledger: NewLedger) -> None:
    till = Till()
    async with new_ledger() as ledger:
        sale = await ledger.process(till.sale(1000, terminal_batch="000001"), till.ctx(), render)
        listed = CARD_B.ljust(20, "0")  # the PAN filled with zeros to n20
        await ledger.process(upload(till, UploadLine("999999", 700, listed)), till.ctx(), render)
        again = await ledger.process(upload(till, UploadLine("999999", 800, listed)), till.ctx(), render)  # replaces it
        end = await ledger.process(upload(till, complete=True), till.ctx(), render)
        events = [json.loads(bytes(row.payload)) for row in await ledger.pending(100)]
        txns = await ledger.all_txns()

    assert again.response_code == "00" and end.response_code == "00" and sale.rrn is not None
    listing = [event for event in events if "differences" in event["data"]["details"]]
    assert len(listing) == 1 and listing[0]["type"] == "pos.batch.mismatch"
    found = {line["stan"]: line for line in listing[0]["data"]["details"]["differences"]}
    assert found["999999"]["difference"] == "not_in_ledger" and found["999999"]["terminal_amount"] == 800
    assert (found[txns[0].stan]["difference"], found[txns[0].stan]["rrn"]) == ("not_on_terminal", sale.rrn)
    assert len(found) == 2
    assert CARD_A not in json.dumps(events) and CARD_B not in json.dumps(events)


async def test_a_batch_upload_that_agrees_with_the_ledger_ends_settled(new_ledger: NewLedger) -> None:
    till = Till()
    async with new_ledger() as ledger:
        sale = till.sale(1000, terminal_batch="000001")
        await ledger.process(sale, till.ctx(), render)
        await ledger.process(upload(till, UploadLine(sale.stan, 1000, CARD_A.ljust(20, "0"))), till.ctx(), render)
        await ledger.process(upload(till, complete=True), till.ctx(), render)
        events = [json.loads(bytes(row.payload)) for row in await ledger.pending(100)]

    assert [(event["type"], event["data"]["details"]["differences"]) for event in events] == [("pos.batch.settled", [])]
